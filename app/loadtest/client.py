"""One OpenAI-compatible server as the load tester sees it: models, token counts, metrics, and one
timed chat completion.

aiohttp (already a dependency of vLLM, so in every image) is the client: on one core it drives a few
thousand requests per second, far more than any model serves, so the tool is not what is measured.
Every failure becomes a result with an error message; nothing here raises for a bad answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from app.loadtest.sse import SSEParser
from app.proxy.sse import has_generated_output, usage_counts

# The engine's counters read around a run and around each round (summed over engines and labels).
WATCHED = {
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
}


@dataclass(slots=True)
class Result:
    """One request: what was sent where, and what came back. Times in seconds."""

    id: str
    request_id: str
    side: str = "a"
    user: int | None = None
    round: int | None = None
    start_s: float = 0.0  # from the start of the run
    latency_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_from_usage: bool = True  # False: counted from content events (the server sent no usage)
    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None
    output_chars: int = 0  # characters of the answer's content (0: its tokens decoded to no text)
    text: str = field(default="", repr=False)  # the answer (multi-round history); not saved

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__ if name != "text"}
        out["ok"] = self.ok
        return out


def _error_message(obj: Any) -> str | None:
    if isinstance(obj, dict) and "error" in obj:
        err = obj["error"]
        if isinstance(err, dict):
            return str(err.get("message") or err.get("type") or err)[:300]
        return str(err)[:300]
    return None


def _http_error(status: int, raw: bytes) -> str:
    try:
        message = _error_message(orjson.loads(raw))
    except orjson.JSONDecodeError:
        message = None
    if message is None:
        message = raw.decode("utf-8", "replace")[:300] or "(empty body)"
    return f"HTTP {status}: {' '.join(message.split())}"  # one line, whatever the body's layout


def _single_content(obj: Any) -> str | None:
    """The text of a one-choice chat chunk (nearly every event of a stream), or None: then
    `has_generated_output` decides (reasoning, tool calls, several choices, other APIs)."""
    choices = obj.get("choices") if type(obj) is dict else None
    if type(choices) is list and len(choices) == 1 and type(choice := choices[0]) is dict:
        delta = choice.get("delta")
        if type(delta) is dict and type(content := delta.get("content")) is str and content:
            return content
    return None


class Client:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None, timeout: float):
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    async def models(self) -> list[str]:
        """The served model ids; raises RuntimeError with a readable reason if there are none."""
        url = self.base_url + "/v1/models"
        try:
            async with asyncio.timeout(30):
                async with self.session.get(url, headers=self.headers) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: {_http_error(resp.status, raw)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RuntimeError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            ids = [m["id"] for m in orjson.loads(raw)["data"]]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{url}: not an OpenAI model list") from exc
        if not ids:
            raise RuntimeError(f"{url}: the server lists no model")
        return ids

    async def count_tokens(self, model: str, text: str) -> int | None:
        """Tokens in `text` by the server's own tokenizer (vLLM's /tokenize), or None where the
        server has no such route."""
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        try:
            async with asyncio.timeout(30):
                async with self.session.post(
                    self.base_url + "/tokenize", json=body, headers=self.headers
                ) as r:
                    if r.status != 200:
                        return None
                    count = orjson.loads(await r.read()).get("count")
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError):
            return None
        return count if isinstance(count, int) else None

    async def scrape(self, url: str) -> dict[str, float] | None:
        """The WATCHED counters from a Prometheus exposition, or None if it cannot be read or has
        no prefix-cache counters (not a vLLM engine, or metrics behind another key)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with asyncio.timeout(15):
                async with self.session.get(url, headers=self.headers) as resp:
                    if resp.status != 200:
                        return None
                    text = (await resp.read()).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError):
            return None
        wanted = {sample: key for key, sample in WATCHED.items()}
        totals: dict[str, float] = {}
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    key = wanted.get(sample.name)
                    if key is not None:
                        totals[key] = totals.get(key, 0.0) + sample.value
        except ValueError:
            return None
        return totals if "prefix_cache_queries" in totals else None

    async def chat(self, body: dict[str, Any], result: Result) -> Result:
        """Send one chat completion and fill `result` with its timings, tokens and any error.

        TTFT is taken when the read holding the first event that reports a generated token
        arrives (text, reasoning, a tool call, or a token whose text is still empty: the proxy's
        rule, app/proxy/sse.py); latency when the body ends. Tokens come from the engine's `usage`
        (the stream asks for it with `stream_options.include_usage`).
        """
        stream = bool(body.get("stream"))
        headers = {**self.headers, "X-Request-ID": result.request_id}
        payload = orjson.dumps(body)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.post(
                    self.base_url + "/v1/chat/completions",
                    data=payload,
                    headers={**headers, "Content-Type": "application/json"},
                ) as resp:
                    result.status = resp.status
                    if resp.status != 200:
                        result.error = _http_error(resp.status, await resp.read())
                    elif stream:
                        await self._read_stream(resp, start, result)
                    else:
                        self._read_json(await resp.read(), result)
        except TimeoutError:
            result.error = f"timeout after {self.timeout:g} s"
        except aiohttp.ClientConnectorError as exc:
            result.error = f"connect: {exc}"
        except aiohttp.ClientError as exc:
            result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        result.latency_s = time.perf_counter() - start
        if result.ok and result.ttft_s is not None and (result.completion_tokens or 0) >= 2:
            result.tpot_s = (result.latency_s - result.ttft_s) / (result.completion_tokens - 1)
        return result

    async def _read_stream(self, resp: aiohttp.ClientResponse, start: float, result: Result) -> None:
        # Per event: one JSON parse and a few dict lookups; the usage and error checks run only on
        # events that name them (a substring test costs far less than the lookups).
        parser = SSEParser()
        done = False
        content_events = 0
        parts: list[str] = []
        async for chunk in resp.content.iter_any():
            arrived = time.perf_counter()
            for event in parser.feed(chunk):
                data = event.data
                if data == b"[DONE]":
                    done = True
                    continue
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    result.error = f"not JSON in the stream: {data[:100]!r}"
                    return
                if b'"error"' in data and (message := _error_message(obj)) is not None:
                    result.error = f"error event in the stream: {message}"
                    return
                content = _single_content(obj)
                if content or has_generated_output(obj):
                    content_events += 1
                    if result.ttft_s is None:
                        result.ttft_s = arrived - start
                    if content:
                        parts.append(content)
                if b'"usage"' in data:
                    prompt, completion = usage_counts(obj)
                    if completion is not None:
                        result.prompt_tokens, result.completion_tokens = prompt, completion
        if not done:
            result.error = "the stream ended before data: [DONE]"
            return
        result.text = "".join(parts)
        result.output_chars = len(result.text)
        if result.completion_tokens is None:
            result.tokens_from_usage = False
            result.completion_tokens = content_events

    def _read_json(self, raw: bytes, result: Result) -> None:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            result.error = "the answer is not JSON"
            return
        if (message := _error_message(obj)) is not None:
            result.error = message
            return
        result.prompt_tokens, result.completion_tokens = usage_counts(obj)
        if result.completion_tokens is None:
            result.tokens_from_usage = False
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            content = (choices[0].get("message") or {}).get("content")
            result.text = content if isinstance(content, str) else ""
            result.output_chars = len(result.text)
