"""A scripted HTTP/1.1 server for protocol tests: each test writes the engine's side byte for byte.

What no real server does on cue (1xx before the answer, invalid chunking, a reset mid-body, a stall,
a socket that stops reading, a close while idle) is what a client of its own must survive, so the
engine here is a plain asyncio server whose every connection runs the test's `script(conn)`.
Requests are parsed with httptools (the parser uvicorn and vLLM's server use) so the tests also see
exactly what the client put on the wire.

`RawEngine` runs in the caller's event loop (tests of `app/proxy/upstream.py`, under asyncio and
uvloop); `RawEngineThread` runs one in a thread of its own, for a proxy served in-process
(tests/inproc.py).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunked_on_wire: bool = False

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class _Collector:
    """httptools callbacks -> whole requests, in order (pipelined ones included)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: collections.deque[Request] = collections.deque()
        self.current: Request | None = None
        self.head_done = False
        self._url = b""

    def on_message_begin(self) -> None:
        self._url = b""
        self._body = bytearray()
        self.current = Request("", "", [])
        self.head_done = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method().decode()
        self.current.target = self._url.decode("latin-1")
        te = self.current.header(b"transfer-encoding")
        self.current.chunked_on_wire = te is not None and b"chunked" in te.lower()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.body = bytes(self._body)
        self.done.append(self.current)
        self.current = None
        self.head_done = False


class RawConn:
    """One accepted connection, as the script sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.requests: list[Request] = []
        self.peer_closed = False
        """The client closed its side (EOF or reset seen by a read)."""
        self._collector = _Collector()
        self._eof = asyncio.Event()
        self._reading = False

    async def _read(self, n: int) -> bytes:
        self._reading = True
        try:
            data = await self.reader.read(n)
        except (ConnectionError, OSError):
            data = b""
        finally:
            self._reading = False
        if not data:
            self.peer_closed = True
            self._eof.set()
        return data

    async def _feed_once(self, n: int = 65536) -> bool:
        data = await self._read(n)
        if data:
            self._collector.parser.feed_data(data)
        return bool(data)

    async def read_request(self) -> Request | None:
        """The next whole request, or None once the client closed the connection."""
        while not self._collector.done:
            if not await self._feed_once():
                return None
        request = self._collector.done.popleft()
        self.requests.append(request)
        return request

    async def read_head(self) -> Request | None:
        """Read until the next request's headers are complete (its body is left unread, or read
        on by `read_request`)."""
        collector = self._collector
        while not collector.head_done and not collector.done:
            if not await self._feed_once(1024):
                return None
        return collector.done[0] if collector.done else collector.current

    async def wait_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the client closes the connection within `timeout`. While the script is reading
        it sees the close; otherwise this reads (and drops) what comes until then."""
        try:
            async with asyncio.timeout(timeout):
                while not self.peer_closed:
                    if self._reading:
                        await self._eof.wait()
                    else:
                        await self._read(65536)
                return True
        except TimeoutError:
            return False

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        """A clean close (FIN)."""
        self.writer.close()

    def reset(self) -> None:
        """An abortive close (RST), as when the engine's process dies."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[RawConn], Awaitable[None]]


async def serve_forever(conn: RawConn, answer: bytes | Callable[[Request], bytes]) -> None:
    """A keep-alive server: every request on the connection gets `answer`."""
    while (request := await conn.read_request()) is not None:
        await conn.send(answer(request) if callable(answer) else answer)


def stream_request(rid: str, headers: bytes = b"") -> bytes:
    """A streamed completion request's bytes, with `headers` (whole lines) added."""
    body = b'{"model":"m","prompt":"x","stream":true}'
    return (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"%bx-request-id: %b\r\ncontent-length: %d\r\n\r\n%b" % (headers, rid.encode(), len(body), body)
    )


def slow_client(port: int, rid: str, headers: bytes = b"") -> socket.socket:
    """A client with a small receive window that has sent a streamed completion request and reads
    nothing yet (back-pressure and stall tests)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connecting: a small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(stream_request(rid, headers))
    return sock


class ResponseBody:
    """httptools callbacks: a response body's length and its last bytes."""

    def __init__(self) -> None:
        self.size = 0
        self.tail = b""
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        self.tail = (self.tail + body)[-64:]

    def on_message_complete(self) -> None:
        self.done = True


def read_response(
    sock: socket.socket, size: int = 1 << 20, pause: float = 0.0, timeout: float = 30
) -> ResponseBody:
    """Read one response until it is whole or the connection ends (then `done` is False): `size`
    bytes at most per read, `pause` seconds between reads (a slow reader)."""
    body = ResponseBody()
    parser = httptools.HttpResponseParser(body)
    sock.settimeout(timeout)
    while not body.done:
        data = sock.recv(size)
        if not data:
            break
        parser.feed_data(data)
        if pause:
            time.sleep(pause)
    return body


def ok(body: bytes = b"ok", *, headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), headers, body)


@dataclass
class RawEngine:
    """The server, in the running event loop. `script` may be replaced between requests."""

    script: Script
    connections: list[RawConn] = field(default_factory=list)
    receive_buffer: int | None = None
    """SO_RCVBUF for accepted sockets: small makes a server that stops reading push back at once."""

    async def __aenter__(self) -> RawEngine:
        self._tasks: set[asyncio.Task] = set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.receive_buffer is not None:
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer
            )
        conn = RawConn(reader, writer)
        self.connections.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def __aexit__(self, *exc: Any) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in self.connections:
            conn.writer.transport.abort()
        await self._server.wait_closed()


class RawEngineThread:
    """A RawEngine in a thread (its own asyncio loop), for a proxy running in-process."""

    def __init__(self, script: Script, receive_buffer: int | None = None) -> None:
        self._script = script
        self._receive_buffer = receive_buffer
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.engine: RawEngine | None = None

    @property
    def script(self) -> Script:
        return self._script

    @script.setter
    def script(self, script: Script) -> None:
        self._script = script
        if self.engine is not None:
            self.engine.script = script

    @property
    def connections(self) -> list[RawConn]:
        assert self.engine is not None
        return self.engine.connections

    async def _main(self) -> None:
        async with RawEngine(self._script, receive_buffer=self._receive_buffer) as engine:
            self.engine = engine
            self.url = engine.url
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> RawEngineThread:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("raw engine did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
