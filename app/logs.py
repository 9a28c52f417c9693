"""Logging: JSON lines on stdout (console rendering only on a TTY), for our code and for the
libraries that log through the standard library (uvicorn, huggingface_hub); with LOG_FILE, every
record also as a JSON line in a file rotated by size.

Lines are written by a `LineWriter`: those produced during one event-loop iteration leave in one
write (a busy proxy writes hundreds of request lines a second; a syscall each is a measurable cost).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
"""The id of the request being served (set by app/middleware.py): on every line logged meanwhile.
One variable of our own: structlog's bind and unbind cost a request several times more."""


def _request_id(_logger: Any, _method: str, event_dict: Any) -> Any:
    rid = REQUEST_ID.get()
    if rid is not None:
        event_dict.setdefault("request_id", rid)
    return event_dict


_SHARED = [
    _request_id,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
]


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


class JsonlFile:
    """JSON lines appended to a file, rotated by size (`LOG_FILE.1` is the newest of `backups` old
    files). Usable as a structlog processor (console mode: the record is also rendered for people)
    or written to directly with whole lines (JSON mode)."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        # Re-entrant: a garbage-collector finalizer that logs (asyncio's "Task was destroyed but it
        # is pending!") can run on this thread in the middle of a write; a plain lock deadlocks it.
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - open for the life of the process
        self._size = self._file.tell()

    def __call__(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        self.write(orjson.dumps(event_dict, default=str) + b"\n")
        return event_dict

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._file = open(self.path, "ab")  # noqa: SIM115
        else:
            self._file = open(self.path, "wb")  # noqa: SIM115 - no backups: start the file again
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Batch(threading.local):
    """One thread's lines waiting for the end of its event loop's iteration."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None


class LineWriter:
    """structlog's logger (and the standard library's, through `_LineHandler`): whole lines, batched
    per event-loop iteration, to the stream and, if given, to a JSONL file. Outside a running loop
    a line is written at once. Each thread batches on its own (tests run several servers in
    threads of one process)."""

    def __init__(self, stream: Any, tee: JsonlFile | None = None) -> None:
        self._stream = stream
        self._tee = tee
        self._batch = _Batch()
        # Re-entrant, as in JsonlFile: a finalizer that logs can run during a write on this thread.
        self._lock = threading.RLock()
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        batch = self._batch
        if loop is None:
            if batch.pending:  # lines a loop of this thread closed before flushing keep their place
                self.flush()
            self._write(message + "\n")
            return
        batch.pending.append(message)
        if batch.loop is not loop:
            batch.loop = loop
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        """Write this thread's batched lines now."""
        batch = self._batch
        batch.loop = None
        if batch.pending:
            lines, batch.pending = batch.pending, []
            self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        with self._lock:
            self._stream.write(text)
            self._stream.flush()
        if self._tee is not None:
            self._tee.write(text.encode())


class _LineHandler(logging.Handler):
    """The standard library's records, formatted by structlog, through the same writer."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.msg(self.format(record))
        except Exception:
            self.handleError(record)


def use_console(fmt: str, stream: Any = None) -> bool:
    if fmt == "auto":
        stream = stream or sys.stdout
        return bool(getattr(stream, "isatty", lambda: False)())
    return fmt == "console"


def configure_logging(
    level: str = "INFO",
    fmt: str = "auto",
    stream: Any = None,
    log_file: str | Path | None = None,
    log_file_max_bytes: int = 100 * 2**20,
    log_file_backups: int = 5,
) -> None:
    """Configure structlog and the standard library's root logger to write to `stream` (stdout by
    default) and, with `log_file`, to that file as JSON lines."""
    stream = stream or sys.stdout
    console = use_console(fmt, stream)
    jsonl = JsonlFile(log_file, log_file_max_bytes, log_file_backups) if log_file else None
    # JSON mode: the lines themselves go to the file too. Console mode: the records, as JSON.
    writer = LineWriter(stream, tee=None if console else jsonl)
    tee: list[Any] = [jsonl] if (jsonl is not None and console) else []
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if console
        else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    numeric = logging.getLevelNamesMapping()[level]
    global request_line, relay_lines
    relay_lines = _relay_console(writer, renderer, jsonl) if console else _relay_json(writer)
    if numeric > logging.INFO:
        request_line = _drop
    elif console:
        request_line = _via_structlog
    else:
        request_line = _json_line(writer)
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, *tee, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_factory(writer),
        cache_logger_on_first_use=True,
    )
    handler = _LineHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                *tee,
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


def configure_from(settings: Any) -> None:
    """configure_logging() as the settings say (launcher and RunPod worker alike)."""
    configure_logging(
        settings.LOG_LEVEL,
        settings.LOG_FORMAT,
        log_file=settings.LOG_FILE,
        log_file_max_bytes=int(settings.LOG_FILE_MAX_MB * 2**20),
        log_file_backups=settings.LOG_FILE_BACKUPS,
    )


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


def _relay_json(writer: LineWriter) -> Callable[[bytes], None]:
    def relay(block: bytes) -> None:
        writer.msg(block.decode("utf-8", "replace").rstrip("\n"))

    return relay


def _relay_console(writer: LineWriter, renderer: Any, jsonl: JsonlFile | None) -> Callable[[bytes], None]:
    def relay(block: bytes) -> None:
        for line in block.splitlines():
            if jsonl is not None:
                jsonl.write(line + b"\n")
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                writer.msg(line.decode("utf-8", "replace"))
                continue
            writer.msg(renderer(None, record.get("level", "info"), record))

    return relay


def _relay_unconfigured(block: bytes) -> None:
    sys.stdout.write(block.decode("utf-8", "replace"))
    sys.stdout.flush()


relay_lines: Callable[[bytes], None] = _relay_unconfigured
"""Writes whole JSON lines another process (a proxy worker, app/workers.py) logged, with this
process's own lines: as they are in JSON mode (and to LOG_FILE), rendered for people in console
mode (LOG_FILE gets the JSON)."""


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
