"""The proxy's HTTP/1.1 server protocol (app/server.py) as a socket-level test matrix: what any
implementation of it must do, whatever it is built on (uvicorn's `tests/protocols/test_http.py`,
ported to real sockets, without websockets, plus what the proxy adds to the scope).

Each test serves a small ASGI app of its own with `server_config` + `ProxyServer` on uvloop, in a
thread of this process, and talks to it over a real TCP connection: raw bytes out, the answers
parsed by hand from the bytes that come back (`Client`), so that framing errors show.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from app.server import HANGUP_HOOK, ProxyServer, server_config
from stack import free_port, wait_for

App = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

TIMEOUT = 5.0
"""Seconds a socket read may block before the test fails (nothing here should take that long)."""


# --- the client side: raw sockets, answers parsed by hand -------------------------------------------


class Incomplete(AssertionError):
    """The server closed the connection before the answer was complete."""


@dataclass
class Response:
    version: bytes
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunks: list[bytes] | None = None
    """The chunk sizes' data, in order, for a chunked answer (the last, empty one not included)."""
    raw: bytes = b""
    """The answer's bytes as they came, head and (framed) body."""

    def header(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def closes(self) -> bool:
        return any(b"close" in [t.strip().lower() for t in v.split(b",")] for v in self.all(b"connection"))


class Client:
    """One connection to the server, read through a buffer so that pipelined answers parse apart."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connecting, so that the window is offered at this size
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.connect(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _fill(self, size: int = 1 << 20) -> bool:
        """Read once more into the buffer; False at the end of the connection."""
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(size)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_until(self, sep: bytes) -> bytes:
        """Up to and including `sep`."""
        start = 0
        while (i := self.buf.find(sep, start)) < 0:
            start = max(0, len(self.buf) - len(sep) + 1)
            if not self._fill():
                raise Incomplete(f"connection ended before {sep!r}; got {bytes(self.buf[:300])!r}")
        return self._take(i + len(sep))

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise Incomplete(f"connection ended {n - len(self.buf)} bytes short")
        return self._take(n)

    def wait_for_bytes(self, data: bytes) -> None:
        """Read (without consuming) until `data` is in the buffer."""
        while data not in self.buf:
            if not self._fill():
                raise Incomplete(f"connection ended before {data!r}; got {bytes(self.buf[:300])!r}")

    def head(self) -> Response:
        raw = self.read_until(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        version, status, *_ = lines[0].split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), lines[0]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep and name == name.strip() and name, f"not a header line: {line!r}"
            headers.append((name.lower(), value.strip(b" \t")))
        return Response(version, int(status), headers, raw=raw)

    def response(self, method: bytes = b"GET") -> Response:
        """The next answer, whole (interim 1xx answers are answers of their own)."""
        resp = self.head()
        if method == b"HEAD" or resp.status < 200 or resp.status in (204, 304):
            return resp
        encodings = [t.strip().lower() for v in resp.all(b"transfer-encoding") for t in v.split(b",")]
        lengths = resp.all(b"content-length")
        if encodings:
            assert encodings == [b"chunked"], resp.headers
            assert not lengths, "both content-length and transfer-encoding"
            resp.chunks = []
            raw = bytearray()
            while True:
                size_line = self.read_until(b"\r\n")
                raw += size_line
                size = int(size_line[:-2].split(b";")[0], 16)
                if size == 0:
                    break
                data = self.read_exactly(size + 2)
                assert data.endswith(b"\r\n"), f"chunk not followed by CRLF: {data[-10:]!r}"
                raw += data
                resp.chunks.append(data[:-2])
            while (trailer := self.read_until(b"\r\n")) != b"\r\n":
                raw += trailer
            raw += b"\r\n"
            resp.body = b"".join(resp.chunks)
        elif lengths:
            assert len(set(lengths)) == 1, lengths
            resp.body = raw = self.read_exactly(int(lengths[0]))
        else:  # delimited by the end of the connection
            while self._fill():
                pass
            resp.body = raw = self._take(len(self.buf))
        resp.raw += bytes(raw)
        return resp

    def rest(self) -> bytes:
        """Everything until the server ends the connection (fails if it does not in TIMEOUT)."""
        while self._fill():
            pass
        return self._take(len(self.buf))

    def closed(self) -> bool:
        """The server ended the connection, with nothing more sent."""
        return self.rest() == b""

    def nothing_within(self, seconds: float) -> bool:
        """Nothing arrives, and the connection stays open, for `seconds` (a negative check)."""
        if self.buf or self.eof:
            return False
        self.sock.settimeout(seconds)
        try:
            self._fill()
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)
        return False

    def next_answer(self, data: bytes) -> Response | None:
        """Send `data` (a request) and read its answer; None if the server closed the connection
        instead (before or after it came)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send(data)
        try:
            return self.response()
        except Incomplete:
            assert not self.buf, bytes(self.buf[:300])
            return None


def request(
    method: str = "GET",
    path: str = "/",
    headers: tuple[str, ...] = (),
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    """A request's bytes; a `body` gets its content-length."""
    lines = [f"{method} {path} HTTP/{version}", "host: test", *headers]
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


GET = request()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


# --- the server side: the app, served on a thread with uvloop ------------------------------------


class Gate:
    """What an app waits on until the test opens it (from the test's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._open:
                return
            future = loop.create_future()
            self._waiters.append((loop, future))
        await future

    def open(self) -> None:
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is gone
                loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))


def with_lifespan(app: App) -> App:
    """The app, answering the lifespan protocol (`server_config` turns it on)."""

    async def asgi(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await app(scope, receive, send)

    return asgi


class Served:
    def __init__(self, app: App, keep_alive: float | None, client_timeout: float) -> None:
        self.port = free_port()
        config = server_config(with_lifespan(app), "127.0.0.1", self.port, client_timeout)
        if keep_alive is not None:
            config.timeout_keep_alive = keep_alive
        self.server = ProxyServer(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.clients: list[Client] = []

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self.server.serve())

    def start(self) -> None:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), what="the server to start")
        assert self.server.started, "the server did not start"

    def connect(self, rcvbuf: int | None = None) -> Client:
        client = Client(self.port, rcvbuf)
        self.clients.append(client)
        return client

    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def stop(self) -> None:
        """Close the clients' connections and tell the server to stop (`join` waits for it)."""
        for client in self.clients:
            client.close()
        self.server.should_exit = True

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server did not stop"


@dataclass
class Harness:
    servers: list[Served] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)

    def serve(self, app: App, keep_alive: float | None = None, client_timeout: float = 30) -> Served:
        served = Served(app, keep_alive, client_timeout)
        self.servers.append(served)
        served.start()
        return served

    def gate(self) -> Gate:
        gate = Gate()
        self.gates.append(gate)
        return gate

    def close(self) -> None:
        for gate in self.gates:  # no app is left waiting through the server's shutdown
            gate.open()
        for served in self.servers:
            served.stop()


@pytest.fixture(scope="module")
def stopping():
    """The servers told to stop: each takes a few tenths of a second (uvicorn's shutdown), which
    they take side by side while the next tests run; all of them must have stopped at the end."""
    servers: list[Served] = []
    yield servers
    for served in servers:
        served.join()


@pytest.fixture
def harness(stopping):
    h = Harness()
    yield h
    h.close()
    stopping.extend(h.servers)


# --- toy apps ---------------------------------------------------------------------------------------


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def respond(
    send: Any,
    body: bytes = b"Hello, world",
    status: int = 200,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    length: bool = True,
) -> None:
    """`body` in one piece, with its content-length if `length`."""
    out = list(headers)
    if length:
        out.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


def answer(
    body: bytes = b"Hello, world",
    status: int = 200,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    length: bool = True,
    seen: list[dict] | None = None,
) -> App:
    """An app that reads the request and `respond`s; the scopes it was called with go into `seen`."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if seen is not None:
            seen.append(scope)
        await read_body(receive)
        await respond(send, body, status, headers, length)

    return app


async def echo(scope: dict, receive: Any, send: Any) -> None:
    """Answers `<path> <body>` with its content-length."""
    body = scope["path"].encode() + b" " + await read_body(receive)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


async def stream(scope: dict, receive: Any, send: Any) -> None:
    """Answers `hello world` in two pieces and an empty end, without a content-length."""
    await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": True})  # not the end
    await send({"type": "http.response.body", "body": b" world", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


# --- keep-alive and closing -------------------------------------------------------------------------


def test_a_keep_alive_connection_answers_a_second_request_on_the_same_socket(harness):
    seen: list[dict] = []
    served = harness.serve(answer(seen=seen))
    client = served.connect()
    for _ in range(2):
        client.send(GET)
        resp = client.response()
        assert (resp.version, resp.status, resp.body) == (b"HTTP/1.1", 200, b"Hello, world")
        assert not resp.closes
    assert len(seen) == 2 and seen[0]["client"] == seen[1]["client"]  # one connection


@pytest.mark.parametrize("body", [None, b'{"hello": "world"}'], ids=["get", "post"])
def test_connection_close_from_the_client_ends_the_connection_after_the_answer(harness, body):
    """A request pipelined behind it in the same send is not answered (nor passed to the app)."""
    seen: list[dict] = []
    served = harness.serve(answer(seen=seen))
    client = served.connect()
    method = "GET" if body is None else "POST"
    client.send(request(method, "/first", ("connection: close",), body) + request("GET", "/second"))
    resp = client.response()
    assert (resp.status, resp.body) == (200, b"Hello, world")
    assert resp.closes  # RFC 9112 9.6: the server SHOULD say so
    assert client.closed()
    assert [s["path"] for s in seen] == ["/first"]


def test_the_apps_own_connection_close_header_closes_the_connection_after_the_answer(harness):
    served = harness.serve(answer(headers=((b"connection", b"close"),)))
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert resp.status == 200 and resp.all(b"connection") == [b"close"]  # not doubled
    assert client.closed()


def test_an_idle_keep_alive_connection_is_closed_after_timeout_keep_alive(harness):
    served = harness.serve(answer(), keep_alive=0.3)
    client = served.connect()
    sent = time.monotonic()  # the timer cannot have started before this
    client.send(GET)
    assert client.response().status == 200
    assert client.closed()
    assert 0.25 <= time.monotonic() - sent < 2.5


def test_a_request_slower_than_the_keep_alive_timeout_is_still_answered(harness):
    async def slow(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await asyncio.sleep(0.6)  # twice the keep-alive timeout
        await answer()(scope, receive, send)

    served = harness.serve(slow, keep_alive=0.3)
    client = served.connect()
    client.send(request("GET", "/slow"))
    assert client.response().body == b"Hello, world"
    client.send(GET)  # and the connection is still there
    assert client.response().body == b"Hello, world"


# --- pipelining -------------------------------------------------------------------------------------


def test_three_pipelined_requests_in_one_send_are_answered_in_order_each_complete(harness):
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/2":  # one chunked answer among answers with a content-length
            await stream(scope, receive, send)
        else:
            await echo(scope, receive, send)

    served = harness.serve(app)
    client = served.connect()
    client.send(
        request("POST", "/1", body=b"one") + request("GET", "/2") + request("POST", "/3", body=b"three")
    )
    first, second, third = client.response(), client.response(), client.response()
    assert (first.body, second.body, third.body) == (b"/1 one", b"hello world", b"/3 three")
    assert second.header(b"transfer-encoding") == b"chunked"
    client.send(request("GET", "/4"))  # still open, nothing left over
    assert client.response().body == b"/4 "


def test_a_pipelined_request_waits_for_the_streamed_answer_ahead_of_it(harness):
    gate = harness.gate()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] != "/slow":
            await echo(scope, receive, send)
            return
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await gate.wait()
        await send({"type": "http.response.body", "body": b"second", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    served = harness.serve(app)
    client = served.connect()
    client.send(request("GET", "/slow") + request("POST", "/fast", body=b"x"))
    client.wait_for_bytes(b"first\r\n")  # the slow answer is under way, then held
    assert client.buf.count(b"HTTP/1.1 ") == 1, bytes(client.buf)
    gate.open()
    slow = client.response()
    assert (slow.body, slow.chunks) == (b"firstsecond", [b"first", b"second"])
    assert client.response().body == b"/fast x"


# --- request bodies ---------------------------------------------------------------------------------


def test_a_post_body_with_content_length_reaches_the_app(harness):
    served = harness.serve(echo)
    client = served.connect()
    client.send(request("POST", "/p", ("content-type: application/json",), b'{"hello": "world"}'))
    assert client.response().body == b'/p {"hello": "world"}'


def test_a_get_without_body_is_one_http_request_message_without_more_body(harness):
    messages: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        messages.append(await receive())
        await respond(send)

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    assert client.response().status == 200
    assert messages[0]["type"] == "http.request"
    assert messages[0].get("body", b"") == b"" and not messages[0].get("more_body", False)


def test_a_chunked_request_body_reaches_the_app_whole(harness):
    """With a chunk extension and a trailer; the next request on the connection parses after it."""
    served = harness.serve(echo)
    client = served.connect()
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
    client.send(request("POST", "/c", ("transfer-encoding: chunked",)) + body)
    assert client.response().body == b"/c hello world"
    client.send(request("POST", "/d", ("transfer-encoding: chunked",)) + chunked(b"again"))
    assert client.response().body == b"/d again"


def test_a_1_mib_body_arriving_in_pieces_is_read_through_several_receive_calls(harness):
    messages: list[tuple[int, bool]] = []
    digest = hashlib.sha256()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            digest.update(message.get("body", b""))
            messages.append((len(message.get("body", b"")), message.get("more_body", False)))
            if not message.get("more_body", False):
                break
        await respond(send, b"got it")

    served = harness.serve(app)
    client = served.connect()
    body = bytes(range(256)) * 4096  # 1 MiB
    client.send(request("POST", "/big", (f"content-length: {len(body)}",)))
    for i in range(0, len(body), 64 * 1024):
        client.send(body[i : i + 64 * 1024])
    assert client.response().body == b"got it"
    assert sum(n for n, _ in messages) == len(body)
    assert digest.digest() == hashlib.sha256(body).digest()
    assert len(messages) >= 2
    assert [more for _, more in messages] == [True] * (len(messages) - 1) + [False]


def test_a_request_arriving_a_few_bytes_at_a_time_is_parsed_whole(harness):
    served = harness.serve(echo)
    client = served.connect()
    data = request("POST", "/frag?param=" + "q" * 10, ("x-a: 1",), b"fragmented body")
    for i in range(0, len(data), 7):
        client.send(data[i : i + 7])
    assert client.response().body == b"/frag fragmented body"


def body_recorder() -> tuple[App, list[dict], threading.Event]:
    """An app that records what `receive` gives it until the body's end or a disconnect, then sets
    the event (it never answers)."""
    got: list[dict] = []
    done = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        try:
            while True:
                message = await receive()
                got.append(message)
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    return
        finally:
            done.set()

    return app, got, done


def test_a_client_hanging_up_mid_body_ends_receive_with_http_disconnect(harness):
    app, got, done = body_recorder()
    served = harness.serve(app)
    client = served.connect()
    client.send(request("POST", "/", ("content-length: 100",)) + b"0123456789")
    wait_for(lambda: got, what="the first body bytes to reach the app")
    client.close()
    assert done.wait(TIMEOUT)
    assert got[-1] == {"type": "http.disconnect"}
    assert b"".join(m.get("body", b"") for m in got) == b"0123456789"


def test_broken_chunking_mid_body_ends_receive_with_http_disconnect_and_the_client_gets_a_400(harness):
    """The app is reading the body when the chunking breaks: its receive() ends with a disconnect,
    and the client gets the OpenAI-shaped 400 (the app had not answered yet), then the end."""
    app, got, done = body_recorder()
    served = harness.serve(app)
    client = served.connect()
    client.send(request("POST", "/", ("transfer-encoding: chunked",)) + b"5\r\nhello\r\n")
    wait_for(lambda: got, what="the first chunk to reach the app")
    client.send(b"zz\r\n")  # not a chunk size
    assert done.wait(TIMEOUT)
    assert got[-1] == {"type": "http.disconnect"}
    resp = client.response()
    assert resp.status == 400 and "error" in json.loads(resp.body)
    assert client.closed()


def test_an_answer_before_the_request_body_is_read_never_parses_that_body_as_a_request(harness):
    """The app answers without reading a body that looks like a request: the server reads past it
    (the next request is answered) or closes the connection; the body never reaches the app."""
    seen: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope)
        body = scope["path"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    served = harness.serve(app)
    client = served.connect()
    smuggled = request("GET", "/smuggled")
    client.send(request("POST", "/early", (f"content-length: {len(smuggled)}",)))
    assert client.response().body == b"/early"  # answered before the body was sent
    following = client.next_answer(smuggled + request("GET", "/next"))
    assert following is None or following.body == b"/next"
    assert "/smuggled" not in [s["path"] for s in seen]


# --- Expect: 100-continue ---------------------------------------------------------------------------


def test_100_continue_is_written_only_when_the_app_calls_receive(harness):
    entered = threading.Event()
    gate = harness.gate()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        entered.set()
        await gate.wait()
        await echo(scope, receive, send)

    served = harness.serve(app)
    client = served.connect()
    client.send(request("POST", "/e", ("expect: 100-continue", "content-length: 18")))
    assert entered.wait(TIMEOUT)
    assert client.nothing_within(0.1)  # the app has not asked for the body yet
    gate.open()
    interim = client.response()
    assert (interim.status, interim.headers) == (100, [])
    client.send(b'{"hello": "world"}')
    assert client.response().body == b'/e {"hello": "world"}'


def test_100_continue_is_not_written_when_the_app_answers_without_reading(harness):
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    served = harness.serve(app)
    client = served.connect()
    client.send(request("POST", "/e", ("expect: 100-continue", "content-length: 18")))
    resp = client.response()
    assert resp.status == 204
    assert b"100 Continue" not in resp.raw and b"100 Continue" not in client.buf


# --- HEAD, 204, 304 ---------------------------------------------------------------------------------


def test_a_head_answer_keeps_the_content_length_and_sends_no_body(harness):
    served = harness.serve(answer(b"Hello, world", headers=((b"content-type", b"text/plain"),)))
    client = served.connect()
    client.send(request("HEAD"))
    head = client.response(b"HEAD")
    assert (head.status, head.header(b"content-length")) == (200, b"12")
    client.send(GET)  # the next bytes are the next answer's: no body came after the head
    assert client.response().body == b"Hello, world"


def test_a_head_answer_to_a_streamed_body_sends_no_body(harness):
    served = harness.serve(stream)
    client = served.connect()
    client.send(request("HEAD"))
    assert client.response(b"HEAD").status == 200
    client.send(GET)
    assert client.response().body == b"hello world"


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_answers_have_no_body_and_no_chunked_framing(harness, status):
    served = harness.serve(answer(b"", status=status, length=False))
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert resp.status == status
    assert resp.header(b"transfer-encoding") is None and resp.header(b"content-length") in (None, b"0")
    client.send(GET)  # nothing was left between the two answers
    assert client.response().status == status


def test_body_bytes_an_app_sends_with_a_204_are_never_written(harness):
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"oops"})

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    try:
        resp = client.response()
    except Incomplete:  # the app's error ended the connection before even the head left
        assert not client.buf
        return
    assert resp.status == 204
    following = client.next_answer(GET)  # the connection ends, or the next answer comes right after
    assert following is None or following.status == 204


# --- response framing -------------------------------------------------------------------------------


def test_an_answer_without_content_length_is_chunked_and_ends_with_the_last_chunk(harness):
    """An empty body message in the middle does not end it."""
    served = harness.serve(stream)
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert resp.header(b"transfer-encoding") == b"chunked" and resp.header(b"content-length") is None
    assert resp.body == b"hello world" and all(resp.chunks)
    assert resp.raw.endswith(b"\r\n0\r\n\r\n")
    client.send(GET)
    assert client.response().body == b"hello world"


def test_an_answer_with_no_body_bytes_and_no_content_length_is_one_last_chunk(harness):
    served = harness.serve(answer(b"", length=False))
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert resp.header(b"transfer-encoding") == b"chunked" and resp.chunks == []
    assert resp.raw.endswith(b"\r\n\r\n0\r\n\r\n") and resp.raw.count(b"0\r\n\r\n") == 1


def test_an_answer_with_content_length_is_sent_as_is_with_no_headers_added(harness):
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await read_body(receive)
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        await send({"type": "http.response.body", "body": b" world"})

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert resp.raw.startswith(b"HTTP/1.1 200 ")
    assert resp.headers == [(b"content-type", b"text/plain"), (b"content-length", b"11")]
    assert resp.raw.endswith(b"\r\n\r\nhello world")  # no framing around the body's two pieces


def test_an_app_that_declares_transfer_encoding_chunked_gets_its_body_framed_once(harness):
    served = harness.serve(
        answer(b"Hello, world!", headers=((b"transfer-encoding", b"chunked"),), length=False)
    )
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert resp.all(b"transfer-encoding") == [b"chunked"] and resp.body == b"Hello, world!"
    client.send(GET)
    assert client.response().body == b"Hello, world!"


@pytest.mark.parametrize("char", ["c", "\t", " ", "µ"], ids=["letter", "tab", "space", "obs-text"])
def test_response_header_values_with_allowed_characters_are_written_as_is(harness, char):
    value = f"<{char}>".encode()
    served = harness.serve(answer(headers=((b"key", value),)))
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert b"\r\nkey: " + value + b"\r\n" in resp.raw and resp.body == b"Hello, world"


def test_response_headers_given_as_an_iterator_are_written(harness):
    async def app(scope: dict, receive: Any, send: Any) -> None:
        headers = iter([(b"x-test-header", b"test value"), (b"content-length", b"0")])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    assert client.response().header(b"x-test-header") == b"test value"


@pytest.mark.parametrize("pieces", [[b"abc", b"defgh"], [b"abcdefgh"]], ids=["second-piece", "first-piece"])
def test_an_app_sending_more_than_its_content_length_gets_the_connection_closed_without_the_excess(
    harness, pieces
):
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        for i, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1})

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    data = client.rest()  # until the server closes
    if data:  # the head may have left before the excess came
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"abcde".startswith(body), data


def test_an_app_sending_less_than_its_content_length_gets_the_connection_closed(harness):
    served = harness.serve(answer(b"xxx", headers=((b"content-length", b"10"),), length=False))
    client = served.connect()
    client.send(GET)
    with pytest.raises(Incomplete):
        client.response()


@pytest.mark.parametrize(
    "name,value",
    [
        (b"key", b"value\r\nx-injected: yes"),
        (b"key", b"value\nx-injected: yes"),
        (b"key", b"value\rx-injected: yes"),
        (b"key\r\nx-injected", b"yes"),
        (b"key: x\r\nx-injected", b"yes"),
    ],
    ids=["crlf-in-value", "lf-in-value", "cr-in-value", "crlf-in-name", "colon-crlf-in-name"],
)
def test_a_response_header_with_crlf_is_never_written_as_a_header_line(harness, name, value):
    """No header injection: the connection is closed, or the app's answer replaced with a 500."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(name, value), (b"content-length", b"2")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    data = client.rest()
    assert b"injected" not in data, data
    assert data == b"" or data.startswith(b"HTTP/1.1 500 "), data


# --- the app's errors -------------------------------------------------------------------------------


def assert_clean_end(client: Client, resp: Response) -> None:
    """Nothing follows the answer: the connection ends if the answer said so, else the next
    request is answered right after it."""
    if resp.closes:
        assert client.closed()
    else:
        client.send(request("GET", "/fine"))
        assert client.response().body == b"fine"


def failing(fail: Callable[[Any], Awaitable[None]]) -> App:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/fine":
            await answer(b"fine")(scope, receive, send)
        else:
            await fail(send)

    return app


async def raise_before_start(send: Any) -> None:
    raise RuntimeError("boom")


async def return_without_start(send: Any) -> None:
    return None


async def body_before_start(send: Any) -> None:
    await send({"type": "http.response.body", "body": b"early"})


@pytest.mark.parametrize(
    "fail",
    [raise_before_start, return_without_start, body_before_start],
    ids=["raising", "returning-without-start", "body-before-start"],
)
def test_an_app_failing_before_the_start_gets_a_500_with_a_well_framed_body(harness, fail):
    served = harness.serve(failing(fail))
    client = served.connect()
    client.send(GET)
    resp = client.response()
    assert resp.status == 500 and resp.body
    if resp.header(b"content-length") is not None:
        assert int(resp.header(b"content-length")) == len(resp.body)
    assert_clean_end(client, resp)


async def raise_after_start_chunked(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"1", "more_body": True})
    raise RuntimeError("boom")


async def raise_after_start_with_length(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
    await send({"type": "http.response.body", "body": b"1", "more_body": True})
    raise RuntimeError("boom")


async def return_without_completing(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"1", "more_body": True})


async def start_twice(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.start", "status": 200, "headers": []})


@pytest.mark.parametrize(
    "fail",
    [raise_after_start_chunked, raise_after_start_with_length, return_without_completing, start_twice],
    ids=["raising-chunked", "raising-with-length", "returning-without-completing", "starting-twice"],
)
def test_an_app_failing_after_the_start_gets_the_connection_closed_on_an_incomplete_answer(harness, fail):
    served = harness.serve(failing(fail))
    client = served.connect()
    client.send(GET)
    with pytest.raises(Incomplete):
        client.response()
    assert b"500" not in bytes(client.buf)


def test_an_app_sending_after_its_answer_is_complete_does_not_change_the_answer(harness):
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        await send({"type": "http.response.body", "body": b"more"})  # raises, most likely

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    assert client.response().body == b"ok"
    following = client.next_answer(GET)  # parsed from right after the first: nothing in between
    assert following is None or following.body == b"ok"


# --- HTTP/1.0 ---------------------------------------------------------------------------------------


def decode_until_close(resp_head: Response, rest: bytes) -> bytes:
    """The body of an answer read to the end of the connection, chunked or not."""
    if resp_head.header(b"transfer-encoding") != b"chunked":
        return rest
    out, i = b"", 0
    while True:
        end = rest.index(b"\r\n", i)
        size = int(rest[i:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += rest[end + 2 : end + 2 + size]
        i = end + 2 + size + 2


@pytest.mark.parametrize("app", [stream, answer(b"hello world")], ids=["streamed", "with-length"])
def test_an_http_1_0_request_is_answered_whole_and_the_connection_closed(harness, app):
    seen: list[dict] = []

    async def recording(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope)
        await app(scope, receive, send)

    served = harness.serve(recording)
    client = served.connect()
    client.send(b"GET / HTTP/1.0\r\nhost: test\r\n\r\n")
    head = client.head()
    assert head.status == 200
    assert decode_until_close(head, client.rest()) == b"hello world"  # and the connection ended
    assert seen[0]["http_version"] == "1.0"


def test_a_streamed_answer_to_an_http_1_0_request_is_not_chunked(harness):
    served = harness.serve(stream)
    client = served.connect()
    client.send(b"GET / HTTP/1.0\r\nhost: test\r\n\r\n")
    head = client.head()
    assert head.header(b"transfer-encoding") is None
    assert client.rest() == b"hello world"


# --- requests the server refuses --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"G?T / HTTP/1.1\r\nhost: test\r\n\r\n",
        b"GET /?x=y z HTTP/1.1\r\nhost: test\r\n\r\n",
        b"GET / HTTP1.1\r\nhost: test\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: abc\r\n\r\n",
        b"x" * 100_000,
    ],
    ids=[
        "bad-header",
        "bad-method",
        "space-in-target",
        "bad-version",
        "length-and-chunked",
        "two-lengths",
        "bad-length",
        "garbage",
    ],
)
def test_an_unparsable_request_gets_an_openai_shaped_400_and_the_connection_closed(harness, data):
    seen: list[dict] = []
    served = harness.serve(answer(seen=seen))
    client = served.connect()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.send(data)
    resp = client.response()
    assert resp.status == 400 and resp.header(b"content-type") == b"application/json"
    error = json.loads(resp.body)["error"]
    assert isinstance(error, dict) and error["message"]
    assert client.closed()
    assert seen == []


# --- the scope --------------------------------------------------------------------------------------


def test_the_scope_of_a_request(harness):
    seen: list[dict] = []
    served = harness.serve(answer(seen=seen))
    client = served.connect()
    client.send(
        b"GET /caf%C3%A9/one%2Ftwo%20x?q=1%202&r HTTP/1.1\r\n"
        b"Host: test\r\nX-Mixed-Case: Some Value\r\nx-dup: 1\r\nx-dup: 2\r\n\r\n"
    )
    assert client.response().status == 200
    scope = seen[0]
    assert scope["type"] == "http" and scope["asgi"]["version"] == "3.0"
    assert scope["method"] == "GET" and scope["http_version"] == "1.1" and scope["scheme"] == "http"
    assert scope["path"] == "/café/one/two x"
    assert scope["raw_path"] == b"/caf%C3%A9/one%2Ftwo%20x"
    assert scope["query_string"] == b"q=1%202&r"
    assert scope["root_path"] == ""
    assert tuple(scope["client"]) == client.sock.getsockname()
    assert tuple(scope["server"]) == ("127.0.0.1", served.port)
    assert [(bytes(n), bytes(v)) for n, v in scope["headers"]] == [
        (b"host", b"test"),
        (b"x-mixed-case", b"Some Value"),
        (b"x-dup", b"1"),
        (b"x-dup", b"2"),
    ]
    assert HANGUP_HOOK in scope and scope[HANGUP_HOOK] is None


def test_each_request_on_a_connection_gets_a_scope_of_its_own(harness):
    seen: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        scope["mine"] = scope["path"]  # an app may write into its scope
        await answer(seen=seen)(scope, receive, send)

    served = harness.serve(app)
    client = served.connect()
    client.send(request("GET", "/a", ("x-a: 1",)) + request("POST", "/b", body=b"zz"))
    client.response(), client.response()
    a, b = seen
    assert a is not b and (a["mine"], b["mine"]) == ("/a", "/b")
    assert (a["method"], b["method"]) == ("GET", "POST")
    assert (b"x-a", b"1") in a["headers"] and (b"x-a", b"1") not in b["headers"]


@pytest.mark.parametrize(
    "upgrade",
    [("upgrade: websocket", "sec-websocket-version: 13"), ("upgrade: h2c",)],
    ids=["websocket", "h2c"],
)
def test_an_upgrade_request_is_served_as_plain_http(harness, upgrade):
    """The connection then goes on as HTTP/1.1, or the answer says `connection: close` and it ends
    (RFC 9110 7.8: a server may ignore the Upgrade header)."""
    seen: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope)
        await read_body(receive)
        await respond(send, b"fine" if scope["path"] == "/fine" else b"Hello, world")

    served = harness.serve(app)
    client = served.connect()
    client.send(request("GET", "/up", ("connection: upgrade", *upgrade)))
    resp = client.response()
    assert (resp.status, resp.body) == (200, b"Hello, world")
    assert (seen[0]["type"], seen[0]["path"]) == ("http", "/up")
    assert_clean_end(client, resp)


# --- disconnects and the hang-up hook ---------------------------------------------------------------


def test_receive_after_the_answer_is_complete_returns_http_disconnect(harness):
    after: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await answer()(scope, receive, send)
        after.append(await asyncio.wait_for(receive(), TIMEOUT))

    served = harness.serve(app)
    client = served.connect()
    client.send(request("POST", "/", body=b'{"hello": "world"}'))
    assert client.response().status == 200
    wait_for(lambda: after, what="receive() after the answer to return")
    assert after == [{"type": "http.disconnect"}]


def hang_up_after_partial(harness: Any, app: App, done: threading.Event) -> None:
    """Serve `app`, send a GET, hang up once the answer's first bytes (`partial`) are in, and wait
    for the app to finish."""
    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    client.wait_for_bytes(b"partial")
    client.close()
    assert done.wait(TIMEOUT)


def test_a_client_hanging_up_mid_stream_ends_a_pending_receive_and_calls_the_hangup_hook(harness):
    events: list[Any] = []
    done = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        try:
            await read_body(receive)
            scope[HANGUP_HOOK] = lambda: events.append("hook")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            events.append(await receive())
            with contextlib.suppress(OSError):  # sends after the hang-up go nowhere
                await send({"type": "http.response.body", "body": b"lost", "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        finally:
            done.set()

    hang_up_after_partial(harness, app, done)
    assert events.count("hook") == 1 and {"type": "http.disconnect"} in events


def test_two_receive_calls_waiting_at_once_both_get_http_disconnect_on_a_hang_up(harness):
    """As Starlette's streaming responses do (one task streams, another listens for the disconnect),
    and the handler's own hang-up watch under a server without the hook: every pending `receive`
    is woken, none left waiting for ever."""
    got: list[dict] = []
    done = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        try:
            await read_body(receive)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            got.extend(await asyncio.wait_for(asyncio.gather(receive(), receive()), TIMEOUT))
        finally:
            done.set()

    hang_up_after_partial(harness, app, done)
    assert got == [{"type": "http.disconnect"}] * 2


def test_the_hangup_hook_is_not_called_once_the_answer_is_complete(harness):
    calls: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        scope[HANGUP_HOOK] = lambda: calls.append("hook")
        await answer()(scope, receive, send)

    served = harness.serve(app)
    client = served.connect()
    client.send(GET)
    assert client.response().status == 200
    client.close()
    wait_for(lambda: served.connections() == 0, what="the server to see the connection closed")
    assert calls == []


# --- graceful shutdown ------------------------------------------------------------------------------


def test_graceful_shutdown_finishes_the_answer_in_flight_and_closes_idle_connections(harness):
    entered = threading.Event()
    gate = harness.gate()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            entered.set()
            await gate.wait()
        await answer(scope["path"].encode())(scope, receive, send)

    served = harness.serve(app)
    busy, idle = served.connect(), served.connect()
    busy.send(request("GET", "/hold"))
    assert entered.wait(TIMEOUT)
    idle.send(request("GET", "/idle"))
    assert idle.response().body == b"/idle"

    served.server.should_exit = True
    assert idle.closed()  # the idle keep-alive connection is closed
    with pytest.raises(ConnectionRefusedError):  # and no new one is accepted
        Client(served.port).close()
    gate.open()
    resp = busy.response()
    assert (resp.status, resp.body) == (200, b"/hold")  # the answer in flight is finished
    assert busy.closed()  # then its connection ends (the answer may say `connection: close`)
    served.thread.join(TIMEOUT)
    assert not served.thread.is_alive()


# --- back-pressure ----------------------------------------------------------------------------------


def kernel_send_buffer_max() -> int:
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return min(int(f.read().split()[2]), 16 << 20)
    except (OSError, IndexError, ValueError):
        return 4 << 20


@pytest.mark.parametrize("length", [True, False], ids=["with-length", "chunked"])
def test_a_client_that_reads_nothing_stalls_the_apps_sends_instead_of_buffering_everything(harness, length):
    """The app's `send` blocks once the buffers towards the client are full: what it managed to send
    before the client reads is bounded by the sockets' buffers, not the answer's 32 MiB."""
    total, piece = 32 << 20, b"0123456789abcdef" * 4096  # 32 MiB in 64 KiB pieces
    sent = [0]

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await read_body(receive)
        headers = [(b"content-length", b"%d" % total)] if length else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(total // len(piece)):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent[0] += len(piece)
        await send({"type": "http.response.body", "body": b""})

    served = harness.serve(app)
    client = served.connect(rcvbuf=128 * 1024)  # a small window: the kernel's share stays small
    client.send(GET)

    def stalled() -> bool:  # the app's sends made no progress for 0.3 s
        before = sent[0]
        time.sleep(0.3)
        return sent[0] == before and before > 0

    wait_for(stalled, timeout=10, what=lambda: f"the sends to stall; {sent[0]} bytes sent")
    # What the kernel may hold (the server's send buffer grows up to tcp_wmem's maximum, 4 MiB by
    # default; the client's receive buffer) plus at most 4 MiB in the server itself.
    bound = kernel_send_buffer_max() + 2 * 128 * 1024 + (4 << 20)
    assert sent[0] < bound, f"{sent[0] / 2**20:.1f} MiB taken while the client read nothing"
    resp = client.response()
    assert resp.status == 200 and len(resp.body) == total
    assert resp.body == piece * (total // len(piece))
    wait_for(lambda: sent[0] == total, what="the app to see its last send return")


# --- found in review of the protocol of the proxy's own ------------------------------------------------


def test_a_disconnect_listener_beside_a_body_reader_gets_no_http_disconnect_when_the_body_ends(harness):
    """A listener task waits in `receive` for the hang-up while the app reads the body: the body's last
    bytes wake both, the reader takes them, and the listener must not be told the client is gone (the
    client is still there, and no answer was sent). Under uvicorn it gets an empty `http.request`."""
    waiting = threading.Event()
    seen: list[Any] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        first = await receive()
        assert first["more_body"]
        reader = asyncio.create_task(read_body(receive))
        await asyncio.sleep(0)  # the reader waits first
        listener = asyncio.create_task(receive())
        await asyncio.sleep(0)
        waiting.set()
        await reader
        await asyncio.sleep(0.05)  # the listener has run if it was woken
        seen.append(listener.result() if listener.done() else None)
        listener.cancel()
        await respond(send, b"ok")

    served = harness.serve(app)
    client = served.connect()
    client.send(request("POST", "/", ("content-length: 10",)) + b"01234")
    assert waiting.wait(TIMEOUT)
    client.send(b"56789")
    assert client.response().body == b"ok"
    assert seen != [{"type": "http.disconnect"}]


def test_a_connection_answered_before_its_request_body_arrived_still_times_out_once_idle(harness):
    """The app answers (as the proxy answers a 401, 413 or 503) before the body came; the client then
    sends the body and nothing more: the idle connection is closed after timeout_keep_alive, not held."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await respond(send, b"early")

    served = harness.serve(app, keep_alive=0.3)
    client = served.connect()
    client.send(request("POST", "/", ("content-length: 10",)))
    assert client.response().body == b"early"
    client.send(b"0123456789")
    client.sock.settimeout(2)
    assert client.closed()


def test_a_pipelined_request_the_server_has_not_read_yet_does_not_time_out_the_answer_ahead_of_it(harness):
    """Reading stops while a pipelined request waits for the answer ahead of it: the rest of its body,
    sent at once, sits unread for as long as that answer takes; CLIENT_TIMEOUT must not end the
    connection (and the answer in flight) for bytes the server itself left unread."""
    entered = threading.Event()
    gate = harness.gate()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            entered.set()
            await gate.wait()
        await echo(scope, receive, send)

    served = harness.serve(app, client_timeout=0.5)
    client = served.connect()
    client.send(request("GET", "/slow") + request("POST", "/next", ("content-length: 10",)) + b"01234")
    assert entered.wait(TIMEOUT)
    client.send(b"56789")  # the whole request is sent well within CLIENT_TIMEOUT
    time.sleep(0.8)  # the answer ahead takes longer than CLIENT_TIMEOUT
    gate.open()
    assert client.response().body == b"/slow "
    assert client.response().body == b"/next 0123456789"


def test_a_request_with_an_upgrade_header_and_a_body_reaches_the_app_with_its_body(harness):
    """No upgrade is made (the request is served as HTTP/1.1, RFC 9110 7.8: a server may ignore
    Upgrade); its body is part of it (httptools ends such a message at its head and hands the body
    over as the new protocol's bytes)."""
    served = harness.serve(echo)
    client = served.connect()
    upgrade = (
        "connection: upgrade, http2-settings",
        "upgrade: h2c",
        "http2-settings: AAMAAABkAARAAAAAAAIAAAAA",
    )
    client.send(request("POST", "/u", upgrade, b"hello body"))
    assert client.response().body == b"/u hello body"


def test_a_304_with_the_content_length_of_the_representation_and_no_body_keeps_the_connection(harness):
    """RFC 9110 8.6: a 304 may carry the Content-Length the 200 would have had; it has no body."""
    served = harness.serve(answer(b"", status=304, headers=((b"content-length", b"12"),), length=False))
    client = served.connect()
    for _ in range(2):
        client.send(GET)
        resp = client.response()
        assert resp.status == 304 and resp.header(b"content-length") == b"12"
