"""PROXY_WORKERS=2, run for real (scripts/start.sh: the launcher and two worker processes) in front
of the session's real vLLM (the text stack's engine, ENGINE=external: no second engine start): one
service from outside. Requests spread over both workers; /metrics counts each once whichever worker
is scraped, and goes on after a worker is killed and restarted; the request log is whole JSON
lines; a hang-up through a worker aborts the engine's generation; /health and the dashboard's tiles
count both workers' streams; SIGTERM drains the streams of both, then the container exits 0."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack import Stack, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-text"


@pytest.fixture(scope="module")
def workers_stack(stack_logs, text_stack):
    stack = Stack(
        stack_logs,
        "proxy-workers",
        ENGINE="external",
        ENGINE_URL=text_stack.engine_url,
        MODEL_NAME="",
        SERVED_MODEL_NAME=MODEL,
        PROXY_WORKERS="2",
        SCRAPE_INTERVAL="1",
        DRAIN_TIMEOUT="120",
    ).start(timeout=60)
    yield stack
    stack.stop()


def rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def worker_pids(stack: Stack) -> list[int]:
    """The workers alive now: the launcher's children running app.worker."""
    assert stack.proc is not None
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == stack.proc.pid and b"app.worker" in cmd:
            out.append(int(entry))
    return sorted(out)


def requests_total(stack: Stack, route: str = "/v1/completions") -> float:
    text = httpx.get(stack.url + "/metrics", timeout=10).text  # a new connection: any worker
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "vllm_api_requests"
        for s in f.samples
        if s.name == "vllm_api_requests_total" and s.labels["route"] == route
    )


def complete(stack: Stack, request_id: str, max_tokens: int = 3, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "prompt": "x", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    return httpx.post(
        stack.url + "/v1/completions", json=body, headers={"X-Request-ID": request_id}, timeout=60
    )


def test_both_workers_serve_and_the_service_counts_each_request_once(workers_stack):
    """Each request on a connection of its own: the kernel spreads them over both workers (each
    makes the request ids it mints with a prefix of its own). Every scrape, whichever worker
    answers it, reads the same count: all of them, once."""
    before = requests_total(workers_stack)
    n = 16
    minted = []
    for _ in range(n):
        r = httpx.post(
            workers_stack.url + "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        minted.append(r.headers["x-request-id"])
    assert len({m[:16] for m in minted}) == 2, minted  # two processes answered
    # A request is counted, then logged, once its answer's last byte is out: its line is waited
    # for, so that neither the scrapes nor the count of lines race the last answer's accounting.
    for rid in minted:
        workers_stack.request_log(rid)
    counts = {requests_total(workers_stack) - before for _ in range(6)}
    assert counts == {n}
    lines = [r for r in workers_stack.records() if r.get("event") == "request" and r["request_id"] in minted]
    assert len(lines) == n and all(line["status"] == 200 for line in lines)
    # every line of the log is one whole JSON record (two processes wrote into one stream)
    text = workers_stack.log_path.read_text()
    assert all(line.startswith("{") and line.endswith("}") for line in text.splitlines() if line)


def test_a_hang_up_through_a_worker_aborts_the_generation(workers_stack, text_stack):
    generated = text_stack.engine_metric("vllm:generation_tokens_total")
    request_id = rid("workers-hangup")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST",
        workers_stack.url + "/v1/completions",
        json=body,
        headers={"X-Request-ID": request_id},
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    wait_for(
        lambda: text_stack.engine_metric("vllm:num_requests_running") == 0,
        10,
        "the engine kept generating after the client hung up",
        0.1,
    )
    assert text_stack.engine_metric("vllm:generation_tokens_total") - generated < 2000
    assert workers_stack.request_log(request_id)["status"] == 499


def test_a_killed_worker_is_restarted_and_the_counts_go_on(workers_stack):
    first = rid("before-kill")
    complete(workers_stack, first)
    workers_stack.request_log(first)  # counted before its line is written: the scrape cannot race it
    before = requests_total(workers_stack)
    pids = worker_pids(workers_stack)
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    wait_for(
        lambda: len(now := worker_pids(workers_stack)) == 2 and pids[1] not in now,
        30,
        lambda: workers_stack.tail(20),
        0.1,
    )
    died = [r for r in workers_stack.records() if r.get("event") == "a proxy worker died: restarting it"]
    assert died and died[-1]["pid"] == pids[1] and died[-1]["level"] == "error"
    ids = [rid("after-kill") for _ in range(8)]
    for request_id in ids:  # served, by either worker, while the restarted one comes up
        assert complete(workers_stack, request_id).status_code == 200
    for request_id in ids:
        workers_stack.request_log(request_id)
    assert {requests_total(workers_stack) - before for _ in range(4)} == {len(ids)}
    assert httpx.get(workers_stack.url + "/health", timeout=10).status_code == 200


def test_sigterm_drains_the_streams_of_every_worker_and_exits_0(workers_stack):
    """Long streams on connections of their own until both workers hold some (the id each worker
    mints tells which): /health and the dashboard's tiles count them all, from any worker. SIGTERM:
    new requests are refused by both workers, every stream finishes whole, then the launcher exits
    0 and no worker is left."""
    streams: list[dict] = []

    def run(got: dict) -> None:
        # long enough to outlast the counting below: tiny-text makes a token every ms or few (2,000
        # tokens were too few on a quiet machine); the text stack's MAX_MODEL_LEN is 4096
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", workers_stack.url + "/v1/completions", json=body, timeout=120) as r:
                got["status"] = r.status_code
                got["id"] = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if line:
                        got["lines"].append(line)
        except httpx.HTTPError as exc:
            got["exc"] = exc
        got["ended"] = time.monotonic()

    threads = []
    while len(streams) < 4 or len({g["id"][:16] for g in streams}) < 2:
        assert len(streams) < 10, "every stream went to one worker"
        got: dict = {"lines": []}
        threads.append(threading.Thread(target=run, args=(got,)))
        threads[-1].start()
        wait_for(lambda got=got: got["lines"] or "exc" in got, 30, lambda got=got: str(got), 0.02)
        streams.append(got)
    health = [httpx.get(workers_stack.url + "/health", timeout=10).json() for _ in range(4)]
    live = [httpx.get(workers_stack.url + "/api/v1/live_metrics", timeout=10).json() for _ in range(4)]
    ended = [g for g in streams if "ended" in g]
    assert not ended, f"{len(ended)} streams ended before they were counted: make them longer"
    assert {h["in_flight"] for h in health} == {len(streams)}, health
    assert {t["requests_in_flight"] for t in live} == {len(streams)}, live
    workers_stack.signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = [complete(workers_stack, rid("refused")) for _ in range(4)]
    assert {r.status_code for r in refused} == {503}
    for t in threads:
        t.join(120)
    assert workers_stack.wait_exit(60) == 0
    for got in streams:
        assert got.get("status") == 200 and "exc" not in got, got
        assert got["lines"][-1] == "data: [DONE]"
    events = [r.get("event") for r in workers_stack.records()]
    assert "drained" in events and "drain cut short" not in events
    assert not worker_pids(workers_stack)


def key_reloads(stack: Stack) -> float:
    text = httpx.get(stack.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "vllm_api_key_reloads_total" and s.labels.get("result") == "ok"
    )


def test_sighup_reloads_the_api_keys_of_every_worker(stack_logs, text_stack, tmp_path):
    """The workers hold the keys: the launcher passes SIGHUP on. The key file is rewritten in
    place with its old mtime and size, so the file watcher cannot see it: only the signal reloads.
    /metrics sums the workers' reloads: exactly 2."""
    old, new = "sk-" + "a" * 40, "sk-" + "b" * 40
    keys = tmp_path / "keys.txt"
    keys.write_text(old + "\n")
    stamp = keys.stat()
    stack = Stack(
        stack_logs,
        "proxy-workers-keys",
        ENGINE="external",
        ENGINE_URL=text_stack.engine_url,
        MODEL_NAME="",
        SERVED_MODEL_NAME=MODEL,
        PROXY_WORKERS="2",
        API_KEY_FILE=str(keys),
    ).start(timeout=60)
    try:

        def statuses(key: str) -> set[int]:  # a new connection each: both workers answer some
            auth = {"Authorization": f"Bearer {key}"}
            return {
                httpx.get(stack.url + "/v1/models", headers=auth, timeout=10).status_code for _ in range(16)
            }

        assert statuses(old) == {200} and statuses(new) == {401}
        with open(keys, "r+") as fh:  # same inode, same size, same mtime
            fh.write(new + "\n")
        os.utime(keys, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        time.sleep(2.5)  # the watcher's look (1 s) and settle time have passed
        assert statuses(new) == {401} and key_reloads(stack) == 0
        stack.signal(signal.SIGHUP)
        wait_for(lambda: key_reloads(stack) >= 2, 10, lambda: stack.tail(20), 0.1)
        assert statuses(new) == {200} and statuses(old) == {401}
        assert key_reloads(stack) == 2 and len(worker_pids(stack)) == 2  # nobody died of the signal
    finally:
        stack.stop()
