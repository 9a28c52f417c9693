"""The one pooled HTTP/1.1 client to the engine, and the one place its failures are classified.

Why not a general-purpose client: the proxy's CPU cost per request is mostly its upstream leg
(`bench/upstream_clients.py`: on one core, a minimal proxy on aiohttp relayed ~4,800 req/s, on httpx
~640), and the engine is one known HTTP/1.1 server on loopback or a private network. So this client
is the server side of uvicorn turned around: an `asyncio.Protocol` per connection, `httptools` (the
parser uvicorn uses) for responses, one `transport.write` per request, and bytes handed on as they
arrive. It does what the proxy needs and nothing else: keep-alive pooling, `Content-Length` and
chunked bodies both ways, flow control both ways, TLS for an external engine, timeouts (connect;
an engine that stops reading the request; silence before the response and between body chunks),
and no redirects, cookies, decompression or header rewriting.

HTTP/1.1 as a client must take it (RFC 9112; tests/app/proxy/test_upstream_protocol.py): interim
`1xx` answers are skipped, the final one is the response (`101` is refused: no upgrade is ever
asked for); a response with neither length nor chunking ends when the engine closes (and its
connection is not reused), one cut short by a close, a reset or broken chunking is an error; a
connection goes back to the pool only after a complete response to a completely sent request, and
bytes arriving on it while idle (an answer nobody asked for) end it.

Failures are `UpstreamError`s of three kinds (`connect`, `timeout`, `protocol`); the handler maps
them to statuses in one table.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Literal
from urllib.parse import urlsplit

import httptools

from app.proxy.headers import Headers
from app.proxy.passthrough import RelayBase

ErrorKind = Literal["connect", "timeout", "protocol"]
# What a relayed stream's steady reads go through (RelayBase.open_passthrough): the client
# transport's write (bytes framed as chunks), a callable given each chunk's events, the writer (its
# `closed` ends it), and whether finishing and usage events must still go through the sink.
Passthrough = tuple[Callable[[bytes], object], Callable[[bytes], object], object, bool]

_HIGH_WATER = 1 << 20  # bytes queued from the engine before we stop reading its socket
_LOW_WATER = 1 << 18
_NO_BODY_METHODS = ("GET", "HEAD", "DELETE", "OPTIONS")


class UpstreamError(Exception):
    """The engine could not be reached (`connect`), went silent (`timeout`) or broke the HTTP
    exchange (`protocol`, e.g. it died mid-response)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind

    def again(self) -> UpstreamError:
        """A copy to raise. A connection keeps its error and may raise it more than once; raised
        itself, it would carry a traceback whose frames hold the connection: a reference cycle."""
        return UpstreamError(self.kind, str(self))


class _Unsolicited(Exception):
    """A second response began on a connection that had already answered: stop parsing there."""


class _Connection(RelayBase, asyncio.Protocol):
    """One keep-alive connection to the engine; one response at a time. `data_received` is
    `RelayBase`'s (app/proxy/passthrough.py): a relayed stream's steady reads go straight on, the
    rest comes to `_slow_received`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.out = False  # handed out by the pool for a request, and not back or dropped yet
        # Made once connected (it holds this protocol's callbacks: a cycle, broken in
        # connection_lost; a connection that fails to connect never gets one).
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: Headers = []
        self._head: asyncio.Future | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._waiter: asyncio.Future | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._idle_timeout = 0.0
        self._last_data = 0.0
        self._complete = False
        self._error: UpstreamError | None = None
        self._reading_paused = False
        self._drain: asyncio.Future | None = None
        self._write_paused = False
        self._write_left = 0  # bytes buffered for the engine at the last write-progress check
        self._write_timer: asyncio.TimerHandle | None = None
        self.started = False  # any byte of the current response arrived
        self.busy = False  # a request is out and its final response not yet complete
        self.status = 0  # the final response's status, once its headers are in
        self._interim = False  # the message being parsed is a 1xx
        # Relay mode (`relay`): body bytes go to this callable from `data_received`, as they arrive,
        # instead of being queued for `read`; the task waits only for the end (`wait_end`). What it
        # returns says whether the next reads may pass straight on, through `_passthrough`.
        self._sink: Callable[[bytes], bool] | None = None
        self._passthrough: Passthrough | None = None
        self._sink_error: BaseException | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._parser = httptools.HttpResponseParser(self)

    def _slow_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked on this connection: a stale or smuggled answer
            self.abort()
            return
        self.started = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback raised
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            elif not isinstance(cause, _Unsolicited):
                self._fail(UpstreamError("protocol", f"invalid HTTP from the engine: {exc}"))
            self.abort()
        # Relay mode: what this read brought goes on at once, but not the response's last bytes,
        # which the waiting task sends with the response's end (one write), nor bytes after a
        # failure (the task decides what of them the client gets).
        if self._sink is not None and self._chunks and not self._complete and self._error is None:
            chunks = self._chunks
            chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            try:
                self._to_sink(chunk)
            except BaseException as exc:  # the relay's own failure: the task re-raises it
                self._sink_failed(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.close_passthrough()
        if not self._complete:
            if exc is None and self.status and self._reads_to_close():
                self._complete = True  # a body without length or chunking ends with the connection
                self.busy = False
                self._disarm()
                self._wake()
            else:
                self._fail(UpstreamError("protocol", "the engine closed the connection"))
        self._wake_writer()
        # The parser holds this protocol's callbacks, and the relay's sink the request's objects,
        # which hold this connection: reference cycles, left to the cyclic collector unless broken
        # here (nothing is parsed or relayed after the connection is gone).
        self._parser = None
        self._sink = None
        self._passthrough = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.busy:  # the final response is complete: whatever follows was not asked for
            raise _Unsolicited

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 102, 103 Early Hints: the final answer is still to come
            if status == 101:
                raise UpstreamError("protocol", "the engine switched protocols (101); none was asked for")
            self._interim = True
            self._headers = []
            return
        self.status = status
        if self._head is not None and not self._head.done():
            self._head.set_result(status)
        self._wake_writer()  # an answer before the whole body went out: stop sending it

    # Whether the parser is between two chunks, for RelayBase: a read that ended just after a
    # chunk's closing CRLF (the last callback was on_chunk_complete, and no byte followed it).
    def on_chunk_header(self) -> None:
        self._edge = False

    def on_chunk_complete(self) -> None:
        self._edge = True

    def on_body(self, body: bytes) -> None:
        self._edge = False
        self._chunks.append(body)
        if self._sink is not None:  # handed on at the end of this read (data_received)
            return
        self._queued += len(body)
        if self._queued > _HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self.busy = False
        self._disarm()
        self.close_passthrough()
        if not self._parser.should_keep_alive():
            self.closed = True
        self._wake()

    # --- used by Upstream / UpstreamResponse --------------------------------------------------

    def _check_idle(self) -> None:
        """One timer per response, not one per read: it fires at the idle deadline and, if bytes
        came in meanwhile, re-arms for the new one (a token stream reads thousands of times)."""
        self._watchdog = None
        if self._complete or self._error is not None or self.closed:
            return
        if self._reading_paused and self._sink is not None:
            # The client is not reading (relay back-pressure): the engine cannot send, so its
            # silence is not counted until reading resumes.
            self._last_data = self._loop.time()
        deadline = self._last_data + self._idle_timeout
        if self._loop.time() < deadline:
            self._watchdog = self._loop.call_at(deadline, self._check_idle)
            return
        self._fail(UpstreamError("timeout", "the engine did not answer in time"))

    def _reads_to_close(self) -> bool:
        """The final response's body is delimited by the end of the connection (RFC 9112 6.3):
        neither chunked (as the final coding) nor of a given length, and a status that has a body."""
        if self.status in (204, 304):
            return False
        for name, value in self._headers:
            if name == b"content-length":
                return False
            if name == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
                return False
        return True

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._complete:  # the response already came through whole: nothing to fail
            return
        if self._error is None:
            self._error = error.with_traceback(None)  # kept, and raised as copies (`again`)
        self.close_passthrough()
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()
        self._wake_writer()

    def _wake_writer(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _check_write(self, timeout: float) -> None:
        """While a write waits for the engine to read: progress since the last look re-arms the
        timer; none in `timeout` seconds is the engine not reading."""
        drain = self._drain
        if drain is None or drain.done() or self.transport is None:
            return
        left = self.transport.get_write_buffer_size()
        if left < self._write_left:
            self._write_left = left
            self._write_timer = self._loop.call_later(timeout, self._check_write, timeout)
        else:
            drain.set_exception(UpstreamError("timeout", "the engine stopped reading the request"))

    def begin(self) -> asyncio.Future:
        """Reset per-response state; returns the future of the status code."""
        self._sink = None
        self._passthrough = None
        self.close_passthrough()
        self._edge = False
        self._sink_error = None
        self._headers = []
        self._chunks.clear()
        self._queued = 0
        self._complete = False
        self._error = None
        self.started = False
        self.busy = True
        self.status = 0
        self._interim = False
        self._disarm()
        self._last_data = self._loop.time()
        self._head = self._loop.create_future()
        return self._head

    async def write(self, data: bytes, timeout: float) -> bool:
        """Send request bytes, waiting while the engine reads slower than we write; raises
        UpstreamError if it reads nothing for `timeout` seconds. False if the engine answered (or
        closed) before taking them all: the rest of the request is not sent, and this connection is
        not reused."""
        if self.closed or self.status:
            self.closed = True
            return False
        assert self.transport is not None
        self.transport.write(data)
        while self._write_paused:
            if self.closed or self.status:
                self.closed = True
                return False
            self._drain = drain = self._loop.create_future()
            self._write_left = self.transport.get_write_buffer_size()
            self._write_timer = self._loop.call_later(timeout, self._check_write, timeout)
            try:
                await drain
            finally:
                self._drain = None
                if self._write_timer is not None:
                    self._write_timer.cancel()
                    self._write_timer = None
        return True

    async def _wait_data(self, timeout: float) -> None:
        """Until the engine sends bytes, ends or fails; the idle watchdog is armed once per read."""
        self._waiter = waiter = self._loop.create_future()
        if self._watchdog is None:
            self._idle_timeout = timeout
            self._watchdog = self._loop.call_at(self._last_data + timeout, self._check_idle)
        try:
            await waiter
        finally:
            self._waiter = None

    async def read(self, timeout: float) -> bytes:
        """The next body bytes, b"" at the end; raises UpstreamError after `timeout` seconds
        without a byte from the engine."""
        while not self._chunks:
            if self._error is not None:
                raise self._error.again()
            if self._complete:
                return b""
            await self._wait_data(timeout)
        if len(self._chunks) == 1:
            chunk = self._chunks.popleft()
        else:  # several arrived while nobody was reading: hand them on as one
            chunk = b"".join(self._chunks)
            self._chunks.clear()
        self._queued -= len(chunk)
        if self._reading_paused and self._queued < _LOW_WATER and self.transport is not None:
            self._reading_paused = False
            # While paused the engine could not send: its silence is counted from now on.
            self._last_data = self._loop.time()
            self.transport.resume_reading()
        return chunk

    # --- relay mode -------------------------------------------------------------------------

    def relay(self, sink: Callable[[bytes], bool], passthrough: Passthrough | None = None) -> None:
        """From now on, hand body bytes to `sink` from `data_received`, one call per read (what is
        queued already, first), instead of queueing them for `read`: a token stream then costs no
        task wake-up per event. The response's last bytes stay queued for `read` after `wait_end`.
        `sink` runs inside the event loop's read callback: it must not block; what it raises is
        re-raised by `wait_end`. While it returns True (the stream is under way), reads of whole
        `data:` events go to the client without it (`RelayBase`), through `passthrough`."""
        self._sink = sink
        self._passthrough = passthrough
        if self._reading_paused and self.transport is not None:  # paused by `read`'s high water
            self._reading_paused = False
            self._last_data = self._loop.time()
            self.transport.resume_reading()
        if self._chunks and not self._complete and self._error is None:
            self._flush_to_sink()

    def _flush_to_sink(self) -> None:
        try:
            self._to_sink(self.take_queued())
        except BaseException as exc:  # the relay's own failure: the task re-raises it
            self._sink_failed(exc)

    def _to_sink(self, chunk: bytes) -> None:
        steady = self._sink(chunk)  # type: ignore[misc]
        if steady and self._passthrough is not None and not self._complete:
            if not self.passing:
                write, seen, writer, strip = self._passthrough
                self.open_passthrough(write, seen, self._loop.time, writer, strip)
        elif self.passing:
            self.close_passthrough()

    def _sink_failed(self, exc: BaseException) -> None:
        self.close_passthrough()
        self._sink = None
        self._sink_error = exc
        self.abort()
        self._wake()

    def take_queued(self) -> bytes:
        """Whatever body bytes are queued (relay mode: the last ones, or those of the read that
        failed), without waiting or raising."""
        chunks = self._chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._queued = 0
        return chunk

    def pause_relay(self) -> None:
        """The client is not keeping up: stop reading the engine (it stops sending)."""
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_relay(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self._last_data = self._loop.time()  # its silence is counted from now on
            self.transport.resume_reading()

    async def wait_end(self, timeout: float) -> None:
        """In relay mode: return once the response is complete (its last bytes queued for `read`);
        raise its UpstreamError (or the sink's exception) if it failed, or after `timeout` seconds
        without a byte from the engine."""
        while True:
            if self._sink_error is not None:
                # Raised once, not kept: kept, its traceback would make a reference cycle.
                error, self._sink_error = self._sink_error, None
                raise error
            if self._error is not None:
                raise self._error.again()
            if self._complete:
                return
            await self._wait_data(timeout)

    @property
    def reusable(self) -> bool:
        return self._complete and self._error is None and not self.closed

    def abort(self) -> None:
        self.closed = True
        self._disarm()
        self.close_passthrough()
        # A head nobody awaits any more (the client hung up mid-upload) would otherwise be failed
        # by connection_lost and logged as "Future exception was never retrieved".
        if self._head is not None and not self._head.done():
            self._head.cancel()
        if self.transport is not None:
            self.transport.abort()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(UpstreamError("timeout", "the engine did not answer in time"))


class UpstreamResponse:
    __slots__ = ("_conn", "_pool", "_read_timeout", "status", "headers", "_released")

    def __init__(self, conn: _Connection, pool: Upstream, status: int, read_timeout: float) -> None:
        self._conn = conn
        self._pool = pool
        self._read_timeout = read_timeout
        self.status = status
        self.headers: Headers = conn._headers
        self._released = False

    async def read(self) -> bytes:
        return await self._conn.read(self._read_timeout)

    @property
    def complete(self) -> bool:
        """The whole body has arrived (some of it may still be queued for `read`)."""
        return self._conn._complete

    @property
    def at_end(self) -> bool:
        """Nothing more to read: the whole body has been handed out."""
        return self._conn._complete and not self._conn._chunks

    def reader(self) -> Callable[[], Awaitable[bytes]]:
        """`read` without the wrapping call, for the per-token loop of a stream."""
        return functools.partial(self._conn.read, self._read_timeout)

    def relay(self, sink: Callable[[bytes], bool], passthrough: Passthrough | None = None) -> None:
        """Body bytes to `sink` as they arrive, from the connection's read callback (see
        `_Connection.relay`); then `wait_end`, then `read` for the last bytes."""
        self._conn.relay(sink, passthrough)

    @property
    def passed(self) -> int:
        """Chunks passed straight to the client on this connection so far (`RelayBase`): events
        the sink did not see, for the keep-alive's count of what was sent."""
        return self._conn.passed

    async def wait_end(self) -> None:
        await self._conn.wait_end(self._read_timeout)

    def take_queued(self) -> bytes:
        return self._conn.take_queued()

    def pause_relay(self) -> None:
        self._conn.pause_relay()

    def resume_relay(self) -> None:
        self._conn.resume_relay()

    async def body(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    async def body_then_release(self) -> bytes:
        """The whole body, then the connection back to the pool (dropped if the read failed)."""
        try:
            body = await self.body()
        except BaseException:
            self.close()
            raise
        self.release()
        return body

    def close(self) -> None:
        """Drop the connection (the engine sees the disconnect and aborts the request)."""
        if not self._released:
            self._released = True
            self._pool._drop(self._conn)

    def release(self) -> None:
        """Return a fully read connection to the pool (or drop it if it cannot be reused)."""
        if not self._released:
            self._released = True
            self._pool._put(self._conn)


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        idle_timeout: float,
        keepalive: float = 4.0,
        max_idle: int = 100,
        demand_window: float = 1.0,
    ) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"engine URL must be http(s)://host[:port], not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._host_line = b"host: " + host_header.encode("idna") + b"\r\n"
        self._connect_timeout = connect_timeout
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        # Idle connections are dropped before the engine's own keep-alive (uvicorn: 5 s) ends them,
        # and beyond `max_idle` once a burst is over: the longest idle go first. Under load the pool
        # keeps as many as were out at once in the last one to two `demand_window`s: closing those
        # only to open them again a moment later (many answers end in one loop iteration, before
        # the requests that will reuse them arrive) cost a connection per request past `max_idle`.
        self._keepalive = keepalive
        self._max_idle = max_idle
        self._demand_window = demand_window
        self._out = 0  # connections out for a request
        self._peak = self._peak_before = 0  # the most out at once: this window, the one before
        self._window_end = 0.0
        self._idle: collections.deque[_Connection] = collections.deque()  # oldest on the left
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        idle, self._idle = self._idle, collections.deque()
        for conn in idle:
            conn.abort()

    # --- the pool -----------------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        loop = self._loop or asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise UpstreamError("timeout", "connecting to the engine timed out") from exc
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect to the engine: {exc}") from exc
        return conn

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection (the least likely to be closed by the engine)."""
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            conn.abort()
        return None

    def _hand_out(self, conn: _Connection) -> _Connection:
        conn.out = True
        self._out += 1
        if self._out > self._peak:  # a new peak (rare under steady load): is it this window's?
            self._rotate(time.monotonic())
            self._peak = max(self._peak, self._out)
        return conn

    def _back(self, conn: _Connection) -> None:
        if conn.out:
            conn.out = False
            self._out -= 1

    def _drop(self, conn: _Connection) -> None:
        self._back(conn)
        conn.abort()

    def _rotate(self, now: float) -> None:
        if now >= self._window_end:  # a new window; the one before it ended just now, or long ago
            stale = now >= self._window_end + self._demand_window
            self._peak_before = 0 if stale else self._peak
            self._peak = self._out
            self._window_end = now + self._demand_window

    def _demand(self, now: float) -> int:
        """The most connections out at once in this demand window and the one before it."""
        self._rotate(now)
        return max(self._peak, self._peak_before)

    def _put(self, conn: _Connection) -> None:
        self._back(conn)
        # An idle connection holds nothing of the request it served (its relay sink holds the
        # client's connection and the request's objects): freed now, not when it is next used.
        conn._sink = conn._passthrough = None
        if not conn.reusable:
            conn.abort()
            return
        now = conn.idle_since = time.monotonic()
        idle = self._idle
        idle.append(conn)
        if len(idle) > self._max_idle:
            keep = max(self._max_idle, self._demand(now))
            while len(idle) > keep:
                idle.popleft().abort()
        while now - idle[0].idle_since >= self._keepalive:  # expired: closed, not kept
            idle.popleft().abort()

    # --- requests -----------------------------------------------------------------------------

    def _head(self, method: str, target: str, headers: Headers, framing: bytes) -> bytes:
        lines = [
            method.encode(),
            b" ",
            (self._prefix + target).encode("latin-1"),
            b" HTTP/1.1\r\n",
            self._host_line,
        ]
        for name, value in headers:
            lines += [name, b": ", value, b"\r\n"]
        lines += [framing, b"\r\n"]
        return b"".join(lines)

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
        *,
        timeout: float | None = None,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Send a request; returns once the response headers arrived (within the first-byte
        timeout, or `timeout`). `headers` must not carry framing headers (`content-length`,
        `transfer-encoding`): the client writes its own, from `body` (bytes) or `length` (a
        streamed body of known size; chunked otherwise)."""
        head_timeout = timeout if timeout is not None else self._first_byte_timeout
        # Silence in either direction: the engine not sending, or not reading what we send.
        read_timeout = timeout if timeout is not None else self._idle_timeout
        if body is None or isinstance(body, bytes):
            if body:
                framing = b"content-length: %d\r\n" % len(body)
            else:  # an empty POST still says so; a bodiless GET says nothing
                framing = b"" if method in _NO_BODY_METHODS else b"content-length: 0\r\n"
            message = self._head(method, target, headers, framing) + (body or b"")
            # A pooled connection the engine closed a moment ago fails before any response byte:
            # the engine never saw the request, so it is sent once more on a fresh connection.
            for attempt in (0, 1):
                conn = self._take_idle() if attempt == 0 else None
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                self._hand_out(conn)
                head_future = conn.begin()
                try:
                    await conn.write(message, read_timeout)
                    status = await self._await_head(conn, head_future, head_timeout)
                except UpstreamError as exc:
                    self._drop(conn)
                    if reused and exc.kind == "protocol" and not conn.started:
                        continue
                    raise
                except BaseException:  # cancelled (the client hung up): the engine must see it too
                    self._drop(conn)
                    raise
                return self._response(conn, status, method, read_timeout)
            raise AssertionError("unreachable")
        # A streamed body is read from the client as it goes out and cannot be sent twice: it never
        # goes on a pooled connection the engine may have closed a moment ago.
        conn = self._hand_out(await self._connect())
        head_future = conn.begin()
        try:
            framing = (
                b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
            )
            sending = await conn.write(self._head(method, target, headers, framing), read_timeout)
            if sending:
                async for chunk in body:
                    if chunk and not await conn.write(
                        chunk if length is not None else b"%x\r\n%b\r\n" % (len(chunk), chunk), read_timeout
                    ):
                        break  # the engine answered or closed: the rest is not sent
                else:
                    if length is None:
                        await conn.write(b"0\r\n\r\n", read_timeout)
            status = await self._await_head(conn, head_future, head_timeout)
        except BaseException:
            self._drop(conn)
            raise
        return self._response(conn, status, method, read_timeout)

    async def _await_head(self, conn: _Connection, head: asyncio.Future, timeout: float) -> int:
        timer = None if head.done() else conn._loop.call_later(timeout, _expire, head)
        try:
            return head.result() if timer is None else await head
        except UpstreamError as exc:
            # The future keeps its error, and the error its traceback, whose frames hold the
            # future: a reference cycle. A copy goes on; the kept one loses its traceback.
            exc.__traceback__ = None
            raise exc.again() from None
        finally:
            if timer is not None:
                timer.cancel()

    def _response(self, conn: _Connection, status: int, method: str, read_timeout: float) -> UpstreamResponse:
        if method == "HEAD":  # no body follows, whatever the headers say
            conn._complete = True
            conn.closed = True
        return UpstreamResponse(conn, self, status, read_timeout)

    async def get(self, path: str, timeout: float) -> tuple[int, bytes]:
        """A small GET for the proxy's own use (health, version, metrics)."""
        resp = await self.request("GET", path, [], None, timeout=timeout)
        return resp.status, await resp.body_then_release()
