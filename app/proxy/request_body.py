"""What the proxy learns from a JSON request body, and the one change it may make to it.

The proxy reads `model`, `stream` and the content parts (for the log line and metrics). For a stream
on a route that reports usage, it asks the engine for the usage chunk
(`stream_options.include_usage`) so the log line has token counts; when the client did not ask for
it, `StreamObserver` drops that chunk again so the client sees what it would have seen directly.
"""

from __future__ import annotations

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
    counts: dict[str, int] = {}

    def add(kind: str, n: int = 1) -> None:
        counts[kind] = counts.get(kind, 0) + n

    def parts(content: Any) -> None:
        if isinstance(content, str):
            add("text")
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, str):
                    add("text")
                elif isinstance(part, dict):
                    kind = _PART_MODALITY.get(part.get("type", ""))
                    if kind:
                        add(kind)
                    elif "content" in part:  # a Responses API message item
                        parts(part["content"])

    messages = obj.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                parts(message.get("content"))
    elif "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            add("text", len(prompt))  # a batch of prompts
        elif prompt is not None:
            add("text")
    elif "input" in obj:
        parts(obj["input"])
    return counts


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
    """Parse a JSON body once; request the usage chunk where a stream would otherwise lack it.

    A body that is not a JSON object is passed on untouched: the engine answers it with its own
    400, so clients get the engine's wording whether or not the proxy is in between.
    """
    info = RequestInfo(body=body)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return info
    if not isinstance(obj, dict):
        return info
    model = obj.get("model")
    if isinstance(model, str):
        info.model = model
    info.stream = obj.get("stream") is True
    info.modalities = count_modalities(obj)
    if b"://" in body:  # only then can there be a URL to fetch (data: URLs need no check)
        info.media_urls = [u for u in media_urls(obj) if not u.startswith("data:")]
    if log_prompts:
        info.prompt = redact({k: obj[k] for k in ("messages", "prompt", "input") if k in obj})
    if info.stream and path in USAGE_STREAM_ROUTES:
        options = obj.get("stream_options")
        if options is None or (isinstance(options, dict) and not options.get("include_usage")):
            # continuous_usage_stats only acts with include_usage: keep it off, or every chunk
            # would change.
            obj["stream_options"] = {
                **(options or {}),
                "include_usage": True,
                "continuous_usage_stats": False,
            }
            info.strip_usage = True
            info.body = orjson.dumps(obj)
    return info
