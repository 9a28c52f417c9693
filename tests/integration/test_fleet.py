"""The fleet of `make fleet` (scripts/fleet.py): two replicas of the real stack (vLLM on the CPU, the
tiny text model) behind the real vllm-router, with the router flags and drain grace the runner sets.
One fleet serves the whole module; the tests that stop a replica start it again when they are done
(`ensure_all_up`), the drain test last, since it needs no restart after it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from datetime import datetime

import httpx
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from scripts import fleet as fleet_runner
from scripts.fleet import Fleet
from stack import CPU_ENV, ROOT, free_port, read_records, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "tiny-text"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "vllm-inference-api.json"


@pytest.fixture(scope="module")
def fleet(tiny_models, stack_logs):
    env = {
        **os.environ,
        **CPU_ENV,
        "VLLM_CACHE_ROOT": str(stack_logs / "vllm-cache"),
        "MODEL_NAME": str(tiny_models["text"]),
        "SERVED_MODEL_NAME": MODEL,
        "MAX_MODEL_LEN": "2048",
        "SCRAPE_INTERVAL": "0",
        # A drain ends when its streams do; on a loaded 2-core machine a stream can take over 60 s.
        "DRAIN_TIMEOUT": "300",
    }
    env.pop("DRAIN_GRACE_SECONDS")  # the test stacks' 0: the fleet sets the grace its router needs
    f = Fleet(env=env, workdir=stack_logs / "fleet", replicas=2)
    try:
        f.start(timeout=600)
        yield f
    finally:
        f.stop()
    assert not any(r.running for r in f.members) and not f.router.running


# --- reading the fleet ----------------------------------------------------------------------------


def records(replica) -> list[dict]:
    return read_records(replica.log_path)


def request_lines(replica) -> list[dict]:
    return [r for r in records(replica) if r.get("event") == "request"]


def served_by(fleet: Fleet, request_id: str, timeout: float = 10) -> int:
    """Index of the replica whose own request log has this request id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            i
            for i, r in enumerate(fleet.members)
            if any(line.get("request_id") == request_id for line in request_lines(r))
        ]
        if found:
            assert len(found) == 1, (request_id, found)
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no replica logged {request_id}")


def router_metric(fleet: Fleet, name: str) -> dict[str, float]:
    """A router family's samples by their `worker` label (or "" without one)."""
    text = httpx.get(fleet.metrics_url, timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get("worker", "")
                out[key] = out.get(key, 0) + sample.value
    return out


def worker_health(fleet: Fleet, i: int) -> float | None:
    return router_metric(fleet, "vllm_router_worker_health").get(fleet.members[i].url)


def wait_worker_health(fleet: Fleet, i: int, value: float, timeout: float) -> float:
    """Seconds until the router's health gauge of replica i reads `value`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if worker_health(fleet, i) == value:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"router health of replica {i} not {value} in {timeout} s")


def ensure_all_up(fleet: Fleet) -> None:
    """Start again any replica a test stopped, and wait until the router routes to it."""
    for i, replica in enumerate(fleet.members):
        if not replica.running:
            fleet.restart(i)
    for i in range(len(fleet.members)):
        wait_worker_health(fleet, i, 1, timeout=30)


def complete(
    fleet: Fleet, session: str | None = None, request_id: str | None = None, **body
) -> httpx.Response:
    headers = {"x-request-id": request_id or uuid.uuid4().hex}
    if session is not None:
        headers["x-session-id"] = session
    payload = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **body}
    return httpx.post(fleet.url + "/v1/completions", json=payload, headers=headers, timeout=60)


def sessions_by_replica(fleet: Fleet, n: int = 24) -> dict[int, list[str]]:
    """Where the router places n session keys (one request each)."""
    out: dict[int, list[str]] = {}
    for k in range(n):
        key = f"session-{k}"
        rid = uuid.uuid4().hex
        assert complete(fleet, key, rid).status_code == 200
        out.setdefault(served_by(fleet, rid), []).append(key)
    return out


# --- spread, sessions, request ids --------------------------------------------------------------


def test_requests_spread_over_the_replicas_and_each_replica_logs_its_share(fleet):
    ensure_all_up(fleet)
    before = [len(request_lines(r)) for r in fleet.members]
    decided = router_metric(fleet, "vllm_router_policy_decisions_total")
    ids = [uuid.uuid4().hex for _ in range(24)]
    for k, rid in enumerate(ids):
        assert complete(fleet, f"spread-{k}", rid).status_code == 200
    where = [served_by(fleet, rid) for rid in ids]
    share = [where.count(i) for i in range(2)]
    assert min(share) >= 4, share  # 24 keys on a ring of 2 x 160 virtual nodes
    after = [len(request_lines(r)) for r in fleet.members]
    assert [a - b for a, b in zip(after, before, strict=True)] == share  # nothing else reached them
    now = router_metric(fleet, "vllm_router_policy_decisions_total")
    assert [now[r.url] - decided.get(r.url, 0) for r in fleet.members] == share


def test_the_same_session_key_lands_on_the_same_replica_and_different_keys_spread(fleet):
    """vllm-router's consistent_hash reads the session from the X-Session-ID header (then
    X-User-ID, ..., X-Request-ID), before anything in the body."""
    ensure_all_up(fleet)
    placed: dict[str, set[int]] = {}
    for k in range(12):  # all on one replica: 1 run in 2,000
        key = f"sticky-{k}"
        for turn in range(3):  # a conversation: a different prompt every turn
            rid = uuid.uuid4().hex
            assert complete(fleet, key, rid, prompt=f"turn {turn} of {key}").status_code == 200
            placed.setdefault(key, set()).add(served_by(fleet, rid))
    assert all(len(replicas) == 1 for replicas in placed.values()), placed
    assert set().union(*placed.values()) == {0, 1}, placed


def test_the_openai_user_field_is_not_a_session_key_for_this_router(fleet):
    """vllm-router 0.1.17 hashes the prompt when no session header is sent: the body's `user`
    does not pin a replica (the README says to send X-Session-ID). Requests carry no id header
    here (it would be hashed first), so each is found by the replica whose log grew."""
    ensure_all_up(fleet)

    def place(body: dict) -> int:
        before = [len(request_lines(r)) for r in fleet.members]
        r = httpx.post(
            fleet.url + "/v1/completions", json={"model": MODEL, "max_tokens": 2, **body}, timeout=60
        )
        assert r.status_code == 200
        grew = wait_for(
            lambda: [i for i, rep in enumerate(fleet.members) if len(request_lines(rep)) > before[i]],
            10,
            "no replica logged the request",
            0.05,
        )
        return grew[0]

    with_user = {place({"prompt": f"question {n}", "user": "alice"}) for n in range(16)}
    assert with_user == {0, 1}
    same_prompt = {place({"prompt": "the same question"}) for _ in range(4)}
    assert len(same_prompt) == 1  # no key at all: the prompt's hash places it


def test_a_client_request_id_reaches_the_replica_log_unchanged(fleet):
    ensure_all_up(fleet)
    client = OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for stream in (False, True):
        rid = f"client-{uuid.uuid4()}"
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="Hi", max_tokens=3, stream=stream, extra_headers={"X-Request-ID": rid}
        )
        assert raw.headers["x-request-id"] == rid
        result = raw.parse()
        if stream:
            assert sum(1 for _ in result) >= 1
        line = next(
            rec for rec in request_lines(fleet.members[served_by(fleet, rid)]) if rec["request_id"] == rid
        )
        assert line["status"] == 200 and line["stream"] is stream


# --- Prometheus with the repo's fleet config -----------------------------------------------------


def substitute(expr: str, instance: str) -> str:
    """What Grafana sends for the dashboard's variables: one replica, every router."""
    for name, value in {
        "$__rate_interval": "1m",
        "$job": "vllm-api",
        "$instance": instance.replace(".", "\\\\."),
        "$model": MODEL,
        "$router": ".*",
    }.items():
        expr = expr.replace(name, value)
    return expr


def test_prometheus_scrapes_every_replica_and_the_router_with_the_repos_config(fleet, tmp_path):
    """monitoring/fleet/prometheus.yml as the runner writes it (targets for this fleet's ports),
    with only its intervals shortened so this waits seconds; then the dashboard's fleet row."""
    ensure_all_up(fleet)
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: apt-get install -y prometheus (.ci/run does)")
    written = fleet.write_prometheus_files()
    config = yaml.safe_load(written.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    for job in config["scrape_configs"]:
        job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
        job["file_sd_configs"][0]["refresh_interval"] = "1s"
    fast = written.parent / "prometheus-fast.yml"
    fast.write_text(json.dumps(config))  # JSON is YAML; beside the original: same targets/
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={fast}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def query(expr: str) -> list:
            r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text)
            return r.json()["data"]["result"]

        def wait(expr: str, predicate, timeout: float = 60) -> list:
            deadline, result = time.monotonic() + timeout, []
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    ready = httpx.get(url + "/-/ready", timeout=5).status_code == 200
                    result = query(expr) if ready else []
                    if predicate(result):
                        return result
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            raise AssertionError(f"{expr}: {result}")

        up = wait("up == 1", lambda r: len(r) == 3)
        scraped = {(s["metric"]["job"], s["metric"]["instance"]) for s in up}
        router = f"127.0.0.1:{fleet.metrics_port}"
        assert scraped == {("vllm-api", r.address) for r in fleet.members} | {("vllm-router", router)}
        # Traffic on both replicas, seen twice by Prometheus, so rates have two points.
        for k in range(12):
            assert complete(fleet, f"prom-{k}", stream=True).status_code == 200
        wait(
            'count(sum by (instance) (vllm_api_requests_total{job="vllm-api"}))',
            lambda r: r and r[0]["value"][1] == "2",
        )
        seen = time.time()
        wait('timestamp(up{job="vllm-router"})', lambda r: r and float(r[0]["value"][1]) > seen + 2)

        dashboard = json.loads(DASHBOARD.read_text())
        rows = [p for p in dashboard["panels"] if p["type"] == "row"]
        start = next(r["gridPos"]["y"] for r in rows if r["title"].startswith("Fleet"))
        fleet_panels = [p for p in dashboard["panels"] if p["type"] != "row" and p["gridPos"]["y"] > start]
        assert fleet_panels
        empty = []
        for panel in fleet_panels:
            for target in panel["targets"]:
                expr = substitute(target["expr"], fleet.members[0].address)
                result = query(expr)
                if not any(not math.isnan(float(s["value"][1])) for s in result):
                    empty.append(f"{panel['title']}: {expr}")
        assert not empty, "fleet panels without data:\n" + "\n".join(empty)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- losing a replica -------------------------------------------------------------------------------


class Traffic:
    """Steady requests through the router, from a thread, on the given session keys."""

    def __init__(self, fleet: Fleet, keys: list[str]) -> None:
        self.fleet, self.keys = fleet, keys
        self.results: list[tuple[float, str, str, int | str]] = []  # (sent at, key, id, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            key = self.keys[n % len(self.keys)]
            rid = uuid.uuid4().hex
            sent = time.time()
            try:
                status: int | str = complete(self.fleet, key, rid).status_code
            except httpx.HTTPError as exc:
                status = repr(exc)
            self.results.append((sent, key, rid, status))
            n += 1
            time.sleep(0.05)

    def wait_for(self, predicate, timeout: float) -> None:
        def met() -> bool:
            assert self._thread.is_alive(), self.results[-5:]
            return predicate(list(self.results))

        wait_for(met, timeout, lambda: str(self.results[-5:]), 0.1)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "a request hung"


def stream_lines(fleet: Fleet, key: str, out: dict, max_tokens: int) -> threading.Thread:
    """A long stream on the replica that holds `key`, read in a thread into out["lines"]."""

    def run() -> None:
        body = {"model": MODEL, "prompt": "x", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        out["lines"] = []
        try:
            with httpx.stream(
                "POST",
                fleet.url + "/v1/completions",
                json=body,
                headers={"x-session-id": key, "x-request-id": out["id"]},
                timeout=120,
            ) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line:
                        out["lines"].append(line)
        except httpx.HTTPError as exc:
            out["exc"] = exc
        out["ended"] = time.time()

    out["id"] = uuid.uuid4().hex
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def streaming() -> bool:
        assert thread.is_alive(), out
        return len(out.get("lines", [])) >= 3

    wait_for(streaming, 60, lambda: str(out), 0.02)
    return thread


def started_at(line: dict) -> float:
    end = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
    return end - line["duration_ms"] / 1000


def test_kill_9_the_router_marks_it_unhealthy_new_requests_go_to_the_survivor_and_it_rejoins(fleet):
    ensure_all_up(fleet)
    placed = sessions_by_replica(fleet)
    victim, survivor = 1, 0
    keys = placed[victim][:3]
    out: dict = {}
    with Traffic(fleet, keys) as traffic:
        time.sleep(0.5)
        # The long stream starts last and the kill follows its first lines at once: on a quiet
        # machine the tiny model writes 2000 tokens in a few seconds, and a stream started before
        # the traffic could end before the kill (it did, once, in CI).
        stream = stream_lines(fleet, keys[0], out, max_tokens=2000)
        assert "ended" not in out, "the stream ended before the kill: nothing to cut"
        fleet.members[victim].kill()  # the replica's every process at once, as a crashed container
        killed = time.time()
        noticed = wait_worker_health(fleet, victim, 0, timeout=20)
        traffic.wait_for(lambda r: sum(sent >= killed + noticed for sent, *_ in r) >= 8, timeout=120)
    stream.join(30)
    assert not stream.is_alive(), "the stream on the killed replica hung"
    # Its stream was cut: the client's HTTP library reports the incomplete response, promptly.
    seen = {"status": out.get("status"), "exc": out.get("exc"), "lines": len(out["lines"])}
    assert isinstance(out.get("exc"), httpx.TransportError), seen
    assert out["lines"][-1] != "data: [DONE]" and out["ended"] - killed < 15, seen
    # The router saw the replica fail within one detection (interval x failures, + one check's time).
    assert noticed <= fleet_runner.detection_seconds() + fleet_runner.HEALTH_CHECK_TIMEOUT_S + 1
    # Every request of the victim's sessions succeeded: the one in flight and those sent while the
    # router still trusted the dead replica were retried on the survivor, later ones sent to it.
    assert all(status == 200 for *_, status in traffic.results), [r for r in traffic.results if r[3] != 200]
    sent = [r for r in traffic.results if r[0] >= killed]
    assert sent and all(served_by(fleet, rid) == survivor for _, _, rid, _ in sent)
    assert sum(router_metric(fleet, "vllm_router_retries_total").values()) > 0
    print(f"kill -9: router noticed in {noticed:.1f} s; {len(sent)} requests after it, all 200")

    fleet.restart(victim)
    rejoined = wait_worker_health(fleet, victim, 1, timeout=30)
    assert rejoined <= fleet_runner.HEALTH_CHECK_INTERVAL_S * fleet_runner.HEALTH_SUCCESS_THRESHOLD + 3
    rid = uuid.uuid4().hex
    assert complete(fleet, keys[0], rid).status_code == 200
    assert served_by(fleet, rid) == victim  # its sessions are back on it


def test_sigterm_drains_a_replica_without_a_single_client_error(fleet):
    """The issue's measured failure (2 of 15 requests made during a drain got 503) cannot happen:
    the replica serves new requests until the router has noticed its /health turn 503, its
    stream finishes, it refuses nothing, and the router stops sending it requests. Runs last: the
    fleet is left with one replica (ensure_all_up restarts it for any test after)."""
    ensure_all_up(fleet)
    placed = sessions_by_replica(fleet)
    victim, survivor = 0, 1
    keys = placed[victim][:2] + placed[survivor][:1]
    replica = fleet.members[victim]
    out: dict = {}
    stream = stream_lines(fleet, keys[0], out, max_tokens=150)
    with Traffic(fleet, keys) as traffic:
        time.sleep(0.5)
        replica.send(signal.SIGTERM)
        sigterm = time.time()
        noticed = wait_worker_health(fleet, victim, 0, timeout=20)
        assert replica.reap(timeout=360) == 0
    stream.join(60)
    grace = fleet_runner.drain_grace_seconds()
    assert noticed < grace, (noticed, grace)  # out of rotation before it would refuse anything
    sent = [r for r in traffic.results if r[0] >= sigterm]
    assert len(sent) >= 20 and all(status == 200 for *_, status in sent), [r for r in sent if r[3] != 200]
    assert out.get("status") == 200 and "exc" not in out and out["lines"][-1] == "data: [DONE]"
    lines = request_lines(replica)
    assert not [line for line in lines if line["status"] != 200]  # it refused nothing
    drained = [line for line in lines if started_at(line) > sigterm]
    assert drained  # it did serve requests during the grace
    assert all(started_at(line) < sigterm + noticed + 0.5 for line in drained)  # then none
    after = [
        rid for sent_at, key, rid, _ in sent if key in placed[victim] and sent_at > sigterm + noticed + 0.5
    ]
    assert after and all(served_by(fleet, rid) == survivor for rid in after)
    print(f"drain: router noticed in {noticed:.1f} s (grace {grace:g} s); {len(sent)} requests, all 200;")
    print(
        f"  {len(drained)} served by the draining replica in its grace, stream of {len(out['lines'])} lines ended [DONE]"
    )
    events = [rec.get("event") for rec in records(replica)]
    assert "draining: /health answers 503, new requests still served" in events
