"""The batch input file: one JSON object per line, `{"custom_id", "method": "POST", "url", "body"}`.

A line that cannot be run goes to the batch's error file with the reason (OpenAI's error codes and
messages where OpenAI has one: `invalid_json_line`, `duplicate_custom_id`, `url_mismatch`, ...);
the other lines run. (OpenAI fails the whole batch instead: here one bad line in 50,000 costs one
line.) A repeated `custom_id` is such a line: the first line with it runs, every later one is an
error, so each input line has exactly one line in the output or the error file.

What the body may hold is the engine's to judge: a body the engine refuses comes back as its own
4xx answer in the error file, as a live request would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(slots=True)
class Line:
    """A line to run: where its JSON is in the input file."""

    line: int  # 1-based
    custom_id: str
    offset: int
    length: int


@dataclass(slots=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None

    def as_error(self) -> dict[str, Any]:
        """OpenAI's BatchError shape (code, message, param, line)."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass
class Parsed:
    lines: list[Line] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    model: str | None = None

    @property
    def total(self) -> int:
        return len(self.lines) + len(self.errors)


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def check_line(raw: bytes, number: int, endpoint: str) -> tuple[str, dict] | LineError:
    """(custom_id, body) of a runnable line, or why it cannot run."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return LineError(number, None, "invalid_json_line", "This line is not parseable as valid JSON.")
    custom_id = obj.get("custom_id")
    cid = custom_id if isinstance(custom_id, str) else None
    for name, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
        if name not in obj or obj[name] is None:
            return LineError(
                number, cid, "missing_required_parameter", f"Missing required parameter: '{name}'.", name
            )
        if not isinstance(obj[name], kind):
            expected = "an object" if kind is dict else "a string"
            return LineError(
                number,
                cid,
                "invalid_type",
                f"Invalid type for '{name}': expected {expected}, but got {_type_name(obj[name])}.",
                name,
            )
    if not custom_id:
        return LineError(number, cid, "invalid_value", "'custom_id' must not be empty.", "custom_id")
    if obj["method"] != "POST":
        return LineError(
            number,
            cid,
            "invalid_value",
            f"Invalid value for 'method': {obj['method']!r}. Supported values are: 'POST'.",
            "method",
        )
    if obj["url"] != endpoint:
        return LineError(
            number,
            cid,
            "url_mismatch",
            f"The URL provided for this request ({obj['url']!r}) does not match the batch endpoint "
            f"({endpoint!r}).",
            "url",
        )
    body = obj["body"]
    if body.get("stream"):
        return LineError(
            number, cid, "invalid_value", "Streaming is not supported in batch requests.", "body.stream"
        )
    return custom_id, body


def parse_input(path: Path, endpoint: str) -> Parsed:
    """Every line of the input file, checked. Blank lines are skipped (but counted in line numbers)."""
    out = Parsed()
    seen: set[str] = set()
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            text = raw.strip()
            if not text:
                continue
            checked = check_line(text, number, endpoint)
            if isinstance(checked, LineError):
                out.errors.append(checked)
                continue
            custom_id, body = checked
            if custom_id in seen:
                out.errors.append(
                    LineError(
                        number,
                        custom_id,
                        "duplicate_custom_id",
                        "The custom_id for this request is a duplicate of another request. The "
                        "custom_id parameter must be unique for each request in a batch.",
                        "custom_id",
                    )
                )
                continue
            seen.add(custom_id)
            if out.model is None and isinstance(body.get("model"), str):
                out.model = body["model"]
            out.lines.append(Line(number, custom_id, start, len(raw)))
    return out


def read_body(fd: int, line: Line) -> bytes:
    """The request body of a checked line (from the input file open as `fd`), as JSON bytes."""
    return orjson.dumps(orjson.loads(os.pread(fd, line.length, line.offset))["body"])
