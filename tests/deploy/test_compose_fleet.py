"""docker-compose.yml's `fleet` profile: GPU replicas behind vllm-router, with the monitoring
profile's Prometheus and Grafana. Nothing here runs Docker: the router's command is parsed by
vllm-router's own CLI parser (the PyPI package), its flags are compared with make fleet's, and the
Prometheus targets with the services. (The compose spec check of the whole file is test_compose.py's.)"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_tools import ROOT
from vllm_router.launch_router import parse_router_args

from app.launcher import ENGINE_STOP_TIMEOUT, LEFTOVER_GRACE
from app.server import server_config
from app.settings import Settings
from scripts import fleet

COMPOSE = ROOT / "docker-compose.yml"
FLEET = ("vllm-fleet-0", "vllm-fleet-1")


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def defaults(text: str) -> str:
    """What compose substitutes when the variables are unset: ${VAR:-default} -> default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def router_args(services: dict):
    command = [defaults(str(arg)) for arg in services["vllm-router"]["command"]]
    assert command[0] == "vllm-router"  # the image's executable (its CMD is replaced)
    return parse_router_args(command[1:])


def test_the_fleet_services_are_in_the_fleet_profile_only(services):
    fleet_services = {name for name, s in services.items() if "fleet" in s.get("profiles", [])}
    assert fleet_services == {*FLEET, "vllm-router", "prometheus-fleet", "grafana-fleet"}
    assert all(services[name]["profiles"] == ["fleet"] for name in fleet_services)


def test_each_replica_is_the_image_on_its_own_gpu_reached_only_through_the_router(services):
    gpus = []
    for name in FLEET:
        replica = services[name]
        assert replica["image"] == services["vllm-api"]["image"]
        assert replica["ports"] == []
        assert replica["healthcheck"] == services["vllm-api"]["healthcheck"]
        (device,) = replica["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
    assert len({defaults(g) for g in gpus}) == len(FLEET)


def stop_needs_s() -> float:
    """The longest stop of a replica: the grace, the drain, the server's graceful shutdown, the
    engine's stop and its leftovers."""
    s = Settings(MODEL_NAME="m")
    graceful = server_config(None, "127.0.0.1", 1, 1).timeout_graceful_shutdown
    return s.DRAIN_GRACE_SECONDS + s.DRAIN_TIMEOUT + graceful + ENGINE_STOP_TIMEOUT + LEFTOVER_GRACE


def test_a_replica_is_given_time_to_drain_before_docker_kills_it(services):
    needed = stop_needs_s()
    for name in FLEET:
        assert int(services[name]["stop_grace_period"].removesuffix("s")) > needed


def test_the_router_command_parses_and_routes_to_every_replica(services):
    args = router_args(services)
    assert args.worker_urls == [f"http://{name}:8000" for name in FLEET]
    assert args.policy == fleet.DEFAULT_POLICY
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert services["vllm-router"]["ports"] == ["${API_PORT:-8000}:8000"]
    depends = services["vllm-router"]["depends_on"]
    assert depends == {name: {"condition": "service_healthy"} for name in FLEET}
    assert re.fullmatch(
        r"vllm/vllm-router:\$\{ROUTER_VERSION:-v\d+\.\d+\.\d+\}", services["vllm-router"]["image"]
    )


def test_the_router_checks_health_and_retries_as_make_fleet_does(services):
    """The same flags as scripts/fleet.py, whose timing the fleet's drain and kill tests prove;
    DRAIN_GRACE_SECONDS's default covers the detection they give."""
    args = router_args(services)
    expected = parse_router_args(["--worker-urls", "http://x:1", *fleet.router_flags()])
    for flag in fleet.router_flags()[::2]:
        attr = flag.removeprefix("--").replace("-", "_")
        assert getattr(args, attr) == getattr(expected, attr), flag
    assert fleet.drain_grace_seconds() <= Settings(MODEL_NAME="m").DRAIN_GRACE_SECONDS


def test_prometheus_scrapes_every_replica_and_the_router_and_grafana_finds_it(services):
    args = router_args(services)
    prom = services["prometheus-fleet"]
    assert "./monitoring/fleet/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "./monitoring/fleet/targets:/etc/prometheus/targets:ro" in prom["volumes"]
    assert prom["networks"]["default"]["aliases"] == ["prometheus"]  # Grafana's datasource URL
    targets = ROOT / "monitoring" / "fleet" / "targets"
    replicas = [t for group in json.loads((targets / "vllm-api.json").read_text()) for t in group["targets"]]
    routers = [
        t for group in json.loads((targets / "vllm-router.json").read_text()) for t in group["targets"]
    ]
    assert replicas == [f"{name}:8000" for name in FLEET]
    assert routers == [f"vllm-router:{args.prometheus_port}"] and args.prometheus_host == "0.0.0.0"
    grafana = services["grafana-fleet"]
    assert grafana["image"] == services["grafana"]["image"]
    assert set(services["grafana"]["volumes"]) == set(grafana["volumes"])
