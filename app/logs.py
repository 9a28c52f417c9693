"""Logging: JSON lines on stdout (console rendering only on a TTY), for our code and for the
libraries that log through the standard library (uvicorn, aiohttp, huggingface_hub)."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
]


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


class LineWriter:
    """structlog's logger: lines written during one event-loop iteration leave in one write (a
    busy proxy writes hundreds of request lines a second; one syscall each is a measurable cost).
    Outside a running loop, or from another thread, a line is written at once."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._stream.write(message + "\n")
            self._stream.flush()
            return
        self._pending.append(message)
        if self._loop is not loop:
            self._loop = loop
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        self._loop = None
        if self._pending:
            lines, self._pending = self._pending, []
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()


def use_console(fmt: str, stream: Any = None) -> bool:
    if fmt == "auto":
        stream = stream or sys.stdout
        return bool(getattr(stream, "isatty", lambda: False)())
    return fmt == "console"


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog and the standard library's root logger to write to `stream`
    (stdout by default)."""
    stream = stream or sys.stdout
    console = use_console(fmt, stream)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if console
        else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    numeric = logging.getLevelNamesMapping()[level]
    writer = LineWriter(stream)
    global request_line
    if numeric > logging.INFO:
        request_line = _drop
    elif console:
        request_line = _via_structlog
    else:
        request_line = _json_line(writer)
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_factory(writer),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the proxy writes its own request line


def _iso_now(_cache: list = [0, ""]) -> str:  # noqa: B006 - the cache is the point
    """structlog's ISO UTC timestamp, with the date-time part formatted once a second."""
    now = time.time()
    second = int(now)
    if second != _cache[0]:
        _cache[0], _cache[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_cache[1]}.{int((now - second) * 1_000_000):06d}Z"


def _json_line(writer: LineWriter) -> Callable[[dict[str, Any]], None]:
    def emit(fields: dict[str, Any]) -> None:
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = _iso_now()
        writer.msg(orjson.dumps(fields, default=str).decode())

    return emit


def _via_structlog(fields: dict[str, Any]) -> None:
    structlog.get_logger("app.request").info("request", **fields)


def _drop(fields: dict[str, Any]) -> None:
    pass


request_line: Callable[[dict[str, Any]], None] = _via_structlog
"""Writes the canonical line of one request. In JSON mode it is built once, with orjson, straight
into the writer: the same record structlog would make (fields, then event, level, timestamp), at a
fraction of the cost of its processor chain, since it runs once per request on the hot path."""


def _factory(writer: LineWriter) -> Any:
    def factory(*_: Any) -> LineWriter:
        return writer

    return factory


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
