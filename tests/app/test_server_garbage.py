"""A finished request and a closed connection leave nothing for the cyclic garbage collector.

What a request leaves in a reference cycle is freed only by a collection of the oldest generation,
which CPython runs after the long-lived objects grew by a quarter: under load the heap saws up and
down by megabytes, and the process's RSS creeps up with the fragmentation (`bench/RESULTS.md`,
"Memory under paced streams"). Everything here must be freed by reference counting alone.

The proxy runs in this process on uvloop, as the launcher serves it (asyncio's own socket transport
is a cycle of the standard library's, outside this test's concern), in front of the fault-injecting
fake engine (tests/fake_engine.py) for the engine's errors and breaks. The clients are raw sockets
and `http.client`. Only garbage of the proxy's code (`app`, `uvicorn`) counts: the fake engine and
the clients run in this process too.
"""

from __future__ import annotations

import gc
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from app.proxy.upstream import _Connection
from app.server import ABORT_HOOK
from fake_engine import FakeEngine
from inproc import InProcessProxy, cyclic_garbage, exchange, leave_after_first_event
from stack import free_port, wait_for

KEY = "sk-garbage-test"
LIMITED_KEY = "sk-garbage-one-per-minute"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT = b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}'
STREAM = CHAT[:-1] + b',"stream":true}'
REQUESTS = 5


@dataclass
class Stack:
    proxy: InProcessProxy
    engine: FakeEngine
    dead: InProcessProxy
    """A proxy whose engine is not there."""
    queued: InProcessProxy
    """One engine slot, a queue of 4, 0.3 s in it at most, 0.5 s for a client to send its request."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        f"- {{name: team, key: {KEY}, max_parallel_requests: 8, rpm: 100000, tpm: 10000000, models: [m]}}\n"
        f"- {{name: slow, key: {LIMITED_KEY}, rpm: 1}}\n"
    )
    limits = {
        "API_KEY_FILE": keys,
        "UPSTREAM_FIRST_BYTE_TIMEOUT": 0.3,
        "UPSTREAM_IDLE_TIMEOUT": 0.3,
        "MAX_CONCURRENT_REQUESTS": 2,
        "MAX_QUEUED_REQUESTS": 0,
    }
    with (
        FakeEngine() as engine,
        InProcessProxy(engine.url, uvloop=True, **limits) as proxy,
        InProcessProxy(f"http://127.0.0.1:{free_port()}", uvloop=True, API_KEY=KEY) as dead,
        InProcessProxy(
            engine.url,
            uvloop=True,
            API_KEY=KEY,
            MAX_CONCURRENT_REQUESTS=1,
            MAX_QUEUED_REQUESTS=4,
            QUEUE_TIMEOUT=0.3,
            CLIENT_TIMEOUT=0.5,
        ) as queued,
    ):
        yield Stack(proxy, engine, dead, queued)


def _cyclic_garbage(stack: Stack, scenario: Callable[[Stack], list[str]]) -> Counter[str]:
    return cyclic_garbage([stack.proxy, stack.dead, stack.queued], lambda: scenario(stack))


def _request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> str:
    """One request on its own connection (closed after it); its request id."""
    return exchange(port, [(method, path, body, {**AUTH, **(headers or {})})])[0]


def _keep_alive(port: int, body: bytes, headers: dict[str, str] | None = None) -> list[str]:
    """REQUESTS requests on one connection, then closed."""
    return exchange(port, [("POST", "/v1/chat/completions", body, {**AUTH, **(headers or {})})] * REQUESTS)


def _hang_up_mid_stream(port: int) -> list[str]:
    """Clients that leave after the first event of an endless stream (the engine's work is
    aborted); the connection is reset, as a killed client's is."""
    head = f"authorization: Bearer {KEY}\r\nx-fake: endless\r\n"
    return [leave_after_first_event(port, STREAM, head, reset=True) for _ in range(REQUESTS)]


def _each(method: str, path: str, body: bytes | None = None, **headers: str) -> Callable[[Stack], list[str]]:
    return lambda stack: [_request(stack.proxy.port, method, path, body, headers) for _ in range(REQUESTS)]


def _chunked_upload(stack: Stack) -> list[str]:
    """A body of unknown length: streamed to the engine as it arrives."""
    chunked = ("POST", "/v1/chat/completions", [CHAT[:10], CHAT[10:]], AUTH)
    return [exchange(stack.proxy.port, [chunked])[0] for _ in range(REQUESTS)]


def _engine_unreachable(stack: Stack) -> list[str]:
    return [_request(stack.dead.port, "POST", "/v1/chat/completions", CHAT) for _ in range(REQUESTS)]


def _over_capacity(stack: Stack) -> list[str]:
    """Both of MAX_CONCURRENT_REQUESTS's slots held at the engine, no queue: the next gets 429."""
    with ThreadPoolExecutor(2) as pool:
        gated = [
            pool.submit(_request, stack.proxy.port, "POST", "/v1/chat/completions", CHAT, {"x-fake": "gate"})
            for _ in range(2)
        ]
        wait_for(lambda: stack.engine.held == 2, what="both slots held at the engine")
        refused = [_request(stack.proxy.port, "POST", "/v1/chat/completions", CHAT) for _ in range(REQUESTS)]
        stack.engine.release(2)
        return refused + [f.result() for f in gated]


def _behind_a_held_slot(stack: Stack, others: Callable[[], list[str]], release_after: float) -> list[str]:
    """`others()` while the queued proxy's one engine slot is held (a gated request), released
    `release_after` seconds in."""
    port = stack.queued.port
    with ThreadPoolExecutor(1) as pool:
        gated = pool.submit(_request, port, "POST", "/v1/chat/completions", CHAT, {"x-fake": "gate"})
        wait_for(lambda: stack.engine.held == 1, what="the slot held at the engine")
        threading.Timer(release_after, stack.engine.release).start()
        return others() + [gated.result()]


def _three_queued(release_after: float) -> Callable[[Stack], list[str]]:
    """Three requests queued behind the held slot, released `release_after` seconds in: served
    (before QUEUE_TIMEOUT) or refused with 429 (after it)."""

    def scenario(stack: Stack) -> list[str]:
        def others() -> list[str]:
            with ThreadPoolExecutor(3) as pool:
                port = stack.queued.port
                waiting = [
                    pool.submit(_request, port, "POST", "/v1/chat/completions", CHAT) for _ in range(3)
                ]
                return [f.result() for f in waiting]

        return _behind_a_held_slot(stack, others, release_after)

    return scenario


def _hang_up_while_queued(stack: Stack) -> list[str]:
    """Clients that leave while their requests wait in the queue (their ids are their own)."""

    def others() -> list[str]:
        ids = [f"left-in-queue-{i}-{time.monotonic_ns()}" for i in range(3)]
        socks = []
        for request_id in ids:
            sock = socket.create_connection(("127.0.0.1", stack.queued.port), timeout=10)
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
                f"x-request-id: {request_id}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(CHAT)}\r\n\r\n"
            )
            sock.sendall(head.encode() + CHAT)
            socks.append(sock)
        time.sleep(0.1)
        for sock in socks:
            sock.close()
        return ids

    return _behind_a_held_slot(stack, others, release_after=0.2)


def _client_too_slow(stack: Stack) -> list[str]:
    """Clients that send nothing, half a head, or half a body within CLIENT_TIMEOUT (408)."""
    socks = []
    for partial in (
        b"",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{",
    ):
        sock = socket.create_connection(("127.0.0.1", stack.queued.port), timeout=10)
        sock.sendall(partial)
        socks.append(sock)
    for sock in socks:
        while sock.recv(65536):  # until the proxy closes it
            pass
        sock.close()
    return []


SCENARIOS: dict[str, Callable[[Stack], list[str]]] = {
    "chat-json-keep-alive": lambda stack: _keep_alive(stack.proxy.port, CHAT),
    "chat-stream-keep-alive": lambda stack: _keep_alive(stack.proxy.port, STREAM, {"x-fake": "stream"}),
    "chat-json-connection-each": _each("POST", "/v1/chat/completions", CHAT),
    "chat-stream-connection-each": _each("POST", "/v1/chat/completions", STREAM, **{"x-fake": "stream"}),
    "engine-error-400": _each("POST", "/v1/chat/completions", CHAT, **{"x-fake": "status"}),
    "engine-dies-mid-stream": _each("POST", "/v1/chat/completions", STREAM, **{"x-fake": "crash-mid-stream"}),
    "client-hangs-up-mid-stream": lambda stack: _hang_up_mid_stream(stack.proxy.port),
    "engine-silent-504": _each("POST", "/v1/chat/completions", CHAT, **{"x-fake": "hang"}),
    "engine-stalls-mid-stream": _each(
        "POST", "/v1/chat/completions", STREAM, **{"x-fake": "stall-mid-stream"}
    ),
    "engine-unreachable-502": _engine_unreachable,
    "over-capacity-429": _over_capacity,
    "chunked-upload": _chunked_upload,
    "queued-then-served": _three_queued(release_after=0.1),
    "queue-timeout-429": _three_queued(release_after=0.6),
    "client-hangs-up-while-queued": _hang_up_while_queued,
    "client-too-slow-408": _client_too_slow,
    "no-api-key-401": _each("POST", "/v1/chat/completions", CHAT, Authorization=""),
    "key-over-its-rpm-429": _each(
        "POST", "/v1/chat/completions", CHAT, Authorization=f"Bearer {LIMITED_KEY}"
    ),
    "model-not-for-the-key-403": _each("POST", "/v1/chat/completions", CHAT.replace(b'"m"', b'"other"')),
    "unknown-route-404": _each("POST", "/v1/nowhere", CHAT),
    "body-not-json": _each("POST", "/v1/chat/completions", b"{not json"),
    "body-nested-too-deep-400": _each(
        "POST", "/v1/chat/completions", b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    ),
    "responses-input": _each(
        "POST",
        "/v1/responses",
        b'{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}]}',
    ),
    "completions-prompts": _each("POST", "/v1/completions", b'{"model":"m","prompt":["a","b"]}'),
    "health": _each("GET", "/health"),
    "info": _each("GET", "/info"),
    "dashboard": _each("GET", "/dashboard"),
    "live-metrics": _each("GET", "/api/v1/live_metrics"),
    "usage": _each("GET", "/v1/usage"),
    "lora-adapters": _each("GET", "/v1/lora_adapters"),
    "batch-files": _each("GET", "/v1/files"),
    "admin-route-refused": _each("POST", "/start_profile", b"{}"),
    "metrics": _each("GET", "/metrics"),
    "models": _each("GET", "/v1/models", **{"x-fake": "models"}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_requests_and_closed_connections_leave_no_reference_cycles(stack: Stack, scenario: str) -> None:
    garbage = _cyclic_garbage(stack, SCENARIOS[scenario])
    assert not garbage, f"left for the cyclic collector after {scenario}: {dict(garbage)}"


def test_a_pooled_engine_connection_keeps_nothing_of_the_requests_it_served() -> None:
    """The engine connection goes back to the pool after a stream; the client's connection, its
    protocol and its request's objects are freed when the client leaves, not when the pooled
    connection is next used (up to 100 of them, each holding a finished request's objects)."""
    protocols: list[weakref.ref] = []

    def wrap(app: Any) -> Any:
        async def recording(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                protocols.append(weakref.ref(scope[ABORT_HOOK].__self__))
            await app(scope, receive, send)

        return recording

    with FakeEngine() as engine, InProcessProxy(engine.url, uvloop=True, wrap=wrap) as proxy:
        gc.disable()  # what lives on is held, not waiting for a collection
        try:
            for body, fake in ((CHAT, "echo"), (STREAM, "stream")):  # the stream last: its connection idles
                # The whole answer read: the engine connection is pooled, not dropped.
                headers = {"Content-Type": "application/json", "x-fake": fake}
                (rid,) = exchange(proxy.port, [("POST", "/v1/chat/completions", body, headers)])
                proxy.logs.request(rid)
            wait_for(
                lambda: not proxy.server.server_state.connections, what="the client connections to close"
            )
            assert len(protocols) == 2
            assert any(isinstance(o, _Connection) and not o.closed for o in gc.get_objects()), "none pooled"
            wait_for(
                lambda: all(ref() is None for ref in protocols),
                timeout=2,
                what="the client protocols to be freed",
            )
        finally:
            gc.enable()
