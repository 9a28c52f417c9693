"""Logging: LOG_FILE rotation, and a log call made while a line is being written."""

import io
import json
import logging
import threading

import structlog

from app.logs import configure_logging


def test_log_file_gets_every_record_as_json_and_rotates(tmp_path):
    path = tmp_path / "logs" / "app.jsonl"
    stdout = io.StringIO()
    try:
        configure_logging(
            "INFO", "console", stream=stdout, log_file=path, log_file_max_bytes=2000, log_file_backups=2
        )
        log = structlog.get_logger("app.request")
        for i in range(40):
            log.info("request", request_id=f"r{i}", status=200, duration_ms=1.5)
        logging.getLogger("uvicorn.error").warning("from the standard library")
    finally:
        from inproc import LOGS

        configure_logging("DEBUG", "json", stream=LOGS)  # what tests/inproc.py set up
    files = sorted(tmp_path.joinpath("logs").iterdir())
    assert [f.name for f in files] == ["app.jsonl", "app.jsonl.1", "app.jsonl.2"]  # two backups, no more
    assert all(f.stat().st_size <= 2000 for f in files)
    records = [json.loads(line) for f in reversed(files) for line in f.read_text().splitlines()]
    ids = [r["request_id"] for r in records if r.get("event") == "request"]
    assert ids == [f"r{i}" for i in range(40 - len(ids), 40)]  # the newest, in order, none twice
    assert records[-1]["event"] == "from the standard library" and records[-1]["level"] == "warning"
    assert all("timestamp" in r for r in records)
    assert "r39" in stdout.getvalue() and not stdout.getvalue().startswith("{")  # the console still is one


class _StreamThatLogsOnce(io.StringIO):
    """Logs once from inside its first write, as a garbage-collector finalizer can at any allocation
    (asyncio's "Task was destroyed but it is pending!"). A fresh-clone CI run hung on exactly this:
    the writer's plain lock was taken again on the same thread, with logging's handler lock held,
    so every thread that logged afterwards blocked."""

    nested = False

    def write(self, s: str) -> int:
        if not self.nested:
            self.nested = True
            logging.getLogger("asyncio").error("Task was destroyed but it is pending!")
        return super().write(s)


def test_a_record_logged_during_a_write_does_not_deadlock(tmp_path):
    stream = _StreamThatLogsOnce()
    path = tmp_path / "app.jsonl"
    try:
        configure_logging("INFO", "json", stream=stream, log_file=path)
        t = threading.Thread(target=lambda: logging.getLogger("x").info("outer"), daemon=True)
        t.start()
        t.join(5)
        deadlocked = t.is_alive()
    finally:
        from inproc import LOGS

        configure_logging("DEBUG", "json", stream=LOGS)
    assert not deadlocked
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert sorted(events) == ["Task was destroyed but it is pending!", "outer"]
    assert sorted(json.loads(line)["event"] for line in path.read_text().splitlines()) == sorted(events)
