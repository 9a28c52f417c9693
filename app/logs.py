"""Logging: JSON lines on stdout (console rendering only on a TTY), for our code and for the
libraries that log through the standard library (uvicorn, aiohttp, huggingface_hub); with LOG_FILE,
every record also as a JSON line in a file rotated by size."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
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


class JsonlFile:
    """A structlog processor that appends each record as one JSON line to a file, rotated by size
    (`LOG_FILE.1` is the newest of `backups` old files), and passes the record on unchanged."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - open for the life of the process
        self._size = self._file.tell()

    def __call__(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        self.write(orjson.dumps(event_dict, default=str) + b"\n")
        return event_dict

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._file.flush()
            self._size += len(line)

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
    """Configure structlog and the standard library's root logger to write to `stream`
    (stdout by default) and, with `log_file`, to that file as JSON lines."""
    stream = stream or sys.stdout
    tee: list[Any] = [JsonlFile(log_file, log_file_max_bytes, log_file_backups)] if log_file else []
    console = use_console(fmt, stream)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if console
        else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    numeric = logging.getLevelNamesMapping()[level]
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.format_exc_info,
            *tee,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
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


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
