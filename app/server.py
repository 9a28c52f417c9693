"""The HTTP server the proxy runs on: uvicorn (httptools, uvloop), configured in one place for the
launcher and the tests, with the guards uvicorn lacks.

uvicorn times out idle keep-alive connections but not a client that is slow to send its request:
a fresh connection that sends nothing, or headers a byte at a time (slowloris), holds a socket and
its buffers forever. `GuardedHttpToolsProtocol` gives every request `CLIENT_TIMEOUT` seconds from
its first byte (or from the connection's opening) to its last body byte: a client still sending
headers then gets `408` and the connection is closed; one stalled mid-body is disconnected, which
the app sees as a client hang-up.

Nor does it bound the other direction: a client that stops reading holds its answer, the engine's
connection and the engine's work for as long as it likes. One whose socket stays full (no room made
for the answer) for `CLIENT_SEND_TIMEOUT` seconds is disconnected (nginx's `send_timeout`), which the
app sees as a hang-up.

Nor does uvicorn (with httptools; its h11 protocol has a 16 KiB default) bound a request's head: a
header of any size is gathered in memory, and forwarded. Here the request line and headers may
take `MAX_HEAD_BYTES` and hold `MAX_HEADERS` fields; beyond either the client gets `431`, as soon
as the head passes the bound, and the connection ends (what it still sends is dropped unparsed for
up to `LINGER_S`, so that it reads the answer rather than a reset). Unparsable requests get an
OpenAI-shaped `400` instead of uvicorn's plain-text one. Each of these refusals (400, 408 while the
head was arriving, 431) is one request line in the log and counted in the request metrics, like
any answer of the app's.

It reaches into uvicorn's HttpToolsProtocol (the parser, the request cycle, the transport): those
internals are checked at import, and a uvicorn outside the versions this was written for is named
in a warning at start (`UVICORN_WRITTEN_FOR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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

UVICORN_WRITTEN_FOR = ((0, 30), (0, 55))
"""uvicorn >= 0.30, < 0.55: the internals used here read the same in 0.30 and 0.54 (tested)."""

_log = logging.getLogger("app.server")


def _uvicorn_internals_missing() -> list[str]:
    """What this module uses of uvicorn's internals and uvicorn no longer has."""
    needed = {
        HttpToolsProtocol: (
            "connection_made",
            "connection_lost",
            "data_received",
            "send_400_response",
            "on_message_begin",
            "on_url",
            "on_headers_complete",
            "on_message_complete",
            "on_response_complete",
            "pause_writing",
            "resume_writing",
        ),
        getattr(httptools_impl, "RequestResponseCycle", object): ("run_asgi", "send", "receive"),
        uvicorn.Server: ("capture_signals", "serve"),
    }
    missing = [
        f"{cls.__name__}.{name}" for cls, names in needed.items() for name in names if not hasattr(cls, name)
    ]
    # Instance attributes (RELAY_HOOK writes into a response uvicorn started): the names their
    # initialisers assign.
    assigned = {
        getattr(httptools_impl, "RequestResponseCycle", None): (
            "response_started",
            "response_complete",
            "chunked_encoding",
            "disconnected",
            "transport",
            "flow",
            "message_event",
        ),
        HttpToolsProtocol: ("flow", "cycle", "pipeline"),
        getattr(httptools_impl, "FlowControl", None): ("write_paused",),
    }
    for cls, names in assigned.items():
        init = getattr(cls, "__init__", None)
        code = getattr(init, "__code__", None)
        made = set(code.co_names) if code is not None else set()
        if cls is HttpToolsProtocol:
            made |= set(HttpToolsProtocol.connection_made.__code__.co_names)
        missing += [f"{getattr(cls, '__name__', cls)}.{name}" for name in names if name not in made]
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
        f"app/server.py uses uvicorn's HttpToolsProtocol internals and was written for uvicorn "
        f"{_version_range()}; uvicorn {version} is installed: run tests/app/test_server.py against it, "
        "then widen UVICORN_WRITTEN_FOR"
    )


if _missing := _uvicorn_internals_missing():
    raise RuntimeError(
        f"uvicorn {uvicorn.__version__} lacks {', '.join(_missing)}, which app/server.py uses; "
        f"it was written for uvicorn {_version_range()}"
    )


def _raw_error(status: int, message: str, code: str, request_id: str | None = None) -> bytes:
    """A whole HTTP/1.1 error response, OpenAI-shaped, that closes the connection."""
    body = error_body(status, message, code=code)
    rid = b"x-request-id: %b\r\n" % request_id.encode() if request_id else b""
    return b"%bcontent-type: application/json\r\nconnection: close\r\n%bcontent-length: %d\r\n\r\n%b" % (
        httptools_impl.STATUS_LINE[status],
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
    The end of the response is still `send`'s (uvicorn's bookkeeping: keep-alive, the next
    pipelined request); `close()` first."""

    __slots__ = ("_protocol", "_write", "write_chunks", "pause", "resume", "closed")

    def __init__(self, protocol: Any, wrapper: _HeadersWithBody, pause: Any, resume: Any) -> None:
        self._protocol = protocol
        self._write = wrapper.write  # the first write takes the held headers with it
        # Bytes already framed as chunks, once `started` (app/proxy/passthrough.py: a relayed
        # stream's reads of whole chunks, passed on as the engine framed them).
        self.write_chunks = wrapper._transport.write
        self.pause = pause
        self.resume = resume
        self.closed = False  # the client is gone (or the writer closed): writes are dropped

    def write(self, body: bytes) -> None:
        if self.closed:
            return
        self._write(b"%x\r\n%b\r\n" % (len(body), body))
        self._write = self.write_chunks

    @property
    def started(self) -> bool:
        """The response's headers are out (with the first body bytes)."""
        return self._write is self.write_chunks

    def close(self) -> None:
        self.closed = True
        if self._protocol._writer is self:
            self._protocol._writer = None


class _HeadersWithBody:
    """The client socket, as uvicorn sees it: a response's headers are held back until its first
    body bytes, or the end of the event-loop iteration, and leave with them in one `send` (uvicorn
    writes them separately: two syscalls per response where one does). Everything else passes."""

    __slots__ = ("_transport", "_loop", "_held", "_flush_handle", "hold_next")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None
        self.hold_next = False

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data = self._held + data
            self._held = None
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
        elif self.hold_next:
            self.hold_next = False
            self._held = data
            self._flush_handle = self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        self._flush_handle = None
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


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


_feed = HttpToolsProtocol.data_received  # uvicorn's: the parser, then its callbacks


class _Discard:
    """Stands in for the parser after a refusal: what the client still sends is dropped."""

    @staticmethod
    def feed_data(data: bytes) -> None:
        pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    client_timeout: float = 120.0
    send_timeout: float = 60.0

    _guard: asyncio.TimerHandle | None = None
    _send_guard: asyncio.TimerHandle | None = None  # armed while the client's buffer is full
    _in_headers = False
    _began = False  # a request began on this connection (its first byte re-armed the guard)
    # Bytes the head being received may still take; None while no head is being received (body,
    # response). Counted per read: a head that begins inside a read (pipelining) is counted from
    # the next one, so it can pass the bound by at most one read.
    _head_left: int | None = None
    _heads = 0  # heads completed on this connection
    _writer: BodyWriter | None = None  # the response being relayed straight into the transport
    # Requests still being answered when a pipelined one behind them was parsed: uvicorn keeps only
    # the newest (`cycle`) and the queued ones (`pipeline`), so a hang-up would not reach these.
    _earlier: tuple[Any, ...] = ()

    def _arm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard = self.loop.call_later(self.client_timeout, self._expire)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _expire(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        if not self._in_headers:  # mid-body: the app sees the hang-up and logs it (499)
            self.transport.close()
        elif self._began:
            self._refuse(408, "request not received in time (CLIENT_TIMEOUT)")
        else:  # a connection that never sent a byte: no request to log
            self.transport.write(_408)
            self.transport.close()

    def _refuse(self, status: int, error: str) -> None:
        """Answer a request the HTTP layer cannot pass to the app, log and count it, and end the
        connection (lingering: see LINGER_S)."""
        self._head_left = None
        method = path = ""
        if self.headers:  # the request line is complete once a header follows it
            method = self.parser.get_method().decode("ascii", "replace")
            with contextlib.suppress(httptools.HttpParserInvalidURLError):
                path = httptools.parse_url(self.url).path.decode("latin-1")[:512]
        # The request's age, from the guard armed at its first byte (no clock read per request).
        guard = self._guard
        age = self.loop.time() - guard.when() + self.client_timeout if guard else self.client_timeout
        self._disarm()
        rid = _refuse_line(status, error, method, path, self.headers, self.client, time.perf_counter() - age)
        cycle = self.cycle
        transport = self.transport
        if cycle is not None and not cycle.response_complete:
            transport.close()  # pipelined behind an answer under way: nothing can be written
            return
        message, code = _REFUSALS[status]
        transport.write(_raw_error(status, message, code, rid))
        self.parser = _Discard()  # type: ignore[assignment]
        if not transport.can_write_eof():  # TLS
            transport.close()
            return
        transport.flush()  # type: ignore[attr-defined]
        transport.write_eof()
        self._guard = self.loop.call_later(LINGER_S, transport.close)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to unparsable HTTP (e.g. invalid header characters), as OpenAI JSON."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self._in_headers:
            # Broken mid-body (e.g. invalid chunking): the request is already the app's, which sees
            # the connection end and writes the request's line, with what the client got.
            self._disarm()
            if not cycle.response_started:
                cycle.scope[REFUSED_KEY] = (400, "invalid HTTP in the request body")
                message, code = _REFUSALS[400]
                self.transport.write(_raw_error(400, message, code))
            self.transport.close()
            return
        self._refuse(400, "invalid HTTP request")

    def data_received(self, data: bytes) -> None:
        left = self._head_left
        if left is None:
            _feed(self, data)
            return
        heads = self._heads
        if len(data) <= left:
            _feed(self, data)
            if self._heads == heads and self._head_left is not None:  # still in the same head
                self._head_left = left - len(data)
            return
        # The head may end within the bytes it may still take: parse those, the rest only if it did.
        view = memoryview(data)
        _feed(self, view[:left])
        if self.transport.is_closing():
            return
        if self._heads == heads:
            self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return
        _feed(self, view[left:])

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _HeadersWithBody(transport, self.loop)  # type: ignore[assignment]
        self._in_headers = True
        self._head_left = MAX_HEAD_BYTES
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._began = True
        self._arm()

    def on_headers_complete(self) -> None:
        previous = self.cycle
        if previous is not None and not previous.response_complete:  # pipelined (rare)
            self._earlier = (*(c for c in self._earlier if not c.response_complete), previous)
        self._in_headers = False
        self._head_left = None
        self._heads += 1
        self.transport.hold_next = True  # type: ignore[attr-defined]
        if len(self.headers) > MAX_HEADERS:
            self.app, app = _too_many_headers, self.app  # this request's app: a 431
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        scope = self.scope
        scope[HANGUP_HOOK] = None  # the task just created has not run yet
        scope[ABORT_HOOK] = self._abort
        scope[RELAY_HOOK] = self._relay

    def on_message_complete(self) -> None:
        self._disarm()
        self._head_left = MAX_HEAD_BYTES  # what follows is the next request's head
        super().on_message_complete()

    def _open_cycles(self) -> list[Any]:
        """Every request on this connection not answered yet, oldest first."""
        cycles = [*self._earlier, *(cycle for cycle, _ in reversed(self.pipeline)), self.cycle]
        return [c for c in dict.fromkeys(cycles) if c is not None and not c.response_complete]

    def _abort(self, scope: dict) -> None:
        for cycle in self._open_cycles():
            if cycle.scope is scope:
                cycle.disconnected = True  # nothing more is written for it, and no error logged
        self._disarm()
        self.transport.close()  # what was written still leaves, then the connection ends

    def _relay(self, scope: dict, pause: Any, resume: Any) -> BodyWriter | None:
        cycle = self.cycle
        if cycle is None or cycle.scope is not scope:  # another request's turn: not this one's
            return None
        if (
            not cycle.response_started
            or cycle.response_complete
            or cycle.disconnected
            or not cycle.chunked_encoding
            or self.transport.is_closing()
        ):
            return None
        writer = self._writer = BodyWriter(self, self.transport, pause, resume)  # type: ignore[arg-type]
        if self.flow.write_paused:  # already above the high water mark
            pause()
        return writer

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_guard is None:
            self._send_guard = self.loop.call_later(self.send_timeout, self._send_stalled)
        if self._writer is not None:
            self._writer.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_guard is not None:
            self._send_guard.cancel()
            self._send_guard = None
        if self._writer is not None:
            self._writer.resume()

    def _send_stalled(self) -> None:
        """The client made no room for the answer in `send_timeout` seconds: end the connection
        at once (closing would wait for the buffer to drain, which it never does). The request's
        task sees the hang-up: 499, and the engine's work aborted."""
        self._send_guard = None
        cycles = self._open_cycles()
        if cycles:  # the oldest: the one being written
            rec = cycles[0].scope.get(RECORD_KEY)
            if rec is not None:
                rec.error = f"client read nothing for {self.send_timeout:g} s (CLIENT_SEND_TIMEOUT)"
        self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests uvicorn's keep-alive timeout applies; a new request re-arms the guard.

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._send_guard is not None:
            self._send_guard.cancel()
            self._send_guard = None
        if self._writer is not None:
            self._writer.closed = True
        open_cycles = self._open_cycles()
        for cycle in open_cycles:
            if cycle is not self.cycle:  # uvicorn tells only the newest
                cycle.disconnected = True
                cycle.message_event.set()
            if hook := cycle.scope.get(HANGUP_HOOK):
                hook()
        # The hooks are bound to this protocol, which holds the scopes: a reference cycle that
        # would leave every closed connection to the cyclic collector (heap sawtooth; RESULTS.md).
        for cycle in (*open_cycles, self.cycle):
            if cycle is not None:
                cycle.scope[ABORT_HOOK] = cycle.scope[RELAY_HOOK] = None
        self._earlier = ()
        super().connection_lost(exc)


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
    send_timeout: float = GuardedHttpToolsProtocol.send_timeout,
) -> uvicorn.Config:
    if warning := uvicorn_version_warning(uvicorn.__version__):
        _log.warning(warning)
    protocol = type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
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
