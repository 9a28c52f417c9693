"""Several proxy processes as one service (app/workers.py): how many, the state the launcher shares
with them, and how their output becomes one log stream. The processes themselves run in
tests/integration/test_proxy_workers.py."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest

from app import workers
from app.runtime import Phase
from app.settings import Settings


@pytest.mark.parametrize(
    ("setting", "extra", "engine", "expected"),
    [
        ("auto", "", "vllm", 1),
        ("auto", "--api-server-count 4", "vllm", 4),
        ("auto", "--enforce-eager --api-server-count=3", "vllm", 3),
        ("auto", "-asc 2 --enforce-eager", "vllm", 2),
        ("auto", "-asc=5", "vllm", 5),
        ("auto", "--api-server-count 4", "external", 1),
        ("3", "", "vllm", 3),
        ("2", "--api-server-count 8", "vllm", 2),
    ],
)
def test_worker_count(setting, extra, engine, expected):
    settings = Settings(
        MODEL_NAME="m", PROXY_WORKERS=setting, ENGINE_EXTRA_ARGS=extra, ENGINE=engine, ENGINE_URL="http://e:1"
    )
    assert workers.worker_count(settings) == expected


@pytest.mark.parametrize("value", ["0", "65", "two", "-1", "1.5"])
def test_proxy_workers_must_be_auto_or_a_count(value):
    with pytest.raises(ValueError, match="PROXY_WORKERS"):
        Settings(MODEL_NAME="m", PROXY_WORKERS=value)


def test_empty_proxy_workers_is_auto():
    assert Settings(MODEL_NAME="m", PROXY_WORKERS="").PROXY_WORKERS == "auto"


@pytest.fixture
def shared():
    state = workers.SharedState.create()
    yield state
    state.close(remove=True)


def test_the_launchers_phase_and_details_reach_every_worker(shared):
    launcher = workers.PublishedRuntime(shared, 2)
    seen = [workers.WorkerRuntime(workers.SharedState.attach(shared.dir), i, 2) for i in range(2)]
    assert all(w.phase is Phase.STARTING and not w.accepting for w in seen)
    launcher.engine_version = "0.32.0"
    launcher.engine_command = ["python", "-m", "vllm", "--api-key", "***"]
    launcher.set_phase(Phase.READY)
    for w in seen:
        assert w.phase is Phase.READY and w.accepting and w.detail == "ready"
        assert w.engine_version == "0.32.0" and w.engine_command[-1] == "***"
        assert w.started_at == launcher.started_at
    launcher.grace = True
    launcher.set_phase(Phase.DRAINING, "draining: still serving until routers notice")
    assert all(w.accepting and w.grace for w in seen)  # the grace: still serving
    assert seen[1].detail == "draining: still serving until routers notice"
    launcher.grace = False
    assert not any(w.accepting for w in seen)


def test_in_flight_is_every_workers_and_the_launcher_waits_for_all(shared):
    launcher = workers.PublishedRuntime(shared, 2)
    w0, w1 = (workers.WorkerRuntime(shared, i, 2) for i in range(2))
    w0.request_started()
    w1.request_started()
    w1.request_started()
    assert launcher.inflight == w0.inflight == w1.inflight == 3

    async def drain() -> tuple[bool, bool]:
        short = await launcher.wait_idle(0.1)
        asyncio.get_running_loop().call_later(0.1, w0.request_finished)
        asyncio.get_running_loop().call_later(0.2, w1.request_finished)
        asyncio.get_running_loop().call_later(0.3, w1.request_finished)
        return short, await launcher.wait_idle(5)

    assert asyncio.run(drain()) == (False, True)
    assert launcher.inflight == 0


def test_a_restarted_workers_slot_starts_empty(shared):
    w1 = workers.WorkerRuntime(shared, 1, 2)
    w1.request_started()  # then it dies mid-request
    shared.reset_slot(1)
    assert shared.inflight(2) == 0 and shared.state(1) == workers.STARTING


def test_sockets_on_one_port_share_it_and_a_taken_port_is_refused():
    socks = workers.bind_sockets("127.0.0.1", 0, 3)
    port = socks[0].getsockname()[1]
    assert {s.getsockname()[1] for s in socks} == {port}
    with socket.socket() as other, pytest.raises(OSError):  # one that binds it without SO_REUSEPORT
        other.bind(("127.0.0.1", port))
    with pytest.raises(OSError):  # another launcher's workers: it must not share them silently
        workers.bind_sockets("127.0.0.1", port, 2)
    for s in socks:
        s.close()
    with socket.socket() as plain:  # a plain server on the port
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(OSError):
            workers.bind_sockets("127.0.0.1", plain.getsockname()[1], 2)


class _Log:
    def __init__(self) -> None:
        self.errors: list[tuple[str, dict]] = []

    def error(self, event: str, **kw) -> None:
        self.errors.append((event, kw))


def test_a_workers_output_goes_on_in_whole_lines():
    out: list[bytes] = []
    log = _Log()
    relay = workers.LineRelay("proxy-worker-1", out.append, log)
    a = orjson.dumps({"event": "request", "n": 1}) + b"\n"
    b = orjson.dumps({"event": "request", "n": 2}) + b"\n"
    relay.feed(a + b[:10])  # a read that ends mid-line
    relay.feed(b[10:] + a)
    relay.feed(b"Traceback (most recent call last):\n  File x\n" + b)
    relay.feed(b"no newline at the end")
    relay.close()
    lines = b"".join(out).splitlines()
    assert [orjson.loads(line)["n"] for line in lines] == [1, 2, 1, 2]
    assert all(chunk.endswith(b"\n") for chunk in out)
    assert [e for e, _ in log.errors] == [
        "Traceback (most recent call last):",
        "  File x",
        "no newline at the end",
    ]
    assert {kw["source"] for _, kw in log.errors} == {"proxy-worker-1"}


def test_only_the_first_worker_writes_history_and_runs_batches(monkeypatch):
    monkeypatch.setattr(workers, "_current", None)
    assert workers.is_first()
    workers.set_current(1, 2)
    assert not workers.is_first() and workers.current() == (1, 2)
    workers.set_current(0, 2)
    assert workers.is_first()


@pytest.mark.parametrize(("current", "slots", "places"), [(None, 5, 3), ((0, 2), 3, 2), ((1, 4), 2, 1)])
def test_each_worker_admits_its_share_of_the_limits(monkeypatch, tmp_path, current, slots, places):
    """Each process keeps its own queue: with N workers each takes 1/N of every limit, rounded up."""
    from app.main import create_app

    monkeypatch.setattr(workers, "_current", current)
    usage_db = tmp_path / "usage.sqlite3"
    app = create_app(
        Settings(MODEL_NAME="m", MAX_CONCURRENT_REQUESTS=5, MAX_QUEUED_REQUESTS=3, USAGE_DB_PATH=usage_db)
    )
    admission = app.app.proxy.admission
    assert (admission.max_concurrent, admission.max_queued) == (slots, places)


def test_the_launchers_lora_plan_profile_and_start_up_reach_the_workers():
    """What /info and the LoRA service read from the Runtime is the launcher's, in every worker:
    the plan (dataclasses) through a file beside the control block, the rest in its JSON."""
    from app.lora.config import AdapterSpec, LoraPlan

    shared = workers.SharedState.create()
    try:
        published = workers.PublishedRuntime(shared, 2)
        seen = workers.WorkerRuntime(workers.SharedState.attach(shared.dir), 0, 2)
        assert seen.lora is None and seen.profile is None and seen.reloaders == []
        plan = LoraPlan([AdapterSpec("sql", "/adapters/sql", "static", path="/adapters/sql")], enabled=True)
        published.lora = plan
        published.profile = {"id": "tiny", "applied": {"MAX_MODEL_LEN": 512}}
        published.startup = {"total": 12.5}
        published.caches = {"hf_home": "/data/huggingface", "vllm_cache_root": None}
        assert seen.lora == plan and seen.lora is seen.lora  # read once, until it changes
        assert seen.profile == {"id": "tiny", "applied": {"MAX_MODEL_LEN": 512}}
        assert (seen.startup, seen.caches["hf_home"]) == ({"total": 12.5}, "/data/huggingface")
    finally:
        shared.close(remove=True)
