"""What a client of the proxy sees when the engine's HTTP goes wrong mid-answer, and when it is
unusual but valid (a 1xx first, a body delimited by the close).

The engine is scripted byte for byte (tests/raw_engine.py): real vLLM cannot be made to break its
framing, reset mid-body, stall, stop reading or send a 1xx on cue. The clients are real: httpx, the
OpenAI SDK, and aiohttp reading as `vllm bench serve` does.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from inproc import InProcessProxy
from raw_engine import RawConn, RawEngineThread, ok

JSON = b"content-type: application/json\r\n"
SSE = b"content-type: text/event-stream\r\n"
EVENT = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# mode -> (bytes sent after the request, then: "fin" | "reset" | "stall")
BROKEN_BODIES = {
    "length-short-fin": (b"HTTP/1.1 200 OK\r\n" + JSON + b'content-length: 100\r\n\r\n{"partial":', "fin"),
    "length-short-reset": (
        b"HTTP/1.1 200 OK\r\n" + JSON + b'content-length: 100\r\n\r\n{"partial":',
        "reset",
    ),
    "chunked-fin": (CHUNKED + JSON + b"\r\n" + chunk(b'{"partial":'), "fin"),
    "chunked-reset": (CHUNKED + JSON + b"\r\n" + chunk(b'{"partial":'), "reset"),
    "chunked-invalid": (CHUNKED + JSON + b"\r\n" + chunk(b'{"partial":') + b"zz\r\n", "stall"),
    "chunked-stall": (CHUNKED + JSON + b"\r\n" + chunk(b'{"partial":'), "stall"),
}
BROKEN_STREAMS = {  # each relays two whole events first
    "sse-fin": (CHUNKED + SSE + b"\r\n" + chunk(EVENT) + chunk(EVENT), "fin"),
    "sse-reset": (CHUNKED + SSE + b"\r\n" + chunk(EVENT) + chunk(EVENT), "reset"),
    "sse-invalid": (CHUNKED + SSE + b"\r\n" + chunk(EVENT) + chunk(EVENT) + b"5\r\ndata:XX", "stall"),
    "sse-stall": (CHUNKED + SSE + b"\r\n" + chunk(EVENT) + chunk(EVENT), "stall"),
    "sse-cut-mid-event": (CHUNKED + SSE + b"\r\n" + chunk(EVENT) + chunk(EVENT + EVENT[:40]), "fin"),
    "sse-read-to-close-reset": (b"HTTP/1.1 200 OK\r\n" + SSE + b"\r\n" + EVENT + EVENT, "reset"),
}


async def engine(conn: RawConn) -> None:
    """Answers each request as its `x-raw` header says."""
    while (request := await conn.read_head()) is not None:
        mode = (request.header(b"x-raw") or b"ok").decode()
        if mode == "stop-reading":
            await asyncio.sleep(60)
            return
        request = await conn.read_request()
        assert request is not None
        if mode in BROKEN_BODIES or mode in BROKEN_STREAMS:
            sent, then = BROKEN_BODIES.get(mode) or BROKEN_STREAMS[mode]
            await conn.send(sent)
            await asyncio.sleep(0.05)
            if then == "fin":
                conn.close()
            elif then == "reset":
                conn.reset()
            else:
                await asyncio.sleep(60)
            return
        if mode == "interim":
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0.05)
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nlink: </x>; rel=preload\r\n\r\n")
            await asyncio.sleep(0.05)
            await conn.send(ok(b'{"final":true}', headers=JSON))
        elif mode == "read-to-close":
            await conn.send(b"HTTP/1.1 200 OK\r\n" + JSON + b'\r\n{"whole":')
            await asyncio.sleep(0.05)
            await conn.send(b"true}")
            conn.close()
            return
        elif mode == "sse-read-to-close":
            await conn.send(b"HTTP/1.1 200 OK\r\n" + SSE + b"\r\n" + EVENT)
            await asyncio.sleep(0.05)
            await conn.send(EVENT + b"data: [DONE]\n\n")
            conn.close()
            return
        else:
            await conn.send(
                ok(orjson.dumps({"path": request.target, "body": request.body.decode()}), headers=JSON)
            )


@pytest.fixture(scope="module")
def raw():
    with RawEngineThread(engine, receive_buffer=4096) as e:
        yield e


@pytest.fixture(scope="module")
def proxy(raw):
    with InProcessProxy(raw.url, UPSTREAM_IDLE_TIMEOUT=1, SSE_KEEPALIVE_INTERVAL=0) as p:
        yield p


def stream(proxy, mode: str, rid: str, **body):
    return httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={"model": "m", **body},
        headers={"x-raw": mode, "x-request-id": rid},
        timeout=10,
    )


def no_error_records(proxy, rid: str, since: int) -> None:
    """Neither the proxy nor uvicorn logged an exception or an unfinished response for it (records
    from `since` on: the log sink is the process's)."""
    for rec in proxy.logs.records()[since:]:
        text = str(rec)
        assert not (rec.get("request_id") == rid and rec.get("event") == "unhandled error"), rec
        assert "returned without completing response" not in text, rec
        assert "Exception in ASGI application" not in text, rec


@pytest.mark.parametrize("mode", list(BROKEN_BODIES))
def test_a_body_the_engine_breaks_off_never_looks_complete_to_the_client(proxy, mode):
    rid = f"broken-{mode}"
    since = len(proxy.logs.records())
    started = time.monotonic()
    with stream(proxy, mode, rid) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            r.read()
    assert time.monotonic() - started < 5
    line = proxy.logs.request(rid)
    assert line["status"] == 200 and line["error"].startswith("response broken")
    no_error_records(proxy, rid, since)
    assert httpx.post(proxy.url + "/v1/chat/completions", json={"model": "m"}).status_code == 200


@pytest.fixture(scope="module")
def plain(raw):
    with InProcessProxy(raw.url, plain_uvicorn=True, UPSTREAM_IDLE_TIMEOUT=1, SSE_KEEPALIVE_INTERVAL=0) as p:
        yield p


@pytest.mark.parametrize("mode", ["chunked-fin", "sse-fin"])
def test_under_plain_uvicorn_a_broken_answer_does_not_look_complete_either(plain, mode):
    """`create_app()` served by uvicorn's own protocol (no abort hook): the handler returns without
    completing the response, and uvicorn closes the connection."""
    with stream(plain, mode, f"plain-{mode}", stream=mode.startswith("sse")) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            r.read()


@pytest.mark.parametrize("mode", list(BROKEN_STREAMS))
def test_a_stream_the_engine_breaks_off_ends_with_an_error_event_and_no_end(proxy, mode):
    rid = f"broken-{mode}"
    since = len(proxy.logs.records())
    body = b""
    with stream(proxy, mode, rid, stream=True) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for piece in r.iter_bytes():
                body += piece
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 3 and events[:2] == [EVENT.rstrip(b"\n")] * 2  # a broken-off event is not relayed
    error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
    assert error["type"] == "engine_error" and "mid-stream" in error["message"]
    assert proxy.logs.request(rid)["error"].startswith("stream broken")
    no_error_records(proxy, rid, since)


def test_the_openai_sdk_raises_on_a_broken_stream(proxy):
    import openai

    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    chunks = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for part in client.chat.completions.create(
            model="m", messages=[], stream=True, extra_headers={"x-raw": "sse-reset"}
        ):
            chunks.append(part)
    assert [c.choices[0].delta.content for c in chunks] == ["tok", "tok"]


def test_a_client_reading_as_vllm_bench_serve_does_fails_a_broken_stream(proxy):
    """`vllm bench serve` (vllm/benchmarks/lib/endpoint_request_func.py) reads with aiohttp's
    `iter_any()` and ignores events without `choices`: only the transport tells it the stream broke."""
    import aiohttp

    async def main() -> list[bytes]:
        got = []
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "m", "stream": True},
                headers={"x-raw": "sse-fin"},
            ) as resp,
        ):
            assert resp.status == 200
            async for piece in resp.content.iter_any():
                got.append(piece)
        return got

    with pytest.raises(aiohttp.ClientPayloadError):
        asyncio.run(main())


def test_interim_answers_are_not_relayed_as_the_answer(proxy):
    with httpx.Client(timeout=10) as client:  # one connection: the next answer must be its own
        r = client.post(proxy.url + "/v1/chat/completions", json={"model": "m"}, headers={"x-raw": "interim"})
        assert (r.status_code, r.json()) == (200, {"final": True})
        assert "link" not in r.headers
        r = client.post(proxy.url + "/v1/chat/completions", json={"model": "next"})
        assert r.status_code == 200 and orjson.loads(r.json()["body"]) == {"model": "next"}


@pytest.mark.parametrize("mode", ["read-to-close", "sse-read-to-close"])
def test_an_answer_delimited_by_the_engines_close_is_relayed_whole(proxy, mode):
    rid = f"eof-{mode}"
    with stream(proxy, mode, rid, stream=mode.startswith("sse")) as r:
        body = r.read()  # a clean end: httpx raises on an incomplete one
    assert r.status_code == 200
    if mode == "read-to-close":
        assert orjson.loads(body) == {"whole": True}
    else:
        assert body == EVENT + EVENT + b"data: [DONE]\n\n"
    assert proxy.logs.request(rid)["error"] is None


def test_an_engine_that_stops_reading_the_request_gets_a_504(proxy):
    """The engine takes the headers, then reads nothing: the body cannot all be written."""
    started = time.monotonic()
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "prompt": "x" * (16 << 20)},
        headers={"x-raw": "stop-reading", "x-request-id": "stop-reading"},
        timeout=20,
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "engine_timeout"
    assert time.monotonic() - started < 10
    assert "stopped reading" in proxy.logs.request("stop-reading")["error"]


async def _stale_after_one(conn: RawConn) -> None:
    """The first connection answers once, then takes the next request and closes unanswered (the
    engine's keep-alive timer fired as it went out); every later connection answers."""
    if conn is not _first.setdefault("conn", conn):
        while (request := await conn.read_request()) is not None:
            await conn.send(ok(b'{"got":%d}' % len(request.body), headers=JSON))
        return
    request = await conn.read_request()
    await conn.send(ok(b'{"got":0}', headers=JSON))
    await conn.read_request()
    conn.close()


_first: dict[str, RawConn] = {}


@pytest.mark.parametrize("kind", ["json", "streamed"])
def test_a_request_after_the_engine_closed_the_pooled_connection_is_answered(kind):
    """A JSON body is sent again on a fresh connection; a streamed one (an upload, read from the
    client as it goes) cannot be, so it never goes out on a pooled connection."""
    _first.clear()
    with RawEngineThread(_stale_after_one) as raw, InProcessProxy(raw.url) as proxy:
        assert httpx.post(proxy.url + "/v1/chat/completions", json={"model": "m"}).status_code == 200
        if kind == "json":
            r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "again"})
        else:
            r = httpx.post(
                proxy.url + "/v1/audio/transcriptions",
                content=iter([b"a" * 1000, b"b" * 1000]),
                headers={"content-type": "multipart/form-data; boundary=x"},
            )
        assert r.status_code == 200, r.text
        assert r.json()["got"] == (len(b'{"model":"again"}') if kind == "json" else 2000)
