"""The HTTP server the proxy runs on: an HTTP/1.1 protocol of its own (httptools' parser, ASGI 3)
under uvicorn's `Server` (sockets, lifespan, graceful shutdown), configured in one place for the
launcher and the tests.

Why a protocol of its own: uvicorn's (HttpToolsProtocol) pays per request for two timers (its
keep-alive timeout, and the guards below), an `asyncio.Event`, a regex per response header, and
writes a response's head apart from its body; this one keeps one lazily moved timer per connection,
waits with a plain future only when the body is not there yet, and sends the head with the first
body bytes (`bench/RESULTS.md`: what that saves per request). It is held to the same socket-level
matrix as uvicorn's protocol is (`tests/app/test_server_protocol.py`).

The guards uvicorn lacks:

- A client that is slow to send its request: a fresh connection that sends nothing, or headers a
  byte at a time (slowloris), would hold a socket and its buffers forever. Every request gets
  `CLIENT_TIMEOUT` seconds from its first byte (or from the connection's opening) to its last body
  byte: a client still sending headers then gets `408` and the connection is closed; one stalled
  mid-body is disconnected, which the app sees as a client hang-up.
- A client that stops reading would hold its answer, the engine's connection and the engine's work
  for as long as it likes. One whose socket stays full (no room made for the answer) for
  `CLIENT_SEND_TIMEOUT` seconds is disconnected (nginx's `send_timeout`), which the app sees as a
  hang-up.
- A request's head is bounded: the request line and headers may take `MAX_HEAD_BYTES` and hold
  `MAX_HEADERS` fields; beyond either the client gets `431`, as soon as the head passes the bound,
  and the connection ends (what it still sends is dropped unparsed for up to `LINGER_S`, so that it
  reads the answer rather than a reset). Unparsable requests get an OpenAI-shaped `400`. Each of
  these refusals (400, 408 while the head was arriving, 431) is one request line in the log and
  counted in the request metrics, like any answer of the app's.

From uvicorn it takes the `Server` and `Config` (what every uvicorn protocol is given: the config,
the server's state with its `connections` and `tasks`, `shutdown()` on each connection at a
graceful stop); a uvicorn outside the versions this was written for is named in a warning at start
(`UVICORN_WRITTEN_FOR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import re
import time
from collections import deque
from typing import Any
from urllib.parse import unquote

import httptools
import uvicorn

from app import logs
from app.errors import error_body
from app.middleware import RECORD_KEY, REFUSED_KEY, RequestRecord, observe, request_id_from
from app.routes import classify

MAX_HEAD_BYTES = 64 * 1024
"""Request line and headers, all together (nginx: 32 KiB; Envoy: 60 KiB; vLLM's own uvicorn:
unbounded with httptools, 4 MiB with h11)."""
MAX_HEADERS = 256
"""Header fields in one request (vLLM sets the same for its uvicorn under h11)."""

LINGER_S = 2.0
"""After a refusal the connection is half-closed, and what the client still sends is read and dropped
for up to this long: closing with its bytes unread would reset the connection, and a reset can
discard the answer before the client reads it (nginx's lingering close)."""

HIGH_WATER = 64 * 1024
"""Request body bytes held for the app before the connection stops reading (uvicorn's bound)."""

UVICORN_WRITTEN_FOR = ((0, 30), (0, 55))
"""uvicorn >= 0.30, < 0.55: what is used here of it (its Server, Config and ServerState) reads the
same in 0.30 and 0.54 (tested)."""

_log = logging.getLogger("app.server")


def _uvicorn_internals_missing() -> list[str]:
    """What this module uses of uvicorn and uvicorn no longer has: the names `Server`, `Config` and
    `ServerState` assign and call, which a protocol class is handed or called with."""
    from uvicorn.server import ServerState

    missing = [
        f"Server.{name}"
        for name in ("capture_signals", "serve", "shutdown")
        if not hasattr(uvicorn.Server, name)
    ]
    checks = (
        (ServerState.__init__, ("connections", "tasks", "total_requests", "default_headers"), "ServerState"),
        (uvicorn.Config.__init__, ("timeout_keep_alive", "root_path", "http"), "Config"),
        (uvicorn.Config.load, ("loaded_app", "http_protocol_class"), "Config"),
        (uvicorn.Server.shutdown, ("shutdown", "connections"), "Server.shutdown"),
    )
    for func, names, owner in checks:
        code = getattr(func, "__code__", None)
        made = set(code.co_names) if code is not None else set()
        missing += [f"{owner}.{name}" for name in names if name not in made]
    return missing


def _version_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = UVICORN_WRITTEN_FOR
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def uvicorn_version_warning(version: str) -> str | None:
    """A warning naming the range this module was written for, or None inside it."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        found = ()
    lo, hi = UVICORN_WRITTEN_FOR
    if len(found) == 2 and lo <= found < hi:
        return None
    return (
        f"app/server.py runs its protocol under uvicorn's Server and was written for uvicorn "
        f"{_version_range()}; uvicorn {version} is installed: run tests/app/test_server*.py against it, "
        "then widen UVICORN_WRITTEN_FOR"
    )


if _missing := _uvicorn_internals_missing():
    raise RuntimeError(
        f"uvicorn {uvicorn.__version__} lacks {', '.join(_missing)}, which app/server.py uses; "
        f"it was written for uvicorn {_version_range()}"
    )


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %b\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}
# Response header names and values that would break the head (RFC 9110 tokens; no CR, LF or NUL in
# values): checked over all of a response's names, then all its values, joined by a byte each allows.
_BAD_NAMES = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')  # uvicorn's
_BAD_VALUES = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_METHODS: dict[bytes, str] = {}
_ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}


def _raw_error(status: int, message: str, code: str, request_id: str | None = None) -> bytes:
    """A whole HTTP/1.1 error response, OpenAI-shaped, that closes the connection."""
    body = error_body(status, message, code=code)
    rid = b"x-request-id: %b\r\n" % request_id.encode() if request_id else b""
    return b"%bcontent-type: application/json\r\nconnection: close\r\n%bcontent-length: %d\r\n\r\n%b" % (
        STATUS_LINE[status],
        rid,
        len(body),
        body,
    )


_REFUSALS = {
    400: ("Invalid HTTP request (malformed request line or headers).", "invalid_http"),
    408: ("The request was not received in time.", "request_timeout"),
    431: (
        f"Request line and headers larger than {MAX_HEAD_BYTES} bytes or more than {MAX_HEADERS} fields.",
        "request_header_fields_too_large",
    ),
}
_408 = _raw_error(408, *_REFUSALS[408])  # a connection that never sent a byte: no request to log
_500 = _raw_error(500, "Internal server error.", "internal_error")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# Where an app may put a callable for the server to call if the client's connection is lost before
# the response is complete (the request's scope holds the key, None, when the server offers it).
HANGUP_HOOK = "app.hangup_hook"
# A callable the server offers in the scope, `hook(scope)`: the response cannot be completed (the
# engine broke off mid-body), so end the connection without its end (no last chunk, fewer bytes than
# the Content-Length), and without uvicorn's "returned without completing response" error.
ABORT_HOOK = "app.abort_hook"
# A callable the server offers in the scope, `hook(scope, pause, resume)`: once the response's
# headers are sent, a `BodyWriter` that writes body bytes straight into the client's transport,
# framed as uvicorn frames them (chunked), with no task and no `send` per write; `pause`/`resume`
# are called when the client's transport buffer passes its high/low water marks. None when the
# response is not chunked (HEAD, Content-Length, HTTP/1.0) or the client is gone: use `send`.
RELAY_HOOK = "app.relay_hook"


class BodyWriter:
    """Body bytes of a chunked response, straight into the client's transport (see RELAY_HOOK).
    The end of the response is still `send`'s (the protocol's bookkeeping: keep-alive, the next
    pipelined request); `close()` first."""

    __slots__ = ("_request", "_write", "write_chunks", "pause", "resume", "closed")

    def __init__(self, request: _Request, pause: Any, resume: Any) -> None:
        self._request = request
        self._write = self._first  # the first write takes the held head with it
        # Bytes already framed as chunks, once `started` (app/proxy/passthrough.py: a relayed
        # stream's reads of whole chunks, passed on as the engine framed them).
        self.write_chunks = request.transport.write
        self.pause = pause
        self.resume = resume
        self.closed = False  # the client is gone (or the writer closed): writes are dropped

    def _first(self, data: bytes) -> None:
        self._write = self.write_chunks
        self.write_chunks(self._request.take_head() + data)

    def write(self, body: bytes) -> None:
        if self.closed:
            return
        self._write(b"%x\r\n%b\r\n" % (len(body), body))

    @property
    def started(self) -> bool:
        """The response's headers are out (with the first body bytes)."""
        return self._write is self.write_chunks

    def close(self) -> None:
        self.closed = True
        protocol = self._request.protocol
        if protocol.writer is self:
            protocol.writer = None


async def _too_many_headers(scope: dict, receive: Any, send: Any) -> None:
    """Run as the request's app instead of the real one when the head holds too many fields."""
    rid = _refuse_line(
        431, "too many header fields", scope["method"], scope["path"], scope["headers"], scope["client"]
    )
    body = error_body(431, _REFUSALS[431][0], code=_REFUSALS[431][1])
    await send(
        {
            "type": "http.response.start",
            "status": 431,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"connection", b"close"),
                (b"x-request-id", rid.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _refuse_line(
    status: int,
    error: str,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]] | None,
    client: tuple[str, int] | None,
    began: float = 0.0,
) -> str:
    """The request line of a request the HTTP layer refused, counted like any other; its id."""
    rec = RequestRecord(
        request_id=request_id_from(headers or []),
        method=method,
        path=path,
        client=f"{client[0]}:{client[1]}" if client else None,
        start=began or time.perf_counter(),
        route=classify(path),
    )
    rec.status = status
    rec.error = error
    duration = time.perf_counter() - rec.start
    observe(rec, duration)
    logs.request_line(rec.fields(duration))
    return rec.request_id


class _Discard:
    """Stands in for the parser after a refusal: what the client still sends is dropped."""

    @staticmethod
    def feed_data(data: bytes) -> None:
        pass


class _UpgradeBody:
    """Stands in for the parser after a request asking for an Upgrade (h2c, websocket) that has a
    Content-Length: httptools ends such a message at its head and leaves its body to the new
    protocol. No upgrade is made here (RFC 9110 7.8 lets a server ignore the header): the body
    goes to the request as any body would, and what follows it is dropped (the connection ends
    with the answer)."""

    __slots__ = ("_protocol", "_left")

    def __init__(self, protocol: HttpProtocol, length: int) -> None:
        self._protocol = protocol
        self._left = length

    def feed_data(self, data: bytes | memoryview) -> None:
        left = self._left
        if left <= 0:
            return
        part = bytes(data[:left])
        self._left = left - len(part)
        if part:
            self._protocol.on_body(part)
        if self._left <= 0:
            self._protocol.on_message_complete()


# What the connection's one timer does when its deadline passes.
_FIRST_BYTE, _HEAD, _BODY, _IDLE, _LINGER = range(5)


class _Request:
    """One request on a connection: its ASGI scope, `receive` and `send`, the body as it arrives,
    and the state of its response."""

    __slots__ = (
        "protocol",
        "transport",
        "scope",
        "chunks",
        "size",
        "more_body",
        "delivered",
        "waiters",
        "keep_alive",
        "expect_100",
        "head_only",
        "started",
        "complete",
        "disconnected",
        "chunked",
        "length_left",
        "head",
        "flush_handle",
    )

    def __init__(self, protocol: HttpProtocol, scope: dict, keep_alive: bool, expect_100: bool) -> None:
        self.protocol = protocol
        self.transport = protocol.transport
        self.scope = scope
        self.chunks: list[bytes] = []
        self.size = 0
        self.more_body = True  # the request's body is still arriving
        self.delivered = False  # `receive` has given its last body bytes
        self.waiters: list[asyncio.Future] | None = None  # `receive`, waiting for the body or the end
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.head_only = scope["method"] == "HEAD"
        self.started = False
        self.complete = False
        self.disconnected = False
        self.chunked = False
        self.length_left: int | None = None  # body bytes the response may still take; None: any
        self.head: bytes | None = None  # the response's head, held for its first body bytes
        self.flush_handle: asyncio.Handle | None = None

    def wake(self) -> None:
        waiters = self.waiters
        if waiters is not None:
            self.waiters = None
            _release(waiters)

    async def receive(self) -> dict:
        if self.expect_100:
            self.expect_100 = False
            if not self.transport.is_closing():
                self.transport.write(_CONTINUE)
        protocol = self.protocol
        while not self.disconnected and not self.complete:
            if protocol.read_paused and protocol.parsing is self:  # paused for a large body
                protocol.resume_reading()
            if self.chunks or not (self.more_body or self.delivered):  # body bytes, or its end
                body = b"".join(self.chunks)
                self.chunks.clear()
                self.size = 0
                if not self.more_body:
                    self.delivered = True
                return {"type": "http.request", "body": body, "more_body": self.more_body}
            waiter = protocol.loop.create_future()
            if self.waiters is None:
                self.waiters = [waiter]
            else:  # another receive() is waiting too (a disconnect listener): both are woken
                self.waiters.append(waiter)
            await waiter  # (cancelled: it stays in the list, done, and is skipped)
            # Woken for bytes another receive() may have taken: look again.
        return {"type": "http.disconnect"}

    def take_head(self) -> bytes:
        """The held head, to go out with the body bytes about to be written (b"" once sent)."""
        head = self.head
        if head is None:
            return b""
        self.head = None
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        return head

    def flush_head(self) -> None:
        """No body bytes followed the head within the event-loop iteration: it goes alone."""
        self.flush_handle = None
        if self.head is not None:
            head, self.head = self.head, None
            if not self.disconnected and not self.transport.is_closing():
                self.transport.write(head)

    async def send(self, message: dict) -> None:
        protocol = self.protocol
        if protocol.write_paused and not self.disconnected:
            await protocol.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self._start(message["status"], message.get("headers", ()))
            return
        if self.complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.head_only:
            out = b""
        elif self.chunked:
            out = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                out += b"0\r\n\r\n"
        else:
            out = body
            left = self.length_left
            if left is not None:
                if len(body) > left:
                    raise RuntimeError("Response content longer than Content-Length")
                self.length_left = left - len(body)
        if self.head is not None:
            out = self.take_head() + out
        if out:
            self.transport.write(out)
        if not more:
            if self.length_left and not self.head_only:
                raise RuntimeError("Response content shorter than Content-Length")
            self.complete = True
            self.wake()
            if not self.keep_alive:
                self.transport.close()
            protocol.response_complete(self)

    def _start(self, status: int, headers: Any) -> None:
        self.started = True
        self.expect_100 = False
        head = [STATUS_LINE[status]]
        names = []
        values = []
        close = False
        length: int | None = None
        chunked = False
        for name, value in headers:
            names.append(name)
            values.append(value)
            name = name.lower()
            if name == b"content-length":
                if length is None and not chunked:
                    length = int(value.decode())
            elif name == b"transfer-encoding":
                if value.lower() == b"chunked":
                    chunked, length = True, None
            elif name == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
                self.keep_alive = False
                close = True
            head += (name, b": ", value, b"\r\n")
        if _BAD_NAMES.search(b"-".join(names)):
            raise RuntimeError("Invalid HTTP header name.")
        if _BAD_VALUES.search(b"\t".join(values)):
            raise RuntimeError("Invalid HTTP header value.")
        if status in (204, 304) or status < 200:  # no body, whatever Content-Length says (RFC 9110 8.6)
            chunked, length = False, 0
        elif not chunked and length is None and not self.head_only:
            if self.scope["http_version"] == "1.1":
                chunked = True
                head.append(b"transfer-encoding: chunked\r\n")
            else:  # HTTP/1.0 has no chunks: the body ends with the connection
                self.keep_alive = False
        if not self.keep_alive and not close:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        self.chunked = chunked
        self.length_left = length
        self.head = b"".join(head)
        self.flush_handle = self.protocol.loop.call_soon(self.flush_head)


class HttpProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 (and 1.0) requests, keep-alive and pipelining, each request
    run as a task of the ASGI app (one at a time, in order), with the guards of the module's doc."""

    client_timeout: float = 120.0
    send_timeout: float = 60.0

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.keep_alive_s = config.timeout_keep_alive
        self.root_path = config.root_path
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.app_state = app_state
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # httptools < 0.6.3
            # A request with `Connection: close` may have bytes behind it: answer it, drop those.
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        # The request being received: its URL and headers so far, then its `_Request`.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_100 = False
        self.parsing: _Request | None = None
        self.answering: _Request | None = None  # its app's turn: the oldest request not answered
        self.queue: deque[tuple[_Request, Any]] = deque()  # pipelined behind it
        self.read_paused = False
        self.write_paused = False
        self.drains: list[asyncio.Future] = []
        self.writer: BodyWriter | None = None  # the response being relayed straight into the transport
        # One timer per connection: `deadline` moves with the request, the timer only when it fires
        # early (or the deadline comes sooner), so a request costs no timer of its own.
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.on_deadline = _FIRST_BYTE
        self.deadline_paused = False  # the request's deadline, held while reading is paused
        self.send_guard: asyncio.TimerHandle | None = None  # armed while the client's buffer is full
        # Bytes the head being received may still take; None while no head is being received (body,
        # response). Counted per read: a head that begins inside a read (pipelining) is counted from
        # the next one, so it can pass the bound by at most one read.
        self.head_left: int | None = MAX_HEAD_BYTES
        self.heads = 0  # heads completed on this connection

    # --- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.add(self)
        self.transport = transport
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.set_deadline(self.client_timeout, _FIRST_BYTE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.writer is not None:
            self.writer.closed = True
            self.writer = None
        self.resume_writing()  # the send guard off, and every `send` waiting for room let go
        request = self.answering
        if request is not None and not request.complete:
            request.disconnected = True
            request.wake()
            if hook := request.scope.get(HANGUP_HOOK):
                hook()
        # The hooks are bound to this protocol, which holds the scopes: a reference cycle that
        # would leave every closed connection to the cyclic collector (heap sawtooth; RESULTS.md).
        for pending in (request, self.parsing, *(queued for queued, _ in self.queue)):
            if pending is not None:
                pending.scope[ABORT_HOOK] = pending.scope[RELAY_HOOK] = None
        self.queue.clear()
        self.parsing = self.answering = None
        self.parser = _Discard()  # type: ignore[assignment]

    def shutdown(self) -> None:
        """The server is stopping (uvicorn's graceful shutdown): an idle connection closes now, one
        being answered after its answer."""
        request = self.answering
        if request is None or request.complete:
            self.transport.close()
        else:
            request.keep_alive = False

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.send_guard is None:
            self.send_guard = self.loop.call_later(self.send_timeout, self._send_stalled)
        if self.writer is not None:
            self.writer.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.send_guard is not None:
            self.send_guard.cancel()
            self.send_guard = None
        drains, self.drains = self.drains, []
        _release(drains)
        if self.writer is not None:
            self.writer.resume()

    async def drain(self) -> None:
        waiter = self.loop.create_future()
        self.drains.append(waiter)
        await waiter

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
            if self.deadline is not None and self.on_deadline in (_HEAD, _BODY):
                # The server, not the client, keeps the request from arriving now: no deadline
                # runs until reading resumes, and then a whole CLIENT_TIMEOUT.
                self.deadline = None
                self.deadline_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
            if self.deadline_paused:
                self.deadline_paused = False
                self.set_deadline(self.client_timeout, self.on_deadline)

    def _send_stalled(self) -> None:
        """The client made no room for the answer in `send_timeout` seconds: end the connection
        at once (closing would wait for the buffer to drain, which it never does). The request's
        task sees the hang-up: 499, and the engine's work aborted."""
        self.send_guard = None
        request = self.answering
        if request is not None and (rec := request.scope.get(RECORD_KEY)) is not None:
            rec.error = f"client read nothing for {self.send_timeout:g} s (CLIENT_SEND_TIMEOUT)"
        self.transport.abort()

    # --- the timer ------------------------------------------------------------------------------

    def set_deadline(self, seconds: float, then: int) -> None:
        """`then` happens `seconds` from now, unless the deadline is moved or cleared before."""
        self.deadline = at = self.loop.time() + seconds
        self.on_deadline = then
        timer = self.timer
        if timer is None or timer.when() > at:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        at = self.deadline
        if at is None:
            return
        if self.loop.time() < at:  # the deadline moved on since the timer was set
            self.timer = self.loop.call_at(at, self._on_timer)
            return
        self.deadline = None
        if self.transport.is_closing():
            return
        then = self.on_deadline
        if then == _HEAD:
            self._refuse(408, "request not received in time (CLIENT_TIMEOUT)")
        elif then == _FIRST_BYTE:  # a connection that never sent a byte: no request to log
            self.transport.write(_408)
            self.transport.close()
        else:  # mid-body (the app sees the hang-up and logs it: 499), idle keep-alive, or lingering
            self.transport.close()

    # --- requests in ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        left = self.head_left
        if left is None:
            self._feed(data)
            return
        heads = self.heads
        if len(data) <= left:
            self._feed(data)
            if self.heads == heads and self.head_left is not None:  # still in the same head
                self.head_left = left - len(data)
            return
        # The head may end within the bytes it may still take: parse those, the rest only if it did.
        view = memoryview(data)
        self._feed(view[:left])
        if self.heads == heads and self.head_left is None or self.transport.is_closing():
            return  # refused already (unparsable): once is enough
        if self.heads == heads:
            self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return
        self._feed(view[left:])

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._no_upgrade(data, exc.args[0] if exc.args else len(data))
        except httptools.HttpParserError:
            self._invalid()

    def _no_upgrade(self, data: bytes | memoryview, offset: int) -> None:
        """No protocol but HTTP/1.1 here: the request asking for another is served as one, with its
        body (a Content-Length's worth of what follows its head); nothing after it is."""
        self.head_left = None  # no more heads on this connection: nothing counts against the bound
        self.parser = _Discard()  # type: ignore[assignment]
        request = self.parsing
        if request is None:
            return
        request.keep_alive = False
        length = next((value for name, value in self.headers if name == b"content-length"), b"0")
        if request.complete or not length.isdigit() or int(length) == 0:
            return
        request.more_body = True  # its task has not run yet: the end httptools gave it is undone
        self.parser = _UpgradeBody(self, int(length))  # type: ignore[assignment]
        self.set_deadline(self.client_timeout, _BODY)
        if offset < len(data):
            self.parser.feed_data(data[offset:])

    def _invalid(self) -> None:
        """Unparsable HTTP: an OpenAI-shaped 400."""
        if self.transport.is_closing():
            return
        request = self.parsing
        if request is not None and not request.complete and self.head_left is None and request.more_body:
            # Broken mid-body (e.g. invalid chunking): the request is already the app's, which sees
            # the connection end and writes the request's line, with what the client got.
            self.deadline = None
            if request is self.answering and not request.started:
                request.scope[REFUSED_KEY] = (400, "invalid HTTP in the request body")
                message, code = _REFUSALS[400]
                self.transport.write(_raw_error(400, message, code))
            self.transport.close()
            return
        self._refuse(400, "invalid HTTP request")

    def _refuse(self, status: int, error: str) -> None:
        """Answer a request the HTTP layer cannot pass to the app, log and count it, and end the
        connection (lingering: see LINGER_S)."""
        self.head_left = None
        method = path = ""
        if self.headers:  # the request line is complete once a header follows it
            method = self.parser.get_method().decode("ascii", "replace")
            with contextlib.suppress(httptools.HttpParserInvalidURLError):
                path = httptools.parse_url(self.url).path.decode("latin-1")[:512]
        # The request's age, from the deadline set at its first byte (no clock read per request).
        now = self.loop.time()
        at = self.deadline if self.on_deadline == _HEAD else None
        age = now - at + self.client_timeout if at is not None else self.client_timeout
        self.deadline = None
        rid = _refuse_line(status, error, method, path, self.headers, self.client, time.perf_counter() - age)
        transport = self.transport
        request = self.answering
        if request is not None and not request.complete:
            transport.close()  # pipelined behind an answer under way: nothing can be written
            return
        message, code = _REFUSALS[status]
        transport.write(_raw_error(status, message, code, rid))
        self.parser = _Discard()  # type: ignore[assignment]
        if not transport.can_write_eof():  # TLS
            transport.close()
            return
        transport.write_eof()
        self.set_deadline(LINGER_S, _LINGER)

    # httptools' callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect_100 = False
        if self.read_paused:  # pipelined, parsed from bytes already read: its deadline waits
            self.deadline, self.on_deadline, self.deadline_paused = None, _HEAD, True
        else:
            self.set_deadline(self.client_timeout, _HEAD)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100 = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_left = None
        self.heads += 1
        parser = self.parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii")
            if len(_METHODS) < 64:
                _METHODS[raw_method] = method
        version = parser.get_http_version()
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        root = self.root_path
        scope = {
            "type": "http",
            "asgi": _ASGI_VERSION.copy(),
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method,
            "root_path": root,
            "path": root + path if root else path,
            "raw_path": root.encode("ascii") + raw_path if root else raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "state": self.app_state.copy(),
            HANGUP_HOOK: None,  # set by the app; the task just created has not run yet
            ABORT_HOOK: self._abort,
            RELAY_HOOK: self._relay,
        }
        request = self.parsing = _Request(
            self, scope, version != "1.0" and parser.should_keep_alive(), self.expect_100
        )
        app = self.app if len(self.headers) <= MAX_HEADERS else _too_many_headers
        self.on_deadline = _BODY
        if self.answering is None:
            self._begin(request, app)
        else:  # pipelined behind an answer under way
            self.queue.append((request, app))
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or request.complete:
            return
        request.chunks.append(body)
        request.size += len(body)
        if request.size > HIGH_WATER:
            self.pause_reading()
        request.wake()

    def on_message_complete(self) -> None:
        self.head_left = MAX_HEAD_BYTES  # what follows is the next request's head
        self.deadline = None
        self.deadline_paused = False
        request = self.parsing
        if request is None or request.complete:
            # Answered before its body was all in (an early 401, 413 or 503): the connection is
            # idle from now on, as if the answer had ended here.
            if self.answering is None and not self.transport.is_closing():
                self.set_deadline(self.keep_alive_s, _IDLE)
            return
        request.more_body = False
        request.wake()

    # --- answers out ----------------------------------------------------------------------------

    def _begin(self, request: _Request, app: Any) -> None:
        self.answering = request
        task = self.loop.create_task(self._run(request, app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _run(self, request: _Request, app: Any) -> None:
        try:
            result = await app(request.scope, request.receive, request.send)
        except BaseException as exc:
            _log.error("Exception in ASGI application", exc_info=exc)
            if not request.started:
                await self._send_500(request)
            else:
                self.transport.close()
        else:
            if result is not None:
                _log.error("ASGI callable should return None, but returned %r.", result)
                self.transport.close()
            elif not request.started and not request.disconnected:
                _log.error("ASGI callable returned without starting response.")
                await self._send_500(request)
            elif not request.complete and not request.disconnected:
                _log.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            scope = request.scope
            scope[ABORT_HOOK] = scope[RELAY_HOOK] = None  # no cycle left through the scope

    async def _send_500(self, request: _Request) -> None:
        if request.disconnected or self.transport.is_closing():
            return
        request.keep_alive = False
        request.started = request.complete = True
        request.wake()
        self.transport.write(_500)
        self.transport.close()

    def response_complete(self, request: _Request) -> None:
        self.server_state.total_requests += 1
        if self.answering is request:
            self.answering = None
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.queue:
            self._begin(*self.queue.popleft())
        elif self.deadline is None:  # between requests (none begun): keep-alive's idle timeout
            self.set_deadline(self.keep_alive_s, _IDLE)

    def _abort(self, scope: dict) -> None:
        request = self.answering
        if request is not None and request.scope is scope:
            request.disconnected = True  # nothing more is written for it, and no error logged
        self.deadline = None
        self.transport.close()  # what was written still leaves, then the connection ends

    def _relay(self, scope: dict, pause: Any, resume: Any) -> BodyWriter | None:
        request = self.answering
        if request is None or request.scope is not scope:  # another request's turn: not this one's
            return None
        if (
            not request.started
            or request.complete
            or request.disconnected
            or not request.chunked
            or self.transport.is_closing()
        ):
            return None
        writer = self.writer = BodyWriter(request, pause, resume)
        if self.write_paused:  # already above the high water mark
            pause()
        return writer


def _release(waiters: list[asyncio.Future]) -> None:
    """Let every waiter go on (those cancelled meanwhile are done already)."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, (tuple, list)) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None


class ProxyServer(uvicorn.Server):
    """uvicorn without its own signal handling: the launcher decides when the server stops."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass


def server_config(
    app: Any,
    host: str,
    port: int,
    client_timeout: float,
    lifespan: str = "on",
    send_timeout: float = HttpProtocol.send_timeout,
) -> uvicorn.Config:
    if warning := uvicorn_version_warning(uvicorn.__version__):
        _log.warning(warning)
    protocol = type(
        "HttpProtocol",
        (HttpProtocol,),
        {"client_timeout": client_timeout, "send_timeout": send_timeout},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan=lifespan,
        http=protocol,
        loop="none",
        ws="none",
        log_config=None,
        access_log=False,
        server_header=False,  # the engine's headers pass through; ours would duplicate them
        date_header=False,
        proxy_headers=False,  # `client` in the log is the peer; no X-Forwarded-* rewriting
        timeout_graceful_shutdown=5,
    )
