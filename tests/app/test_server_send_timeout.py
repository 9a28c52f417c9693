"""CLIENT_SEND_TIMEOUT (app/server.py): a client that makes no room for its answer (reads nothing
while its socket is full) is cut after the timeout, whether the body goes out through the direct
relay (an SSE stream) or through `send` (a body with a Content-Length): the connection ends, the
engine's connection is closed (its work aborted), and the request's line says 499 and why. A
client that reads slowly but steadily is never cut.

The engine is scripted (tests/raw_engine.py): real vLLM cannot be made to push tens of MiB as fast
as the socket takes them; the clients are real sockets.
"""

from __future__ import annotations

import socket
import time

import pytest

from inproc import InProcessProxy
from raw_engine import RawConn, RawEngineThread, read_response, slow_client

EVENT = b"data: " + b"x" * (16 * 1024 - 8) + b"\n\n"  # 16 KiB
TOTAL = 48 << 20  # more than every buffer between the engine and a client that reads nothing
SEND_TIMEOUT = 1.0

cut: dict[str, float] = {}
"""When each stream's engine side saw the proxy close its connection."""


async def engine(conn: RawConn) -> None:
    while (request := await conn.read_request()) is not None:
        rid = (request.header(b"x-request-id") or b"").decode()
        total = int(request.header(b"x-total") or TOTAL)
        try:
            if request.header(b"x-raw") == b"length":  # one body of a known length: through `send`
                await conn.send(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                    b"content-length: %d\r\n\r\n" % total
                )
                for _ in range(total // len(EVENT)):
                    await conn.send(EVENT)
            else:  # an SSE stream: the direct relay
                await conn.send(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                for _ in range(total // len(EVENT)):
                    await conn.send(b"%x\r\n%b\r\n" % (len(EVENT), EVENT))
                await conn.send(b"0\r\n\r\n")
        except ConnectionError:
            cut[rid] = time.monotonic()
            return


@pytest.fixture(scope="module")
def raw():
    with RawEngineThread(engine) as e:
        yield e


@pytest.fixture(scope="module")
def proxy(raw):
    with InProcessProxy(raw.url, CLIENT_SEND_TIMEOUT=SEND_TIMEOUT, UPSTREAM_IDLE_TIMEOUT=30) as p:
        yield p


def request(proxy, rid: str, mode: str, total: int = TOTAL) -> socket.socket:
    return slow_client(proxy.port, rid, b"x-raw: %b\r\nx-total: %d\r\n" % (mode.encode(), total))


def closed_by_proxy(sock: socket.socket, within: float) -> bool:
    """Drain what is buffered; True if the proxy ended the connection within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("mode", ["sse", "length"])
def test_a_client_that_reads_nothing_is_cut_after_the_send_timeout(proxy, mode):
    rid = f"stalled-{mode}"
    sock = request(proxy, rid, mode)
    try:
        started = time.monotonic()
        deadline = started + SEND_TIMEOUT + 10
        while rid not in cut and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rid in cut, "the engine's connection stayed open behind a client that reads nothing"
        assert cut[rid] - started >= SEND_TIMEOUT  # not before the client had its time
        assert closed_by_proxy(sock, 5), "the client's connection stayed open"
    finally:
        sock.close()
    line = proxy.logs.request(rid)
    assert line["status"] == 499
    assert "CLIENT_SEND_TIMEOUT" in line["error"], line["error"]


@pytest.mark.parametrize("mode", ["sse", "length"])
def test_a_client_reading_slowly_but_steadily_is_never_cut(proxy, mode):
    """8 MiB read 64 KiB at a time, 30 ms apart: several times the send timeout, and whole."""
    rid = f"steady-{mode}"
    total = 8 << 20
    sock = request(proxy, rid, mode, total)
    started = time.monotonic()
    try:
        body = read_response(sock, 64 * 1024, pause=0.03, timeout=10)
    finally:
        sock.close()
    assert body.done, "the proxy ended the connection of a client that reads"
    assert time.monotonic() - started > 3 * SEND_TIMEOUT  # it really was slow
    payload = total // len(EVENT) * len(EVENT)
    assert body.size == payload
    assert proxy.logs.request(rid)["status"] == 200 and rid not in cut


def test_the_settings_default_is_the_servers():
    from app.server import HttpProtocol
    from app.settings import Settings

    assert Settings.model_fields["CLIENT_SEND_TIMEOUT"].default == HttpProtocol.send_timeout
