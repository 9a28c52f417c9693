"""Run the proxy app in this process (uvicorn in a thread), in front of any upstream.

For proxy behaviour that needs no engine start of its own: a second proxy in front of the session's
real engine (auth, body limits) or in front of a fault-injecting fake (tests/fake_engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import io
import json
import re
import socket
import struct
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import uvicorn

from app.logs import configure_logging
from app.main import create_app
from app.proxy.upstream import _Connection
from app.runtime import Phase, Runtime
from app.server import server_config
from app.settings import Settings
from stack import free_port, wait_for


class LogSink(io.TextIOBase):
    """A thread-safe stream the proxy logs into; tests read the JSON records back."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.RLock()  # a finalizer that logs can re-enter a write (see app/logs.py)

    def write(self, s: str) -> int:
        with self._lock:
            self._lines.extend(line for line in s.splitlines() if line.strip())
        return len(s)

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            lines = list(self._lines)
        return [json.loads(line) for line in lines if line.startswith("{")]

    def request(self, request_id: str, timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.records():
                if rec.get("event") == "request" and rec.get("request_id") == request_id:
                    return rec
            time.sleep(0.02)
        raise AssertionError(f"no log line for {request_id}")


_TMP = tempfile.TemporaryDirectory(prefix="inproc-")
LOGS = LogSink()
configure_logging("DEBUG", "json", stream=LOGS)


class InProcessProxy:
    def __init__(
        self,
        upstream_url: str,
        runtime: Runtime | None = None,
        plain_uvicorn: bool = False,
        wrap: Any = None,
        uvloop: bool = False,
        **settings: Any,
    ) -> None:
        """`plain_uvicorn`: serve with uvicorn's own protocol instead of the proxy's (app/server.py),
        as `create_app()` is served when mounted elsewhere. `wrap(app)`: the app the server runs
        (e.g. one that counts the `send` calls of the app it wraps). `uvloop`: on uvloop's event
        loop, as the launcher serves (asyncio's otherwise)."""
        engine_port = urlparse(upstream_url).port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime = runtime or Runtime()
        if runtime is None:
            self.runtime.set_phase(Phase.READY)
        settings.setdefault("SCRAPE_INTERVAL", 0)  # no dashboard history unless a test asks for it
        settings.setdefault("USAGE_DB_PATH", str(Path(_TMP.name) / f"usage-{self.port}.db"))  # not data/
        self.settings = Settings(
            MODEL_NAME=settings.pop("MODEL_NAME", "m"), ENGINE_PORT=engine_port, PORT=self.port, **settings
        )
        app = create_app(self.settings, self.runtime)
        config = server_config(
            app if wrap is None else wrap(app),
            "127.0.0.1",
            self.port,
            self.settings.CLIENT_TIMEOUT,
            send_timeout=self.settings.CLIENT_SEND_TIMEOUT,
        )
        if plain_uvicorn:
            config.http = "httptools"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self._serve_on_uvloop if uvloop else self.server.run, daemon=True
        )
        self.logs = LOGS

    def _serve_on_uvloop(self) -> None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self.server.serve())

    def __enter__(self) -> InProcessProxy:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process proxy did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


_OWN_CODE = re.compile(r"/(app|uvicorn)/")


def _ours(obj: Any) -> str | None:
    """A label for an object of the proxy's code (`app`, `uvicorn`); None for anything else's."""
    code = obj.f_code if isinstance(obj, types.FrameType) else getattr(obj, "cr_code", None)
    if isinstance(code, types.CodeType):  # a frame or a coroutine
        return f"{type(obj).__name__} {code.co_qualname}" if _OWN_CODE.search(code.co_filename) else None
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    module = obj.__module__ if isinstance(obj, types.FunctionType) else type(obj).__module__
    if module == "app" or module.startswith(("app.", "uvicorn")):
        return f"{type(obj).__name__} {module}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return None


def cyclic_garbage(proxies: list[InProcessProxy], run: Callable[[], list[str]]) -> Counter[str]:
    """What of the proxy's code only the cyclic garbage collector would free after `run()` (which
    returns its requests' ids), once every request is logged and every connection is closed.
    Other code in this process (engines, clients) may leave garbage of its own: not counted."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # unreachable objects go to gc.garbage instead of being freed
    try:
        for request_id in run():
            LOGS.request(request_id)  # written after the answer's last byte
        servers = [p.server for p in proxies]
        wait_for(
            lambda: not any(s.server_state.connections for s in servers), what="the connections to close"
        )
        time.sleep(0.05)  # the loop finishes what the last connection_lost started
        gc.collect()
        return Counter(label for obj in gc.garbage if (label := _ours(obj)))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def exchange(
    port: int, requests: list[tuple[str, str, Any, dict[str, str]]], timeout: float = 10
) -> list[str]:
    """`requests` (method, path, body, headers) one after the other on one connection, each answer
    read whole (or as far as it came, if it broke off), then the connection closed: their request
    ids. A body that is not bytes is sent chunked."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    ids = []
    try:
        for method, path, body, headers in requests:
            chunked = body is not None and not isinstance(body, bytes)
            conn.request(method, path, body, headers, encode_chunked=chunked)
            resp = conn.getresponse()
            with contextlib.suppress(http.client.IncompleteRead):  # the engine broke off: so did the answer
                resp.read()
            ids.append(resp.headers["x-request-id"])
    finally:
        conn.close()
    return ids


def leave_after_first_event(
    port: int, body: bytes, head: str = "", reset: bool = False, timeout: float = 10
) -> str:
    """A client that POSTs a streamed chat request (`head`: more header lines, each ending in CRLF),
    reads up to its first event and leaves, with a reset (as a killed client's) if `reset`: the
    request's id."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{head}"
        f"content-length: {len(body)}\r\n\r\n"
    )
    sock.sendall(request.encode() + body)
    got = b""
    while b"data:" not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return next(
        line.split(b":", 1)[1].strip().decode()
        for line in got.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def count_slow_reads(monkeypatch: Any) -> list[bytes]:
    """Every engine read that takes the slow way (the response parser, then the sink) from now on,
    in this process: what the compiled passthrough did not pass on (app/proxy/passthrough.py)."""
    slow: list[bytes] = []
    original = _Connection._slow_received

    def counted(self: _Connection, data: bytes) -> None:
        slow.append(data)
        original(self, data)

    monkeypatch.setattr(_Connection, "_slow_received", counted)
    return slow
