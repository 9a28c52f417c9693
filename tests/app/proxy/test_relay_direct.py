"""A stream relayed straight from the engine's connection into the client's (app/server.py
RELAY_HOOK, `UpstreamResponse.relay`): no `send` and no task wake-up per event, with every
guarantee of the relay through `send` kept: bytes as the engine sent them, as they arrive, a
hang-up closes the engine's connection, and a client that reads slowly holds the engine back
instead of making the proxy buffer.

The engine is scripted (tests/raw_engine.py): real vLLM cannot be made to push 64 MiB as fast as
the socket takes it, nor to pace its events exactly; the clients are real sockets and httpx.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from inproc import InProcessProxy, count_slow_reads
from raw_engine import RawConn, RawEngineThread, read_response, slow_client, stream_request

SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
BIG_EVENT = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"  # 64 KiB
BIG_TOTAL = 64 << 20  # what the engine would push if nothing held it back
PACED = 40  # events of a paced stream


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def token(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"text":"t%d","finish_reason":null}]}\n\n' % i


def delta(i: int) -> bytes:
    return (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"t%d"}\n\n'
        % i
    )


RESPONSE_COMPLETED = (
    b"event: response.completed\n"
    b'data: {"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":40}}}\n\n'
)

pushed: dict[str, int] = {}
"""Bytes each `big` stream's engine side got into its socket (the proxy took them)."""
cut: dict[str, float] = {}
"""When each `endless` stream's engine side saw its connection closed by the proxy."""


async def engine(conn: RawConn) -> None:
    while (request := await conn.read_request()) is not None:
        mode = (request.header(b"x-raw") or b"paced").decode()
        rid = (request.header(b"x-request-id") or b"").decode()
        await conn.send(SSE_HEAD)
        if mode == "paced":  # one event per write, 5 ms apart, as vLLM writes tokens
            for i in range(PACED):
                await conn.send(chunk(token(i)))
                await asyncio.sleep(0.005)
            await conn.send(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        elif mode == "responses":  # the Responses API's events, paced, its closing event last
            for i in range(PACED):
                await conn.send(chunk(delta(i)))
                await asyncio.sleep(0.005)
            await conn.send(chunk(RESPONSE_COMPLETED) + b"0\r\n\r\n")
        elif mode == "endless":  # until the proxy hangs up
            i = 0
            try:
                while True:
                    await conn.send(chunk(token(i)))
                    i += 1
                    await asyncio.sleep(0.01)
            except ConnectionError:
                cut[rid] = time.monotonic()
            return
        elif mode == "big":  # as fast as the proxy takes it
            pushed[rid] = 0
            while pushed[rid] < BIG_TOTAL:
                await conn.send(chunk(BIG_EVENT))
                pushed[rid] += len(BIG_EVENT)
            await conn.send(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def counting(sends: dict[str, int]):
    """Wraps the app: counts the `send` calls of each request (by its x-request-id header)."""

    def wrap(app: Any) -> Any:
        async def asgi(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            rid = dict(scope["headers"]).get(b"x-request-id", b"").decode()
            sends[rid] = 0

            async def counted(message: dict) -> None:
                sends[rid] += 1
                await send(message)

            await app(scope, receive, counted)

        return asgi

    return wrap


SENDS: dict[str, int] = {}


@pytest.fixture(scope="module")
def raw():
    with RawEngineThread(engine) as e:
        yield e


@pytest.fixture(scope="module")
def proxy(raw):
    with InProcessProxy(
        raw.url, wrap=counting(SENDS), UPSTREAM_IDLE_TIMEOUT=1, SSE_KEEPALIVE_INTERVAL=0
    ) as p:
        yield p


def post(proxy, mode: str, rid: str):
    return httpx.stream(
        "POST",
        proxy.url + "/v1/completions",
        json={"model": "m", "prompt": "x", "stream": True},
        headers={"x-raw": mode, "x-request-id": rid},
        timeout=30,
    )


def test_a_paced_stream_goes_out_event_by_event_with_only_its_start_and_end_sent(proxy):
    """40 events 5 ms apart: the client gets each as it comes (the first long before the end), the
    bytes are the engine's, and the app called `send` twice (headers; last bytes with the end), not
    once per event as a relay through `send` does."""
    started = time.monotonic()
    arrivals = []
    body = b""
    with post(proxy, "paced", "paced-1") as r:
        assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
        for piece in r.iter_raw():
            arrivals.append(time.monotonic() - started)
            body += piece
    assert body == b"".join(token(i) for i in range(PACED)) + b"data: [DONE]\n\n"
    assert len(arrivals) >= PACED // 4  # not one lump at the end
    assert arrivals[0] < arrivals[-1] - 0.1
    assert SENDS["paced-1"] == 2
    line = proxy.logs.request("paced-1")
    assert line["status"] == 200 and line["error"] is None and line["ttft_ms"] is not None


def test_a_paced_streams_events_pass_on_without_the_parser_or_the_sink(proxy, monkeypatch):
    """Once the first token is out, each read of whole `data:` events goes to the client as the
    engine framed it (app/proxy/passthrough.py): of the stream's 41 reads, only its start and its
    end take the slow way (the response parser, then the sink); the client's bytes are the same."""
    slow = count_slow_reads(monkeypatch)
    with post(proxy, "paced", "passed-1") as r:
        body = r.read()
    assert body == b"".join(token(i) for i in range(PACED)) + b"data: [DONE]\n\n"
    assert 1 <= sum(b"data: " in data for data in slow) <= 4, slow
    line = proxy.logs.request("passed-1")
    assert line["status"] == 200 and line["error"] is None and line["ttft_ms"] is not None


def test_a_responses_api_stream_passes_on_too_and_its_closing_event_still_ends_it(proxy, monkeypatch):
    """`event:` streams (Responses, Messages APIs) pass on like `data:` ones; their closing event
    goes the slow way, where the sink marks the answer whole and reads its usage."""
    slow = count_slow_reads(monkeypatch)
    with post(proxy, "responses", "responses-1") as r:
        body = r.read()
    assert body == b"".join(delta(i) for i in range(PACED)) + RESPONSE_COMPLETED
    assert 1 <= sum(b"event: " in data for data in slow) <= 4, slow
    line = proxy.logs.request("responses-1")
    assert line["status"] == 200 and line["error"] is None and line["ttft_ms"] is not None
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 40)


def test_events_passed_on_count_as_sent_for_the_keepalive(raw):
    """A stream sending an event every 5 ms is never silent for a 50 ms keep-alive interval: no
    ping may land between its events, whichever way they went to the client."""
    with InProcessProxy(raw.url, SSE_KEEPALIVE_INTERVAL=0.05) as p, post(p, "paced", "ka-1") as r:
        body = r.read()
    assert body == b"".join(token(i) for i in range(PACED)) + b"data: [DONE]\n\n"


def test_a_client_hanging_up_mid_stream_closes_the_engines_connection(proxy):
    with post(proxy, "endless", "hangup-1") as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # three events and their blank lines
        hung_up = time.monotonic()
    assert sum(line.startswith("data: ") for line in got) == 3
    deadline = hung_up + 5
    while "hangup-1" not in cut and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "hangup-1" in cut, "the engine's connection stayed open after the client hung up"
    assert proxy.logs.request("hangup-1")["status"] == 499


def test_a_client_hanging_up_with_a_request_pipelined_behind_its_stream_aborts_the_stream(proxy):
    """uvicorn keeps only the newest request of a connection: the stream being answered, with a
    second request pipelined behind it, was not told of the hang-up and the engine went on."""
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            stream_request("piped-1", b"x-raw: endless\r\n")
            + stream_request("piped-2", b"x-raw: endless\r\n")
        )
        sock.settimeout(10)
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(65536)
    hung_up = time.monotonic()
    while "piped-1" not in cut and time.monotonic() < hung_up + 5:
        time.sleep(0.02)
    assert "piped-1" in cut, "the engine's connection stayed open after the client hung up"
    assert proxy.logs.request("piped-1")["status"] == 499


def _settled(rid: str, quiet: float = 1.0, timeout: float = 20) -> int:
    """The engine's pushed bytes once they stop growing for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = pushed.get(rid, 0)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
        time.sleep(0.05)
    return pushed.get(rid, 0)


def test_a_client_that_does_not_read_holds_the_engine_back_and_the_proxy_buffers_little(proxy):
    """The client reads nothing while the engine has 64 MiB to send: the proxy stops reading the
    engine once the client's socket is full, so the engine gets only what the sockets' kernel
    buffers and the proxy's bounded ones hold (a few MiB) into its socket, not the 64 MiB a
    proxy that kept reading would queue in its memory. Then the client reads: everything arrives,
    the stream ends cleanly, and the engine held back for seconds (longer than
    UPSTREAM_IDLE_TIMEOUT, 1 s) is not taken for an engine gone silent."""
    sock = slow_client(proxy.port, "slow-reader", b"x-raw: big\r\n")
    try:
        time.sleep(0.5)
        held = _settled("slow-reader")
        time.sleep(1.5)  # past the idle timeout while held back
        assert held < 24 << 20, f"the engine pushed {held >> 20} MiB into a proxy whose client reads nothing"
        body = read_response(sock)
    finally:
        sock.close()
    assert body.done and body.tail.endswith(b"data: [DONE]\n\n")
    assert body.size == BIG_TOTAL + len(b"data: [DONE]\n\n")
    line = proxy.logs.request("slow-reader")
    assert line["status"] == 200 and line["error"] is None


def test_several_streams_at_once_each_get_their_own_bytes(proxy):
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        with post(proxy, "paced", f"many-{i}") as r:
            results[i] = r.read()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    expected = b"".join(token(i) for i in range(PACED)) + b"data: [DONE]\n\n"
    assert results == dict.fromkeys(range(8), expected)
