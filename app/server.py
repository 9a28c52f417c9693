"""The HTTP server the proxy runs on: uvicorn (httptools, uvloop), configured in one place for the
launcher and the tests, with a guard uvicorn lacks.

uvicorn times out idle keep-alive connections but not a client that is slow to send its request:
a fresh connection that sends nothing, or headers a byte at a time (slowloris), holds a socket and
its buffers forever. `GuardedHttpToolsProtocol` gives every request `CLIENT_TIMEOUT` seconds from
its first byte (or from the connection's opening) to its last body byte: a client still sending
headers then gets `408` and the connection is closed; one stalled mid-body is disconnected, which
the app sees as a client hang-up. Unparsable requests get an OpenAI-shaped `400` instead of
uvicorn's plain-text one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import error_body


def _raw_error(status_line: bytes, status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, OpenAI-shaped, that closes the connection."""
    body = error_body(status, message, code=code)
    return (
        b"HTTP/1.1 %b\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%b"
        % (
            status_line,
            len(body),
            body,
        )
    )


_408 = _raw_error(b"408 Request Timeout", 408, "The request was not received in time.", "request_timeout")
_400 = _raw_error(
    b"400 Bad Request", 400, "Invalid HTTP request (malformed request line or headers).", "invalid_http"
)


# Where an app may put a callable for the server to call if the client's connection is lost before
# the response is complete (the request's scope holds the key, None, when the server offers it).
HANGUP_HOOK = "app.hangup_hook"


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


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    client_timeout: float = 120.0

    _guard: asyncio.TimerHandle | None = None
    _in_headers = False

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
        if self._in_headers:
            self.transport.write(_408)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to unparsable HTTP (e.g. invalid header characters), as OpenAI JSON."""
        self._disarm()
        self.transport.write(_400)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _HeadersWithBody(transport, self.loop)  # type: ignore[assignment]
        self._in_headers = True
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self.transport.hold_next = True  # type: ignore[attr-defined]
        super().on_headers_complete()
        self.scope[HANGUP_HOOK] = None  # the task just created has not run yet

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests uvicorn's keep-alive timeout applies; a new request re-arms the guard.

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and (hook := cycle.scope.get(HANGUP_HOOK)):
            hook()
        super().connection_lost(exc)


class ProxyServer(uvicorn.Server):
    """uvicorn without its own signal handling: the launcher decides when the server stops."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass


def server_config(
    app: Any, host: str, port: int, client_timeout: float, lifespan: str = "on"
) -> uvicorn.Config:
    protocol = type(
        "GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"client_timeout": client_timeout}
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
