"""What the proxy learns from a JSON request body, and the one change it may make to it.

The proxy reads `model`, `stream`, the content parts (for the log line and metrics) and every URL
the engine could fetch (checked by app.security). It reads the body exactly as the engine will:
vLLM's routes parse a body as JSON when its first Content-Type header is `application/json` or
`application/*+json` (FastAPI, through `email.message`, so any case), with Python's `json.loads` on
the bytes, which also takes a UTF-8 BOM, UTF-16 and UTF-32, `NaN` and `Infinity`, lone surrogates
and integers of any size (duplicate keys: the last wins). orjson reads the usual body about five
times faster; whatever it accepts, `json.loads` reads to the same strings and structure (numbers
aside: orjson makes floats of integers past 64 bits), and whatever it refuses goes to `json.loads`
itself. A body neither can parse is passed on for the engine's own 400 (the same function fails on
the same bytes there), unless `json.loads` failed only on its nesting depth, which depends on the
caller's stack: that one is refused here.

For a stream on a route that reports usage, the proxy asks the engine for the usage chunk
(`stream_options.include_usage`) so the log line has token counts; when the client did not ask for
it, `StreamObserver` drops that chunk again so the client sees what it would have seen directly.
The key is appended to the client's bytes (the engine's `json.loads` keeps the last of duplicate
keys), so nothing else in the body changes.
"""

from __future__ import annotations

import email.message
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.security import media_urls

# Routes whose streams end with an OpenAI usage chunk when `stream_options.include_usage` is set.
USAGE_STREAM_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})

_PART_MODALITY = {
    "text": "text",
    "input_text": "text",
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "image": "image",
    "video_url": "video",
    "input_video": "video",
    "video": "video",
    "input_audio": "audio",
    "audio_url": "audio",
    "audio": "audio",
}


class BodyRefused(Exception):
    """A JSON body the proxy cannot read as the engine would; the message is for the client."""


@functools.lru_cache(maxsize=64)
def is_json_type(value: bytes) -> bool:
    """Whether vLLM's routes (FastAPI) parse a body with this Content-Type as JSON."""
    message = email.message.Message()
    message["content-type"] = value.decode("latin-1")
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


_INVALID = object()


def parse_json(body: bytes) -> tuple[Any, bool]:
    """(the value the engine's `json.loads(body)` reads, whether orjson read it); the value is
    `_INVALID` when the engine cannot parse the body either."""
    try:
        return orjson.loads(body), True
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body), False
    except RecursionError:
        raise BodyRefused("JSON body nested too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError: the engine's json.loads fails alike
        return _INVALID, False


_USAGE_ON = {"include_usage": True, "continuous_usage_stats": False}
_USAGE_OPTIONS = b'"stream_options":{"include_usage":true,"continuous_usage_stats":false}'
_JSON_SPACE = b" \t\n\r"


def _with_stream_options(body: bytes, obj: dict[str, Any], fast: bool) -> bytes:
    """The body with `stream_options` asking for usage, everything else as the client sent it."""
    options = obj.get("stream_options")
    end = len(body.rstrip(_JSON_SPACE)) - 1
    if not fast or body[end : end + 1] != b"}":  # not UTF-8 JSON: rewritten whole, losslessly
        exact = json.loads(body)
        exact["stream_options"] = {**(exact.get("stream_options") or {}), **_USAGE_ON}
        return json.dumps(exact).encode()
    if options is None:
        added = _USAGE_OPTIONS
    else:  # the client's other options, as `json.loads` reads them (orjson rounds huge integers)
        exact = json.loads(body).get("stream_options") or {}
        added = b'"stream_options":' + json.dumps({**exact, **_USAGE_ON}).encode()
    return body[:end] + b"," + added + body[end:]


@dataclass(slots=True)
class RequestInfo:
    model: str | None = None
    stream: bool = False
    modalities: dict[str, int] = field(default_factory=dict)
    strip_usage: bool = False
    """True when the proxy added `include_usage` and must drop the usage chunk again."""
    body: bytes = b""
    """The body to send upstream: the client's bytes, unless usage had to be requested."""
    media_urls: list[str] = field(default_factory=list)
    """http(s) URLs the engine would fetch (checked by app.security before it may)."""
    prompt: Any = None
    """With LOG_PROMPTS: the prompt for the log, inline media replaced by a size note."""


def count_modalities(obj: dict[str, Any]) -> dict[str, int]:
    """Counts of text, image, video and audio parts in chat messages, prompts or Responses input."""
    # Plain functions, not closures: a recursive closure is a reference cycle, so every request
    # would leave garbage for the cyclic collector (heap sawtooth, fragmentation; bench/RESULTS.md).
    counts: dict[str, int] = {}
    messages = obj.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                _count_parts(counts, message.get("content"))
    elif "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            counts["text"] = len(prompt)  # a batch of prompts
        elif prompt is not None:
            counts["text"] = 1
    elif "input" in obj:
        _count_parts(counts, obj["input"])
    return counts


def _count_parts(counts: dict[str, int], content: Any) -> None:
    if isinstance(content, str):
        counts["text"] = counts.get("text", 0) + 1
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                counts["text"] = counts.get("text", 0) + 1
            elif isinstance(part, dict):
                kind = _PART_MODALITY.get(part.get("type", ""))
                if kind:
                    counts[kind] = counts.get(kind, 0) + 1
                elif "content" in part:  # a Responses API message item
                    _count_parts(counts, part["content"])


_DATA_URL = re.compile(r"^data:([^;,]*)[^,]*,(.*)$", re.S)


def redact(value: Any, limit: int = 2000) -> Any:
    """A copy fit for a log: inline media (data URLs, base64 audio) as a size note, long text cut."""
    if isinstance(value, str):
        match = _DATA_URL.match(value) if value.startswith("data:") else None
        if match:
            return f"<{match.group(1) or 'data'}, {len(match.group(2))} bytes inline>"
        return value if len(value) <= limit else value[:limit] + f"...<{len(value) - limit} more chars>"
    if isinstance(value, list):
        return [redact(v, limit) for v in value]
    if isinstance(value, dict):
        return {
            k: (f"<{len(v)} bytes inline>" if k == "data" and isinstance(v, str) else redact(v, limit))
            for k, v in value.items()
        }
    return value


def inspect_json(body: bytes, path: str, log_prompts: bool = False) -> RequestInfo:
    """Parse a JSON body once, as the engine will; request the usage chunk where a stream would
    otherwise lack it. Raises BodyRefused for a body the proxy cannot read as the engine would.

    A body that is not JSON is passed on untouched: the engine answers it with its own 400, so
    clients get the engine's wording whether or not the proxy is in between.
    """
    info = RequestInfo(body=body)
    obj, fast = parse_json(body)
    if obj is _INVALID:
        return info
    try:
        _read(info, obj, fast, body, path, log_prompts)
    except RecursionError:  # json.loads takes a little deeper nesting than the rest can walk
        raise BodyRefused("JSON body nested too deeply") from None
    return info


def _read(info: RequestInfo, obj: Any, fast: bool, body: bytes, path: str, log_prompts: bool) -> None:
    # Every URL the engine could fetch is under a key ending in `url` (or in the top-level media
    # lists, always read): in UTF-8 JSON without a backslash escape, that key's bytes are there.
    deep = not fast or b'url"' in body or b"\\" in body
    info.media_urls = [u for u in media_urls(obj, deep=deep) if u[:5].lower() != "data:"]
    if not isinstance(obj, dict):
        return
    model = obj.get("model")
    if isinstance(model, str):
        info.model = model
    info.stream = obj.get("stream") is True
    info.modalities = count_modalities(obj)
    if log_prompts:
        info.prompt = redact({k: obj[k] for k in ("messages", "prompt", "input") if k in obj})
    if info.stream and path in USAGE_STREAM_ROUTES:
        options = obj.get("stream_options")
        if options is None or (isinstance(options, dict) and not options.get("include_usage")):
            # continuous_usage_stats only acts with include_usage: keep it off, or every chunk
            # would change.
            info.body = _with_stream_options(body, obj, fast)
            info.strip_usage = True
