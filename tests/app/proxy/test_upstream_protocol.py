"""The proxy's own HTTP/1.1 client (app/proxy/upstream.py) against a scripted engine, socket level.

Modelled on uvicorn's protocol tests (tests/protocols/test_http.py), turned around: the engine's
side is written byte for byte by each test (tests/raw_engine.py) because real vLLM cannot be made
to send a 1xx, break its chunking, reset mid-body, stall, stop reading or close an idle connection
on cue. Every test runs under asyncio (tests, `create_app()` under another server) and uvloop (what
the launcher runs).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from app.proxy.upstream import Upstream, UpstreamError
from raw_engine import RawConn, RawEngine, Request, ok, serve_forever


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    if request.param == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def client(url: str, **kw) -> Upstream:
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("first_byte_timeout", 2.0)
    kw.setdefault("idle_timeout", 2.0)
    return Upstream(url, **kw)


async def call(up: Upstream, method="POST", target="/t", body=b"{}", **kw) -> tuple[int, list, bytes]:
    resp = await up.request(method, target, [(b"content-type", b"application/json")], body, **kw)
    try:
        data = await resp.body()
    except BaseException:
        resp.close()
        raise
    resp.release()
    return resp.status, resp.headers, data


async def chunks(*parts: bytes):
    for part in parts:
        yield part


async def new_connection_used(engine: RawEngine, up: Upstream) -> bool:
    """True if the next request goes out on a connection the engine has not seen before."""
    before = len(engine.connections)
    previous = engine.script
    engine.script = lambda conn: serve_forever(conn, ok(b"next"))
    try:  # connections accepted before keep the script they were accepted with
        status, _, _ = await asyncio.wait_for(call(up, target="/next"), 5)
    finally:
        engine.script = previous
    assert status == 200
    return len(engine.connections) > before


# --- bodies both ways ---------------------------------------------------------------------------


def test_content_length_bodies_both_ways_and_the_connection_is_reused(run):
    async def main():
        async with RawEngine(lambda c: serve_forever(c, lambda r: ok(b"echo:" + r.body))) as engine:
            up = client(engine.url)
            for i in range(3):
                status, _, body = await call(up, body=b'{"n":%d}' % i)
                assert (status, body) == (200, b'echo:{"n":%d}' % i)
            assert len(engine.connections) == 1
            seen = engine.connections[0].requests[0]
            assert seen.header(b"content-length") == b"7" and not seen.chunked_on_wire
            assert seen.header(b"host") == f"127.0.0.1:{engine.port}".encode()
            await up.close()

    run(main())


def test_chunked_responses_are_reassembled_and_the_connection_is_reused(run):
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    async def main():
        async with RawEngine(lambda c: serve_forever(c, answer)) as engine:
            up = client(engine.url)
            for _ in range(2):
                assert (await call(up))[2] == b"hello world"
            assert len(engine.connections) == 1
            await up.close()

    run(main())


def test_streamed_request_bodies_go_chunked_without_a_length_and_sized_with_one(run):
    async def main():
        async with RawEngine(lambda c: serve_forever(c, lambda r: ok(r.body))) as engine:
            up = client(engine.url)
            assert (await call(up, body=chunks(b"ab", b"", b"cd")))[2] == b"abcd"
            assert (await call(up, body=chunks(b"ab", b"cd"), length=4))[2] == b"abcd"
            first, second = (r for conn in engine.connections for r in conn.requests)
            assert first.chunked_on_wire and first.header(b"content-length") is None
            assert not second.chunked_on_wire and second.header(b"content-length") == b"4"
            await up.close()

    run(main())


def test_large_bodies_flow_both_ways(run):
    """8 MiB up (streamed, in 64 KiB pieces) and 8 MiB back (chunked), read slower than it comes:
    both directions pause and resume, and every byte arrives in order."""
    size = 8 << 20
    piece = bytes(range(256)) * 256  # 64 KiB

    async def echo(conn: RawConn) -> None:
        request = await conn.read_request()
        assert request is not None and len(request.body) == size
        conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for offset in range(0, size, len(piece)):
            await conn.send(b"%x\r\n%b\r\n" % (len(piece), request.body[offset : offset + len(piece)]))
        await conn.send(b"0\r\n\r\n")
        await serve_forever(conn, ok())

    async def main():
        async with RawEngine(echo) as engine:
            up = client(engine.url)
            resp = await up.request("POST", "/big", [], chunks(*([piece] * (size // len(piece)))))
            got = []
            while chunk := await resp.read():
                got.append(chunk)
                await asyncio.sleep(0.001 if len(got) % 8 else 0.05)
            resp.release()
            assert b"".join(got) == piece * (size // len(piece))
            assert not await new_connection_used(engine, up)  # fully read: back in the pool
            await up.close()

    run(main())


def test_time_the_client_held_the_engine_back_is_not_counted_as_engine_silence(run):
    """The engine sends more than the client buffers (reading pauses), the client takes longer than
    the idle timeout to read it, the engine's next bytes come soon after reading resumed: that is
    not a silent engine. (The silence is counted from when reading resumed.)"""
    from app.proxy.upstream import _HIGH_WATER

    bulk = b"b" * (_HIGH_WATER + 1)  # the read with its last byte pauses reading: nothing left in flight

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(bulk) + 4, bulk))
        await asyncio.sleep(1.0)
        await conn.send(b"tail")

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url, idle_timeout=0.5)
            resp = await up.request("GET", "/t", [], None)
            await asyncio.sleep(0.8)  # a slow client downstream: the handler does not read meanwhile
            assert await resp.body() == bulk + b"tail"
            resp.release()
            await up.close()

    run(main())


# --- responses without a body, informational responses, read-to-close --------------------------


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
    ids=["100", "103", "100+102"],
)
@pytest.mark.parametrize("split", [True, False], ids=["separate-writes", "one-write"])
def test_informational_responses_are_skipped_and_the_next_request_gets_its_own_answer(run, interim, split):
    async def script(conn: RawConn) -> None:
        n = 0
        while await conn.read_request() is not None:
            n += 1
            if split:
                await conn.send(interim)
                await asyncio.sleep(0.05)
                await conn.send(ok(b"final-%d" % n))
            else:
                await conn.send(interim + ok(b"final-%d" % n))

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url)
            status, headers, body = await call(up)
            assert (status, body) == (200, b"final-1")
            assert b"link" not in dict(headers)
            assert (await call(up))[1:] == ([(b"content-length", b"7")], b"final-2")
            assert len(engine.connections) == 1
            await up.close()

    run(main())


def test_101_switching_protocols_is_refused_not_relayed(run):
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\nraw")
        await asyncio.sleep(10)

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url)
            with pytest.raises(UpstreamError) as err:
                await asyncio.wait_for(call(up), 5)
            assert err.value.kind == "protocol"
            assert await new_connection_used(engine, up)
            await up.close()

    run(main())


@pytest.mark.parametrize(
    "method,target,answer",
    [
        ("GET", "/204", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", "/304", b"HTTP/1.1 304 Not Modified\r\netag: x\r\ncontent-length: 10\r\n\r\n"),
        ("HEAD", "/head", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
        ("HEAD", "/head-chunked", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
    ],
)
def test_responses_without_a_body_end_at_their_headers(run, method, target, answer):
    async def script(conn: RawConn) -> None:
        await serve_forever(conn, lambda r: answer if r.target == target else ok(b"after"))

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url)
            status, _, body = await asyncio.wait_for(call(up, method, target, None), 5)
            assert body == b"" and status == int(answer[9:12])
            assert (await call(up, "GET", "/after", None))[2] == b"after"
            await up.close()

    run(main())


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",
    ],
    ids=["no-length", "http/1.0", "connection-close"],
)
def test_a_read_to_close_response_is_relayed_to_eof_and_its_connection_not_reused(run, head):
    async def script(conn: RawConn) -> None:
        if await conn.read_request() is None:
            return
        await conn.send(head + b"part one, ")
        await asyncio.sleep(0.05)
        await conn.send(b"part two")
        conn.close()

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url)
            status, _, body = await call(up)
            assert (status, body) == (200, b"part one, part two")
            assert await new_connection_used(engine, up)
            await up.close()

    run(main())


def test_a_read_to_close_response_cut_by_a_reset_is_an_error(run):
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\npart one")
        await asyncio.sleep(0.05)
        conn.reset()

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url)
            with pytest.raises(UpstreamError) as err:
                await call(up)
            assert err.value.kind == "protocol"
            await up.close()

    run(main())


# --- faults: resets, invalid framing, stalls ---------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [b"", b"HTTP/1.1 200 OK\r\ncontent-le"],
    ids=["before-the-head", "mid-head"],
)
@pytest.mark.parametrize("close", ["reset", "fin"])
def test_a_connection_lost_before_the_headers_end_is_a_protocol_error(run, sent, close):
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        if sent:
            await conn.send(sent)
            await asyncio.sleep(0.05)
        conn.reset() if close == "reset" else conn.close()

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url)
            with pytest.raises(UpstreamError) as err:
                await call(up)
            assert err.value.kind == "protocol"
            assert await new_connection_used(engine, up)
            await up.close()

    run(main())


BROKEN = {
    "length-short-fin": (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..", "fin", "protocol"),
    "length-short-reset": (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..", "reset", "protocol"),
    "chunked-cut-fin": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        "fin",
        "protocol",
    ),
    "chunked-cut-reset": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        "reset",
        "protocol",
    ),
    "chunked-mid-chunk": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\nhello",
        "fin",
        "protocol",
    ),
    "chunked-invalid-size": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        None,
        "protocol",
    ),
    "chunked-no-crlf": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX3\r\nabc\r\n",
        None,
        "protocol",
    ),
    "length-stall": (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..", "stall", "timeout"),
    "chunked-stall": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        "stall",
        "timeout",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_body_is_an_error_and_its_connection_never_pooled(run, case):
    sent, then, kind = BROKEN[case]

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(sent)
        await asyncio.sleep(0.05)
        if then == "reset":
            conn.reset()
        elif then == "fin":
            conn.close()
        else:  # stall (or invalid bytes): the client must act on its own
            await asyncio.sleep(10)

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url, idle_timeout=0.3)
            resp = await up.request("GET", "/t", [], None)
            got = b""
            started = time.monotonic()
            with pytest.raises(UpstreamError) as err:
                while chunk := await resp.read():
                    got += chunk
            assert err.value.kind == kind
            assert time.monotonic() - started < 3
            assert got in (b"", b"hello", b"only ten..")
            resp.release()  # even handed back by mistake, a broken connection is dropped
            if then not in ("fin", "reset"):  # the client itself must close it
                assert await engine.connections[0].wait_closed_by_peer(2)
            assert await new_connection_used(engine, up)
            await up.close()

    run(main())


def test_silence_before_the_headers_past_the_first_byte_timeout_is_a_timeout(run):
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await asyncio.sleep(10)

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url, first_byte_timeout=0.3)
            started = time.monotonic()
            with pytest.raises(UpstreamError) as err:
                await call(up)
            assert err.value.kind == "timeout" and time.monotonic() - started < 2
            assert await new_connection_used(engine, up)
            await up.close()

    run(main())


def test_bytes_nobody_asked_for_never_reach_the_next_request(run):
    """An engine that answers twice (as it does when it parsed one request as two): the second
    answer is not the next client's, and the connection is not used again."""

    async def script(conn: RawConn) -> None:
        if await conn.read_request() is None:
            return
        await conn.send(ok(b"one") + ok(b"smuggled"))
        await asyncio.sleep(0.05)
        await conn.send(ok(b"late"))
        await serve_forever(conn, ok(b"wrong connection"))

    async def main():
        async with RawEngine(script) as engine:
            up = client(engine.url)
            assert (await call(up))[2] == b"one"
            await asyncio.sleep(0.1)
            engine.script = lambda conn: serve_forever(conn, ok(b"two"))
            assert (await call(up))[2] == b"two"
            assert len(engine.connections) == 2
            await up.close()

    run(main())


# --- the pool -----------------------------------------------------------------------------------


def stale_after_one(conn: RawConn) -> asyncio.Future:
    """The first connection answers once, then takes the next request and closes without an
    answer: the engine's keep-alive timer fired just as the request went out."""

    async def script() -> None:
        await serve_forever_n(conn, 1)
        await conn.read_request()
        conn.close()

    return script()


async def serve_forever_n(conn: RawConn, n: int) -> None:
    for _ in range(n):
        if await conn.read_request() is None:
            return
        await conn.send(ok(b"first"))


def test_a_stale_pooled_connection_is_retried_once_for_a_bytes_body(run):
    async def main():
        async with RawEngine(stale_after_one) as engine:
            up = client(engine.url)
            assert (await call(up))[2] == b"first"
            engine.script = lambda conn: serve_forever(conn, lambda r: ok(b"retried:" + r.body))
            assert (await call(up, body=b'{"a":1}'))[2] == b'retried:{"a":1}'
            assert [len(c.requests) for c in engine.connections] == [2, 1]
            await up.close()

    run(main())


def test_a_streamed_body_is_never_sent_on_a_pooled_connection_that_may_be_stale(run):
    """A streamed body cannot be sent twice (it was read from the client as it went out), so it
    must not go out on a connection the engine may have closed a moment ago."""

    async def main():
        async with RawEngine(stale_after_one) as engine:
            up = client(engine.url)
            assert (await call(up))[2] == b"first"
            engine.script = lambda conn: serve_forever(conn, lambda r: ok(b"got:" + r.body))
            assert (await call(up, body=chunks(b"audio", b"bytes")))[2] == b"got:audiobytes"
            assert len(engine.connections[0].requests) == 1  # the pooled one never saw it
            assert (await call(up, body=b"{}"))[2] == b"got:{}"  # and the fresh one is pooled again
            assert len(engine.connections) == 2
            await up.close()

    run(main())


def test_after_a_burst_the_pool_keeps_at_most_max_idle_connections(run):
    async def slow(conn: RawConn) -> None:
        while (request := await conn.read_request()) is not None:
            await asyncio.sleep(0.1 if request.target == "/slow" else 0)
            await conn.send(ok())

    async def main():
        async with RawEngine(slow) as engine:
            up = client(engine.url, max_idle=2, demand_window=0.1)
            await asyncio.gather(*(call(up, target="/slow") for _ in range(6)))
            assert len(engine.connections) == 6
            await asyncio.sleep(0.25)  # the burst is two demand windows old
            await call(up)  # a connection back in the pool: the surplus over max_idle goes
            closed = await asyncio.gather(*(c.wait_closed_by_peer(0.5) for c in engine.connections))
            assert sum(closed) == 4
            await asyncio.gather(*(call(up) for _ in range(2)))
            assert len(engine.connections) == 6  # the two kept are reused
            await up.close()

    run(main())


def test_load_beyond_max_idle_reuses_its_connections_instead_of_reopening_them(run):
    """Eight clients, each sending its next request a loop iteration after its answer (as requests
    arriving from the network do), and the engine answering all eight at once: eight connections
    are back in the pool before any is asked for again. The pool keeps what the load uses; it
    used to close all but `max_idle` of them and open them again, a connection per request."""
    waiting: list[asyncio.Future] = []

    async def in_rounds(conn: RawConn) -> None:
        while (await conn.read_request()) is not None:
            turn = asyncio.get_running_loop().create_future()
            waiting.append(turn)
            if len(waiting) == 8:
                for t in waiting:
                    t.set_result(None)
                waiting.clear()
            await turn
            await conn.send(ok())

    async def main():
        async with RawEngine(in_rounds) as engine:
            up = client(engine.url, max_idle=2)

            async def user() -> None:
                for _ in range(10):
                    assert (await call(up))[0] == 200
                    await asyncio.sleep(0)

            await asyncio.gather(*(user() for _ in range(8)))
            assert len(engine.connections) == 8
            await up.close()

    run(main())


def test_idle_connections_expire_before_the_engines_keepalive_and_are_closed(run):
    async def main():
        async with RawEngine(lambda c: serve_forever(c, ok())) as engine:
            up = client(engine.url, keepalive=0.2)
            await asyncio.gather(*(call(up, target="/a") for _ in range(3)))
            n = len(engine.connections)
            await asyncio.sleep(0.3)
            await call(up)
            assert len(engine.connections) == n + 1  # none of the expired ones was used
            closed = await asyncio.gather(*(c.wait_closed_by_peer(1) for c in engine.connections[:n]))
            assert all(closed)
            await up.close()

    run(main())


# --- writing the request ------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["bytes", "streamed"])
def test_an_engine_that_stops_reading_the_body_times_out(run, body):
    size = 16 << 20

    async def script(conn: RawConn) -> None:
        await conn.read_head()
        await asyncio.sleep(30)  # reads nothing more

    async def main():
        async with RawEngine(script, receive_buffer=4096) as engine:
            up = client(engine.url, idle_timeout=0.5, first_byte_timeout=30)
            payload = b"x" * size if body == "bytes" else chunks(*[b"x" * 65536] * (size // 65536))
            started = time.monotonic()
            with pytest.raises(UpstreamError) as err:
                await asyncio.wait_for(call(up, body=payload), 10)
            assert err.value.kind == "timeout" and "reading" in str(err.value)
            assert time.monotonic() - started < 5
            assert await new_connection_used(engine, up)
            await up.close()

    run(main())


def test_an_answer_sent_before_the_body_was_read_is_returned_and_the_connection_dropped(run):
    async def script(conn: RawConn) -> None:
        await conn.read_head()
        await conn.send(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!")
        await asyncio.sleep(30)  # neither reads the rest nor closes

    async def main():
        async with RawEngine(script, receive_buffer=4096) as engine:
            up = client(engine.url, idle_timeout=5)
            status, _, body = await asyncio.wait_for(call(up, body=b"x" * (16 << 20)), 4)
            assert (status, body) == (413, b"too big!")
            assert await new_connection_used(engine, up)
            await up.close()

    run(main())


def test_a_request_to_a_closed_port_is_a_connect_error(run):
    from stack import free_port

    async def main():
        up = client(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(UpstreamError) as err:
            await call(up)
        assert err.value.kind == "connect"

    run(main())


def test_the_request_head_is_what_the_engine_parses(run):
    async def main():
        async with RawEngine(lambda c: serve_forever(c, ok())) as engine:
            up = client(engine.url)
            resp = await up.request("GET", "/v1/models?x=1", [(b"x-custom", b"v")], None)
            await resp.body()
            resp.release()
            seen: Request = engine.connections[0].requests[0]
            assert (seen.method, seen.target) == ("GET", "/v1/models?x=1")
            assert seen.header(b"x-custom") == b"v" and seen.header(b"content-length") is None
            await up.close()

    run(main())
