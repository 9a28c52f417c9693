"""Real vLLM (CPU) behind the proxy: what its answers take through the proxy (streams, whole
answers, its own 400, a client that leaves mid-stream) is freed by reference counting alone, as in
tests/app/test_server_garbage.py against the fault-injecting fake."""

from __future__ import annotations

import json

import pytest

from inproc import InProcessProxy, cyclic_garbage, exchange, leave_after_first_event

pytestmark = pytest.mark.integration

MODEL = "tiny-text"
HEADERS = {"Content-Type": "application/json"}


def _chat(stream: bool, **extra: object) -> bytes:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "stream": stream,
    }
    return json.dumps({**body, **extra}).encode()


def _requests(port: int) -> list[str]:
    bodies = (_chat(True), _chat(False), _chat(True, max_tokens=-1), _chat(False, max_tokens=-1))
    ids = exchange(port, [("POST", "/v1/chat/completions", body, HEADERS) for body in bodies], timeout=60)
    # A client that leaves after the first event of a long stream: the engine's request is aborted.
    return [*ids, leave_after_first_event(port, _chat(True, max_tokens=2000, ignore_eos=True), timeout=60)]


def test_real_engine_answers_leave_no_reference_cycles(text_stack):
    with InProcessProxy(text_stack.engine_url, MODEL_NAME=MODEL, uvloop=True) as proxy:
        _requests(proxy.port)  # warm-up: first-use caches are not garbage
        ids: list[str] = []

        def measured() -> list[str]:
            ids.extend(_requests(proxy.port))
            return ids

        garbage = cyclic_garbage([proxy], measured)
        statuses = [proxy.logs.request(rid)["status"] for rid in ids]
    assert statuses == [200, 200, 400, 400, 499]
    assert not garbage, f"left for the cyclic collector: {dict(garbage)}"
