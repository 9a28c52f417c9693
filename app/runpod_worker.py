"""RUNPOD_MODE=queue: the image as a RunPod queue-based Serverless worker.

    scripts/start.sh (RUNPOD_MODE=queue) -> python -m app.runpod_worker
        child:  python -m app.launcher, HOST=127.0.0.1: engine + proxy, exactly as in the other modes
        here:   runpod.serverless.start(handler): each job's OpenAI request goes to that proxy, so
                request logs, metrics, auth and limits apply to jobs as to HTTP clients

A job's input names the route and the request body, in either of two shapes:

    {"route": "/v1/chat/completions", "body": {...}}                  (this project's; "method" optional)
    {"openai_route": "/v1/chat/completions", "openai_input": {...}}   (RunPod's OpenAI-compatible
                                                                       endpoint, as worker-vllm takes it)

or as RunPod's vLLM worker (worker-vllm) takes a plain job, which RunPod's console offers as sample:

    {"prompt": "...", "sampling_params": {...}, "stream": false, "apply_chat_template": false}
    {"messages": [...], "sampling_params": {...}, "stream": false}

A prompt is a completion (a chat message with `apply_chat_template`), messages a chat, both for the
served model; `sampling_params` are vLLM's (its OpenAI routes take the same names), `max_tokens` 16
unless given, as vLLM's SamplingParams has it. Their output is worker-vllm's too: items of
`{"choices": [{"tokens": ["text", ...]}, ...], "usage": {"input": N, "output": M}}`.

Output: the API's JSON response. With `"stream": true` in the body, the job streams: each item is a
string of one or more complete SSE events exactly as the API sent them (`data: {...}\\n\\n`, the last
`data: [DONE]\\n\\n`), which is what RunPod's OpenAI-compatible endpoint relays; concatenated, the
items are the API's event stream (`return_aggregate_stream` gives the list to /run and /runsync).
Events are batched by what has arrived when RunPod takes the next item. An error answer (4xx/5xx)
is yielded as the API's JSON (`{"error": {...}}`), which RunPod reports as the job's error.

Local test without RunPod: `python -m app.runpod_worker --rp_serve_api --rp_api_port 8010` serves
the SDK's development API (`POST /runsync {"input": {...}}`) once the engine is ready. (The SDK's
`--test_input` mode does not iterate generator handlers, so it cannot run this one.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from app.logs import configure_from, get_logger
from app.security import load_keys
from app.settings import Settings, load_settings

log = get_logger("app.runpod_worker")

POLL_INTERVAL = 0.5
STOP_GRACE = 45.0  # beyond DRAIN_TIMEOUT: the launcher then stops the engine (up to 30 s)


class JobError(ValueError):
    """A job whose input cannot be forwarded; the message is what RunPod shows."""


def parse_job(job_input: Any) -> tuple[str, str, dict | None]:
    """(method, route, body) of a job's input, in either accepted shape."""
    if not isinstance(job_input, dict):
        raise JobError(
            "job input must be an object with `route` and `body` (or `openai_route` and `openai_input`)"
        )
    if "openai_route" in job_input:
        route, body = job_input.get("openai_route"), job_input.get("openai_input")
    else:
        route, body = job_input.get("route"), job_input.get("body")
    if not isinstance(route, str) or not route.startswith("/") or "://" in route:
        raise JobError(f"job input needs a route, an API path such as /v1/chat/completions, not {route!r}")
    if body is not None and not isinstance(body, dict):
        raise JobError("the request body must be a JSON object")
    method = str(job_input.get("method") or ("POST" if body is not None else "GET")).upper()
    if method not in ("GET", "POST", "DELETE"):
        raise JobError(f"unsupported method {method!r}")
    return method, route, body


def is_worker_vllm_job(job_input: Any) -> bool:
    """A plain worker-vllm job (prompt or messages), not a routed one."""
    return (
        isinstance(job_input, dict)
        and ("prompt" in job_input or "messages" in job_input)
        and not ({"route", "openai_route"} & job_input.keys())
    )


# vLLM's SamplingParams default, which worker-vllm's plain jobs get when they name no max_tokens.
WORKER_VLLM_MAX_TOKENS = 16


def worker_vllm_request(job_input: dict, model: str) -> tuple[str, str, dict]:
    """(method, route, body) of the OpenAI request that answers a worker-vllm job."""
    params = job_input.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise JobError("sampling_params must be an object of vLLM sampling parameters")
    messages = job_input.get("messages")
    prompt = job_input.get("prompt")
    if messages is not None:
        if not isinstance(messages, list):
            raise JobError("messages must be a list of chat messages")
    elif not isinstance(prompt, str):
        raise JobError("prompt must be a string (or send messages, a list of chat messages)")
    elif job_input.get("apply_chat_template"):
        messages = [{"role": "user", "content": prompt}]
    body: dict[str, Any] = {"max_tokens": WORKER_VLLM_MAX_TOKENS, **params, "model": model}
    if messages is not None:
        route, body["messages"] = "/v1/chat/completions", messages
    else:
        route, body["prompt"] = "/v1/completions", prompt
    if job_input.get("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return "POST", route, body


class WorkerVllmOutput:
    """The API's answers turned into worker-vllm's output items, choice by choice."""

    def __init__(self) -> None:
        self.texts: dict[int, list[str]] = {}

    def _add(self, answer: dict) -> dict | None:
        for choice in answer.get("choices") or []:
            part = choice.get("text")
            if part is None:
                holder = choice.get("message") or choice.get("delta") or {}
                part = holder.get("content")
            if part:
                self.texts.setdefault(int(choice.get("index", 0)), []).append(part)
        usage = answer.get("usage")
        return (
            {"input": usage.get("prompt_tokens"), "output": usage.get("completion_tokens")} if usage else None
        )

    def _item(self, usage: dict | None, n: int = 0) -> dict:
        n = max(n, max(self.texts, default=-1) + 1)
        item: dict[str, Any] = {"choices": [{"tokens": self.texts.get(i, [])} for i in range(n)]}
        if usage:
            item["usage"] = usage
        self.texts = {}
        return item

    def whole(self, answer: dict) -> dict:
        """A non-streamed answer: one item, one text per choice."""
        usage = self._add(answer)
        item = self._item(usage, len(answer.get("choices") or []))
        for choice in item["choices"]:
            choice["tokens"] = ["".join(choice["tokens"])]
        return item

    def events(self, raw: bytes) -> list[dict]:
        """A batch of SSE events: one item with the new text of each choice (none if no text), and
        the engine's error event as the job's error, as worker-vllm yields it."""
        usage, errors = None, []
        for line in raw.splitlines():
            if line.startswith(b"data: {"):
                event = orjson.loads(line[6:])
                if "error" in event:
                    errors.append({"error": event["error"]})
                usage = self._add(event) or usage
        return ([self._item(usage)] if (self.texts or usage) else []) + errors


def split_events(buffer: bytes) -> tuple[bytes, bytes]:
    """(complete SSE events, rest) of what has arrived so far."""
    end = max(buffer.rfind(b"\n\n"), buffer.rfind(b"\r\n\r\n"))
    if end == -1:
        return b"", buffer
    cut = end + (4 if buffer[end : end + 4] == b"\r\n\r\n" else 2)
    return buffer[:cut], buffer[cut:]


def _error(message: str, status: int = 400) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}


def make_handler(base_url: str, api_key: str | None = None, read_timeout: float = 600.0, model: str = ""):
    """The job handler: an async generator forwarding each job to the API at `base_url`; `model`
    is the served model, for worker-vllm's plain jobs (which name none)."""
    base_url = base_url.rstrip("/")
    sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def session() -> aiohttp.ClientSession:
        """One pooled session for all jobs, per event loop (the SDK runs one; tests run several)."""
        loop = asyncio.get_running_loop()
        found = sessions.get(loop)
        if found is None or found.closed:
            for old in [lp for lp in sessions if lp.is_closed()]:
                del sessions[old]
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=read_timeout + 30)
            found = sessions[loop] = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return found

    async def handler(job: dict) -> AsyncIterator[Any]:
        job_input = job.get("input")
        plain = WorkerVllmOutput() if is_worker_vllm_job(job_input) else None
        try:
            if plain is not None:
                method, route, body = worker_vllm_request(job_input, model)
            else:
                method, route, body = parse_job(job_input)
        except JobError as exc:
            yield _error(str(exc))
            return
        headers = {"x-request-id": str(job.get("id") or "")[:128] or "runpod-job"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        stream = bool(body and body.get("stream"))
        async with session().request(
            method,
            base_url + route,
            data=orjson.dumps(body) if body is not None else None,
            headers={**headers, "content-type": "application/json"} if body is not None else headers,
        ) as resp:
            is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")
            if not (stream and is_sse and resp.status == 200):
                raw = await resp.read()
                try:
                    answer = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    text = raw.decode("utf-8", "replace")
                    yield _error(text, resp.status) if resp.status >= 400 else text
                    return
                ok = plain is not None and resp.status == 200 and isinstance(answer, dict)
                yield plain.whole(answer) if ok else answer  # type: ignore[union-attr]
                return
            pending = b""
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                events, pending = split_events(pending + chunk)
                if events and plain is None:
                    yield events.decode("utf-8", "replace")
                elif events:
                    for item in plain.events(events):  # type: ignore[union-attr]
                        yield item
            if pending.strip() and plain is None:
                yield pending.decode("utf-8", "replace")
            elif pending.strip():
                for item in plain.events(pending):  # type: ignore[union-attr]
                    yield item

    return handler


class Worker:
    """The stack as a child process, and the RunPod SDK's job loop in front of it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.PORT}"
        self.child: subprocess.Popen | None = None
        self.stopping = False

    def start_stack(self) -> None:
        env = {**os.environ, "HOST": "127.0.0.1", "RUNPOD_MODE": "http"}
        env.pop("PORT_HEALTH", None)  # no load balancer polls a queue worker
        self.child = subprocess.Popen([sys.executable, "-m", "app.launcher"], env=env)
        log.info("stack started", pid=self.child.pid, url=self.url)

    def wait_ready(self) -> int | None:
        """None once the API answers /health 200; the stack's exit code if it exited first."""
        assert self.child is not None
        while True:
            code = self.child.poll()
            if code is not None:
                return code
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return None
            except OSError:  # refused while the proxy starts; HTTPError (503) while the engine loads
                pass
            time.sleep(POLL_INTERVAL)

    def stop_stack(self) -> int:
        self.stopping = True
        child = self.child
        if child is None or child.poll() is not None:
            return 0 if child is None else child.returncode
        child.send_signal(signal.SIGTERM)  # the launcher drains, then stops the engine
        try:
            return child.wait(self.settings.DRAIN_TIMEOUT + STOP_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()

    def _watch(self) -> None:
        """The stack exiting while jobs are being taken ends the worker: RunPod replaces it."""
        assert self.child is not None
        code = self.child.wait()
        if not self.stopping:
            log.error("the stack exited; stopping the worker", exit_code=code)
            os._exit(code or 1)

    def _on_signal_while_starting(self, signum: int, _frame: Any) -> None:
        log.info("signal received while starting: stopping", signal=signal.Signals(signum).name)
        sys.exit(0 if self.stop_stack() in (0, -signal.SIGTERM) else 1)

    def run(self) -> int:
        import runpod

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal_while_starting)
        self.start_stack()
        try:
            code = self.wait_ready()
            if code is not None:
                log.error("the stack exited during start-up", exit_code=code)
                return code or 1
            threading.Thread(target=self._watch, name="stack-watch", daemon=True).start()
            s = self.settings
            log.info("taking jobs", max_concurrency=s.RUNPOD_MAX_CONCURRENCY)
            runpod.serverless.start(
                {
                    "handler": make_handler(
                        self.url,
                        api_key=next(
                            iter(
                                load_keys(s.API_KEY.get_secret_value() if s.API_KEY else None, s.API_KEY_FILE)
                            ),
                            b"",
                        ).decode()
                        or None,
                        read_timeout=s.UPSTREAM_FIRST_BYTE_TIMEOUT,
                        model=s.served_model_name,
                    ),
                    "concurrency_modifier": lambda _current: s.RUNPOD_MAX_CONCURRENCY,
                    "return_aggregate_stream": True,
                }
            )
            return 0
        finally:
            self.stop_stack()


def main() -> int:
    settings = load_settings()
    if settings is None:
        return 2
    configure_from(settings)
    return Worker(settings).run()


if __name__ == "__main__":
    sys.exit(main())
