"""The batch input file's lines: which run, and the OpenAI-shaped reason for each that cannot."""

from __future__ import annotations

import os

import orjson

from app.batch.validate import parse_input, read_body

EP = "/v1/chat/completions"


def line(custom_id="a", method="POST", url=EP, body=None, **extra) -> bytes:
    obj = {"custom_id": custom_id, "method": method, "url": url, "body": body or {"model": "m"}, **extra}
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


def parse(tmp_path, *lines: bytes):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, parse_input(path, EP)


def test_runnable_lines_keep_their_number_and_body(tmp_path):
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "max_tokens": 3}
    path, parsed = parse(tmp_path, line("x", body=body), b"", b"   ", line("y"))
    assert [(ln.line, ln.custom_id) for ln in parsed.lines] == [(1, "x"), (4, "y")]
    assert parsed.errors == [] and parsed.total == 2 and parsed.model == "m"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert orjson.loads(read_body(fd, parsed.lines[0])) == body
    finally:
        os.close(fd)


def test_each_bad_line_has_its_reason_and_the_rest_run(tmp_path):
    _, parsed = parse(
        tmp_path,
        line("ok1"),
        b"{not json",
        b"[1, 2]",
        line(custom_id=...),
        line(custom_id=7),
        line(custom_id=""),
        line("get", method="GET"),
        line("other", url="/v1/embeddings"),
        line("nobody", body=...),
        orjson.dumps({"custom_id": "list", "method": "POST", "url": EP, "body": [1]}),
        line("stream", body={"model": "m", "stream": True}),
        line("ok1"),
        line("ok2"),
    )
    assert [ln.custom_id for ln in parsed.lines] == ["ok1", "ok2"]
    got = [(e.line, e.custom_id, e.code, e.param) for e in parsed.errors]
    assert got == [
        (2, None, "invalid_json_line", None),
        (3, None, "invalid_json_line", None),
        (4, None, "missing_required_parameter", "custom_id"),
        (5, None, "invalid_type", "custom_id"),
        (6, "", "invalid_value", "custom_id"),
        (7, "get", "invalid_value", "method"),
        (8, "other", "url_mismatch", "url"),
        (9, "nobody", "missing_required_parameter", "body"),
        (10, "list", "invalid_type", "body"),
        (11, "stream", "invalid_value", "body.stream"),
        (12, "ok1", "duplicate_custom_id", "custom_id"),
    ]
    assert parsed.total == 13
    first = parsed.errors[0].as_error()
    assert first == {
        "code": "invalid_json_line",
        "message": "This line is not parseable as valid JSON.",
        "param": None,
        "line": 2,
    }


def test_an_empty_file_has_no_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n\n")
    assert parse_input(path, EP).total == 0
