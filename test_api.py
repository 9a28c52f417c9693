#!/usr/bin/env python3
"""End-to-end checks for a deployment of the vLLM Inference API (or any OpenAI-compatible server).

Usage:
    python test_api.py BASE_URL [--api-key KEY] [--model NAME] [--timeout S]
                                [--skip-images] [--image-url URL] [--video-url URL]

    python test_api.py http://localhost:8000
    python test_api.py https://my-endpoint.example.com --api-key "$API_KEY" --timeout 120

BASE_URL is the server root (a trailing `/v1` is accepted too). The API key comes from `--api-key`
or the `API_KEY` environment variable and is sent as `Authorization: Bearer <key>` on every request.

Each check prints one line, `PASS`, `FAIL` or `SKIP`, then a summary. The exit code is 0 when no
check failed (skips are fine) and 1 otherwise. Checks run in order, each under its own time limit;
a failing check never stops the ones after it.

Needs only the `openai` (>= 1.40) and `httpx` packages.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import OpenAI

DEFAULT_IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/4/47/PNG_transparency_demonstration_1.png"

# An image sent to a text-only model: vLLM answers 400 with one of these.
_NO_MULTIMODAL = re.compile(
    r"not (a )?multimodal|does not support (multimodal|image|video|vision)|"
    r"at most 0 (image|video)|not support(ed)? .*(image|video|modalit)|no (image|video|vision) support",
    re.IGNORECASE,
)
# The server could not download a media URL (no internet, DNS, firewall, a slow host).
_FETCH_FAILED = re.compile(
    r"cannot connect to host|failed to fetch|fetch(ing)? (media|image|video|url)|timed? ?out|"
    r"name or service not known|name resolution|could not resolve|connection refused|"
    r"network is unreachable|download",
    re.IGNORECASE,
)


# --- results and the registry -----------------------------------------------------------------


class Skip(Exception):
    """Raised by a check that does not apply to this deployment."""


class Fail(Exception):
    """Raised by a check whose expectation was not met."""


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float


@dataclass
class Context:
    base_url: str
    api_key: str | None
    timeout: float
    client: OpenAI
    http: httpx.Client
    model: str | None = None
    image_url: str = DEFAULT_IMAGE_URL
    video_url: str | None = None
    skip_images: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def need_model(self) -> str:
        if not self.model:
            raise Skip("no model to use (the models check failed and --model was not given)")
        return self.model


@dataclass
class Check:
    name: str
    fn: Callable[[Context], str]
    doc: str


CHECKS: list[Check] = []


def check(name: str) -> Callable[[Callable[[Context], str]], Callable[[Context], str]]:
    """Register a check. It returns a one-line detail on success, raises Skip or Fail otherwise."""

    def register(fn: Callable[[Context], str]) -> Callable[[Context], str]:
        CHECKS.append(Check(name, fn, (fn.__doc__ or "").strip()))
        return fn

    return register


# --- helpers ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def get_json(ctx: Context, path: str) -> tuple[httpx.Response, Any, float]:
    start = time.perf_counter()
    resp = ctx.http.get(path)
    elapsed = time.perf_counter() - start
    try:
        body = resp.json()
    except ValueError:
        body = None
    return resp, body, elapsed


def tiny_png(width: int = 32, height: int = 32, rgb: tuple[int, int, int] = (220, 40, 40)) -> bytes:
    """A solid-colour RGB PNG, built with zlib and struct only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def error_message(exc: openai.APIStatusError) -> str:
    try:
        body = exc.response.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return exc.response.text[:300] or str(exc)


def error_code(exc: openai.APIStatusError) -> str | None:
    try:
        err = exc.response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("code") if isinstance(err, dict) else None


def short(text: str | None, limit: int = 40) -> str:
    text = " ".join((text or "").split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def media_chat(ctx: Context, part: dict[str, Any], kind: str) -> str:
    """Send one media part with a question; SKIP when the model is text-only or cannot fetch it."""
    model = ctx.need_model()
    start = time.perf_counter()
    try:
        resp = ctx.client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": f"Describe this {kind} in a few words."}, part],
                }
            ],
            max_tokens=16,
        )
    except openai.APIStatusError as exc:
        message = error_message(exc)
        if exc.status_code == 400 and _NO_MULTIMODAL.search(message):
            raise Skip(f"model does not accept {kind}s: {message}") from exc
        if exc.status_code == 400 and error_code(exc) == "media_url_refused":
            raise Skip(f"the server's URL policy refused it: {message}") from exc
        if (
            exc.status_code in (400, 422, 500, 504)
            and _FETCH_FAILED.search(message)
            and "engine" not in message
        ):
            raise Skip(f"the server could not fetch the URL ({exc.status_code}): {message}") from exc
        raise Fail(f"{exc.status_code}: {message}") from exc
    elapsed = time.perf_counter() - start
    if not resp.choices:
        raise Fail("no choices in the response")
    usage = resp.usage
    prompt = usage.prompt_tokens if usage else "?"
    completion = usage.completion_tokens if usage else "?"
    return f"{prompt} prompt + {completion} completion tokens in {ms(elapsed)}: {short(resp.choices[0].message.content)}"


# --- the checks, in the order they run --------------------------------------------------------


@check("health")
def check_health(ctx: Context) -> str:
    """GET /health answers 200 with status "ready"."""
    resp, body, elapsed = get_json(ctx, "/health")
    if resp.status_code != 200:
        raise Fail(f"{resp.status_code} in {ms(elapsed)}: {resp.text[:200]}")
    if not isinstance(body, dict) or body.get("status") != "ready":
        raise Fail(f"200 but the body is not {{'status': 'ready', ...}}: {resp.text[:200]}")
    return f"200 in {ms(elapsed)}"


@check("ping")
def check_ping(ctx: Context) -> str:
    """GET /ping answers 200."""
    resp, _, elapsed = get_json(ctx, "/ping")
    if resp.status_code != 200:
        raise Fail(f"{resp.status_code} in {ms(elapsed)} (204 means still initializing)")
    return f"200 in {ms(elapsed)}"


@check("info")
def check_info(ctx: Context) -> str:
    """GET /info describes the model and the engine."""
    resp, body, elapsed = get_json(ctx, "/info")
    if resp.status_code != 200:
        raise Fail(f"{resp.status_code} in {ms(elapsed)}: {resp.text[:200]}")
    if not isinstance(body, dict):
        raise Fail(f"not a JSON object: {resp.text[:200]}")
    missing = [key for key in ("model", "served_model_name", "engine") if key not in body]
    engine = body.get("engine")
    if not isinstance(engine, dict):
        missing.append("engine{}")
    else:
        missing += [f"engine.{key}" for key in ("name", "version") if key not in engine]
    if missing:
        raise Fail(f"missing keys: {', '.join(missing)}")
    return f"{body['served_model_name']} on {engine['name']} {engine['version']} ({ms(elapsed)})"


@check("models")
def check_models(ctx: Context) -> str:
    """/v1/models lists at least one model; picks the one the other checks use."""
    start = time.perf_counter()
    ids = [m.id for m in ctx.client.models.list()]
    elapsed = time.perf_counter() - start
    if not ids:
        raise Fail("/v1/models returned no models")
    if ctx.model and ctx.model not in ids:
        raise Fail(f"--model {ctx.model!r} is not served; the server lists: {', '.join(ids)}")
    ctx.model = ctx.model or ids[0]
    return f"{len(ids)} model(s) in {ms(elapsed)}; using {ctx.model!r}"


@check("chat")
def check_chat(ctx: Context) -> str:
    """A non-streaming chat completion with usage."""
    model = ctx.need_model()
    start = time.perf_counter()
    resp = ctx.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in five words."}],
        max_tokens=16,
    )
    elapsed = time.perf_counter() - start
    if not resp.choices or resp.choices[0].message is None:
        raise Fail("no choice in the response")
    if not resp.usage or not resp.usage.completion_tokens:
        raise Fail(f"no usage or zero completion tokens: {resp.usage}")
    u = resp.usage
    return (
        f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens in {ms(elapsed)}: "
        f"{short(resp.choices[0].message.content)}"
    )


@check("completion")
def check_completion(ctx: Context) -> str:
    """A non-streaming /v1/completions request with usage."""
    model = ctx.need_model()
    start = time.perf_counter()
    resp = ctx.client.completions.create(model=model, prompt="The capital of France is", max_tokens=16)
    elapsed = time.perf_counter() - start
    if not resp.choices:
        raise Fail("no choice in the response")
    if not resp.usage or not resp.usage.completion_tokens:
        raise Fail(f"no usage or zero completion tokens: {resp.usage}")
    u = resp.usage
    return (
        f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens in {ms(elapsed)}: "
        f"{short(resp.choices[0].text)}"
    )


def delta_text(chunk: Any) -> str:
    """Content (or reasoning, for reasoning models) carried by a chat stream chunk."""
    if not chunk.choices:
        return ""
    delta = chunk.choices[0].delta
    if delta is None:
        return ""
    extra = getattr(delta, "model_extra", None) or {}
    return delta.content or extra.get("reasoning") or extra.get("reasoning_content") or ""


@check("streaming")
def check_streaming(ctx: Context) -> str:
    """A chat stream arrives as several chunks spread over time, not in one burst."""
    model = ctx.need_model()
    start = time.perf_counter()
    stream = ctx.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from one to twenty in words."}],
        max_tokens=64,
        stream=True,
    )
    arrivals: list[float] = []
    first_content: float | None = None
    content_chunks = 0
    finish = None
    with stream:
        for chunk in stream:
            now = time.perf_counter() - start
            arrivals.append(now)
            if delta_text(chunk):
                content_chunks += 1
                if first_content is None:
                    first_content = now
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    total = time.perf_counter() - start
    if len(arrivals) < 2:
        raise Fail(f"only {len(arrivals)} chunk(s)")
    if first_content is None:
        raise Fail(f"{len(arrivals)} chunks but none carried content")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    longest_gap = max(gaps)
    detail = (
        f"TTFT {ms(first_content)}, {len(arrivals)} chunks ({content_chunks} with content) in {ms(total)}, "
        f"longest gap {longest_gap * 1000:.1f} ms, finish={finish}"
    )
    if not first_content < arrivals[-1]:
        raise Fail(f"the first content chunk was also the last one: {detail}")
    # Buffered somewhere on the way, every chunk lands in one read: gaps of microseconds only. An
    # engine that generates faster than its API server sends (tiny models) bursts the same way, so
    # this is reported, not failed.
    if content_chunks >= 4 and longest_gap < 0.001:
        detail += " (note: all chunks arrived in one burst: a buffering proxy, or a very fast model)"
    if finish == "stop" and content_chunks < 4:
        detail += " (the model stopped early; too few chunks to judge the spacing)"
    return detail


@check("stream_usage")
def check_stream_usage(ctx: Context) -> str:
    """stream_options.include_usage puts usage in the last chunk."""
    model = ctx.need_model()
    stream = ctx.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = []
    with stream:
        chunks = list(stream)
    if not chunks:
        raise Fail("empty stream")
    usage = chunks[-1].usage
    if usage is None:
        with_usage = sum(1 for c in chunks if c.usage is not None)
        raise Fail(f"the last of {len(chunks)} chunks has no usage ({with_usage} chunk(s) had one)")
    if not usage.completion_tokens:
        raise Fail(f"usage in the last chunk has no completion tokens: {usage}")
    return f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens in the last of {len(chunks)} chunks"


@check("request_id")
def check_request_id(ctx: Context) -> str:
    """An X-Request-ID sent by the client comes back in the response."""
    model = ctx.need_model()
    rid = f"test-api-{uuid.uuid4().hex[:12]}"
    raw = ctx.client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=1,
        extra_headers={"X-Request-ID": rid},
    )
    raw.parse()
    echoed = raw.headers.get("x-request-id")
    if echoed != rid:
        raise Fail(f"sent {rid!r}, got back {echoed!r}")
    return f"{rid} echoed"


@check("image_base64")
def check_image_base64(ctx: Context) -> str:
    """An image as a base64 PNG data URL (SKIP on a text-only model)."""
    if ctx.skip_images:
        raise Skip("--skip-images")
    data_url = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    return media_chat(ctx, {"type": "image_url", "image_url": {"url": data_url}}, "image")


@check("image_url")
def check_image_url(ctx: Context) -> str:
    """An image by URL, fetched by the server (SKIP on a text-only model or when it cannot fetch)."""
    if ctx.skip_images:
        raise Skip("--skip-images")
    return media_chat(ctx, {"type": "image_url", "image_url": {"url": ctx.image_url}}, "image")


@check("video")
def check_video(ctx: Context) -> str:
    """A video by URL, only with --video-url (SKIP when the model takes no video)."""
    if not ctx.video_url:
        raise Skip("no --video-url given")
    return media_chat(ctx, {"type": "video_url", "video_url": {"url": ctx.video_url}}, "video")


@check("errors")
def check_errors(ctx: Context) -> str:
    """An unknown model gives 404/400 with an OpenAI-shaped error body."""
    name = f"no-such-model-{uuid.uuid4().hex[:8]}"
    try:
        ctx.client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
    except (openai.NotFoundError, openai.BadRequestError) as exc:
        try:
            body = exc.response.json()
        except ValueError:
            raise Fail(f"{exc.status_code} but the body is not JSON: {exc.response.text[:200]}") from exc
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            raise Fail(
                f"{exc.status_code} but the body is not {{'error': {{'message': ...}}}}: {body}"
            ) from exc
        return f"{exc.status_code}: {err['message']}"
    except openai.APIStatusError as exc:
        raise Fail(f"expected 404 or 400, got {exc.status_code}: {error_message(exc)}") from exc
    raise Fail(f"the server accepted the unknown model {name!r}")


# --- running ----------------------------------------------------------------------------------


def run_check(chk: Check, ctx: Context, deadline: float) -> Result:
    """Run one check in a daemon thread so that a hung request cannot stall the suite."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = ("PASS", chk.fn(ctx))
        except Skip as exc:
            outcome["result"] = ("SKIP", str(exc))
        except Fail as exc:
            outcome["result"] = ("FAIL", str(exc))
        except (openai.APITimeoutError, httpx.TimeoutException):
            outcome["result"] = ("FAIL", f"timed out (--timeout {ctx.timeout:g} s)")
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            outcome["result"] = ("FAIL", f"connection error: {cause.__class__.__name__}: {cause}")
        except httpx.HTTPError as exc:
            outcome["result"] = ("FAIL", f"connection error: {exc.__class__.__name__}: {exc}")
        except openai.APIStatusError as exc:
            outcome["result"] = ("FAIL", f"{exc.status_code}: {error_message(exc)}")
        except Exception as exc:  # a bug or an unexpected response shape: report it, keep going
            outcome["result"] = ("FAIL", f"{exc.__class__.__name__}: {exc}")

    start = time.perf_counter()
    worker = threading.Thread(target=target, name=f"check-{chk.name}", daemon=True)
    worker.start()
    worker.join(deadline)
    elapsed = time.perf_counter() - start
    if worker.is_alive():
        return Result(chk.name, "FAIL", f"no result after {deadline:g} s (check deadline)", elapsed)
    status, detail = outcome["result"]
    return Result(chk.name, status, detail, elapsed)


def colour(status: str) -> str:
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return status
    code = {"PASS": "32", "FAIL": "31", "SKIP": "33"}[status]
    return f"\033[{code}m{status}\033[0m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Check a deployment of the vLLM Inference API end to end.",
        epilog="Checks: " + ", ".join(c.name for c in CHECKS),
    )
    parser.add_argument("base_url", metavar="BASE_URL", help="server root, e.g. http://localhost:8000")
    parser.add_argument(
        "--api-key", default=os.environ.get("API_KEY"), help="bearer token (default: $API_KEY)"
    )
    parser.add_argument("--model", help="model to use (default: the first in /v1/models)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request and per check (default 60)"
    )
    parser.add_argument("--skip-images", action="store_true", help="skip the image checks")
    parser.add_argument(
        "--image-url", default=DEFAULT_IMAGE_URL, help="image the server fetches in image_url"
    )
    parser.add_argument("--video-url", help="video for the video check (skipped without it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 10.0))
    http = httpx.Client(base_url=root, headers=headers, timeout=timeout)
    client = OpenAI(base_url=f"{root}/v1", api_key=args.api_key or "EMPTY", timeout=timeout, max_retries=0)
    ctx = Context(
        base_url=root,
        api_key=args.api_key,
        timeout=args.timeout,
        client=client,
        http=http,
        model=args.model,
        image_url=args.image_url,
        video_url=args.video_url,
        skip_images=args.skip_images,
    )

    print(f"Testing {root}" + (" (with API key)" if args.api_key else ""))
    width = max(len(c.name) for c in CHECKS) + 2
    results: list[Result] = []
    suite_start = time.perf_counter()
    # A check may make a few requests and stream for a while: give it a little more than one request.
    deadline = args.timeout + 10.0
    for chk in CHECKS:
        result = run_check(chk, ctx, deadline)
        results.append(result)
        print(f"{colour(result.status)}  {result.name:<{width}}{result.detail}", flush=True)

    counts = {s: sum(1 for r in results if r.status == s) for s in ("PASS", "FAIL", "SKIP")}
    took = time.perf_counter() - suite_start
    print(
        f"\n{len(results)} checks: {counts['PASS']} passed, {counts['FAIL']} failed, "
        f"{counts['SKIP']} skipped in {took:.1f} s" + (f" (model: {ctx.model})" if ctx.model else "")
    )
    http.close()
    client.close()
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
