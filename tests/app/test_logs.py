"""LOG_FILE: every record also as a JSON line in a file rotated by size."""

import io
import json
import logging

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
