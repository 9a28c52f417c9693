"""scripts/fleet.py's pieces without starting anything: the router's command (checked by vllm-router's
own parser), the replicas' environment, the Prometheus targets, and how the drain grace, the router's
health check and its retries fit together. The fleet itself runs in tests/integration/test_fleet.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm_router.launch_router import parse_router_args

from app.settings import Settings
from scripts import fleet


def test_the_router_command_is_accepted_by_vllm_routers_parser():
    argv = fleet.router_command(
        ["http://127.0.0.1:8100", "http://127.0.0.1:8101"],
        host="0.0.0.0",
        port=8000,
        policy="consistent_hash",
        metrics_port=29000,
        extra=["--log-level", "warning"],
    )
    assert Path(argv[0]).name == "vllm-router"
    args = parse_router_args(argv[1:])
    assert args.worker_urls == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert (args.host, args.port, args.policy) == ("0.0.0.0", 8000, "consistent_hash")
    assert (args.prometheus_host, args.prometheus_port) == ("127.0.0.1", 29000)
    assert args.health_check_endpoint == "/health"
    assert args.health_check_interval_secs == fleet.HEALTH_CHECK_INTERVAL_S
    assert args.health_failure_threshold == fleet.HEALTH_FAILURE_THRESHOLD
    assert args.retry_max_retries == fleet.RETRY_MAX_ATTEMPTS
    assert args.log_level == "warning"


def test_an_unknown_policy_is_one_clear_error():
    with pytest.raises(ValueError, match="ROUTER_POLICY must be one of"):
        fleet.router_command([], host="h", port=1, policy="fastest", metrics_port=2)


def test_the_drain_grace_covers_the_routers_detection_and_the_retries_outlast_it():
    """A replica told to stop keeps serving until the router has seen /health fail (interval x
    failures); a request that meets a dead replica is retried past that same detection."""
    assert fleet.drain_grace_seconds() > fleet.detection_seconds()
    assert fleet.drain_grace_seconds() <= Settings(MODEL_NAME="m").DRAIN_GRACE_SECONDS
    jitter = 0.8  # vllm-router's default jitter factor (0.2) can shorten each backoff by a fifth
    assert fleet.retry_span_seconds() * jitter > fleet.detection_seconds() + fleet.HEALTH_CHECK_TIMEOUT_S


def test_each_replica_has_its_own_ports_history_and_the_fleets_grace(tmp_path):
    f = fleet.Fleet(env={"MODEL_NAME": "m", "PORT_HEALTH": "9999"}, workdir=tmp_path, replicas=3)
    ports = [r.port for r in f.members] + [r.engine_port for r in f.members] + [f.port, f.metrics_port]
    assert len(set(ports)) == len(ports)
    envs = [r.env for r in f.members]
    assert len({e["METRICS_DB_PATH"] for e in envs}) == 3  # never one SQLite file for two replicas
    for replica, env in zip(f.members, envs, strict=True):
        assert env["PORT"] == str(replica.port) and env["ENGINE_PORT"] == str(replica.engine_port)
        assert env["HOST"] == "127.0.0.1" and env["LOG_FORMAT"] == "json"
        assert env["DRAIN_GRACE_SECONDS"] == f"{fleet.drain_grace_seconds():g}"
        assert "PORT_HEALTH" not in env
    kept = fleet.Fleet(env={"MODEL_NAME": "m", "DRAIN_GRACE_SECONDS": "9"}, workdir=tmp_path, replicas=1)
    assert kept.members[0].env["DRAIN_GRACE_SECONDS"] == "9"


def test_make_fleets_variables(tmp_path):
    f = fleet.fleet_from_env({"TINY_MODELS_DIR": str(tmp_path), "FLEET_DIR": str(tmp_path / "f")})
    assert (f.port, f.replicas, f.policy, f.metrics_port) == (8000, 2, "consistent_hash", 29000)
    assert [r.port for r in f.members] == [8100, 8101] and [r.engine_port for r in f.members] == [8200, 8201]
    assert f.members[0].env["MODEL_NAME"] == str(tmp_path / "tiny-text")
    assert f.members[0].env["SERVED_MODEL_NAME"] == "tiny-text"
    f = fleet.fleet_from_env(
        {
            "MODEL_NAME": "org/model",
            "PORT": "9000",
            "REPLICAS": "3",
            "ROUTER_POLICY": "round_robin",
            "ROUTER_EXTRA_ARGS": "--log-level debug",
        }
    )
    assert (f.port, f.replicas, f.policy, f.router_extra) == (
        9000,
        3,
        "round_robin",
        ["--log-level", "debug"],
    )
    assert [r.port for r in f.members] == [9100, 9101, 9102]
    assert f.members[0].env["MODEL_NAME"] == "org/model" and "SERVED_MODEL_NAME" not in f.members[0].env
    with pytest.raises(ValueError):
        fleet.fleet_from_env({"REPLICAS": "0"})


def test_prometheus_files_are_the_repos_config_and_this_fleets_targets(tmp_path):
    f = fleet.Fleet(env={"MODEL_NAME": "m"}, workdir=tmp_path, replicas=2)
    config = f.write_prometheus_files()
    assert config.read_bytes() == fleet.PROMETHEUS_CONFIG.read_bytes()
    replicas = json.loads((config.parent / "targets" / "vllm-api.json").read_text())
    router = json.loads((config.parent / "targets" / "vllm-router.json").read_text())
    assert replicas[0]["targets"] == [r.address for r in f.members]
    assert router[0]["targets"] == [f"127.0.0.1:{f.metrics_port}"]


def test_a_restarted_replica_kills_only_the_engine_of_its_own_run(tmp_path):
    """A restart appends to the same log: an older run's engine pid (perhaps reused by now by
    another process) must not be taken for this run's."""
    log = tmp_path / "replica.log"
    log.write_text(json.dumps({"event": "engine started", "pid": 1}) + "\n")
    line = json.dumps({"event": "engine started", "pid": 4242})
    process = fleet.Process(name="r", argv=["/bin/echo", line], env={}, log_path=log)
    process.start()
    assert process.proc.wait(10) == 0  # not reap(): it would signal the groups it reads
    process._pump.join(5)
    assert process.engine_groups() == [4242]
