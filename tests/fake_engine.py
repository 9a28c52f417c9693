"""A fault-injecting stand-in for the engine, for what real vLLM cannot be made to do on demand:
hang, die mid-stream, answer with odd headers. Everything else is tested against real vLLM.

The behaviour of a request is picked by its `x-fake` header; every request is recorded.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from stack import free_port

SSE_EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
METRICS = (
    b"# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
    b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.0\n"
    b"# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    b"# TYPE vllm:num_requests_running gauge\n"
    b'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    target: str = ""
    """The request target as it came on the wire (path and query, undecoded)."""


@dataclass
class FakeEngine:
    seen: list[Seen] = field(default_factory=list)
    closed_early: int = 0
    """Streams whose client (the proxy) went away before the stream ended."""
    held: int = 0
    """`x-fake: gate` requests waiting for `release()` now."""
    most_held: int = 0

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._gate: asyncio.Semaphore | None = None

    def release(self, n: int = 1) -> None:
        """Let `n` held (`x-fake: gate`) requests be answered, now or as they arrive."""
        for _ in range(n):
            self._loop.call_soon_threadsafe(self._gate.release)  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body, request.raw_path))
        mode = request.headers.get("x-fake", "echo")
        if request.path == "/health":
            return web.Response(text="")
        if request.path == "/metrics":
            return web.Response(body=METRICS, content_type="text/plain")
        if mode == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # the proxy dropped the connection
                self.closed_early += 1
                raise
        if mode == "gate":  # answered when the test says so: exact timing for admission tests
            assert self._gate is not None
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            try:
                await self._gate.acquire()
            finally:
                self.held -= 1
        if mode == "status":
            return web.json_response({"error": {"message": "nope", "type": "BadRequestError"}}, status=400)
        if mode == "large":  # 5 MiB: vLLM's chat field order puts prompt_logprobs after usage
            usage = {"prompt_tokens": 4000, "completion_tokens": 2, "total_tokens": 4002}
            tail = [{str(i): {"logprob": -1.0, "rank": 1, "decoded_token": "usage"}} for i in range(75_000)]
            body = json.dumps({"id": "c", "choices": [], "usage": usage, "prompt_logprobs": tail})
            return web.Response(body=body.encode(), content_type="application/json")
        if mode == "models":  # vLLM's GET /v1/models, serving "m" and the adapter "allowed"
            data = [{"id": i, "object": "model", "owned_by": "vllm", "root": "m"} for i in ("m", "allowed")]
            return web.json_response({"object": "list", "data": data})
        if mode in ("stream", "crash-mid-stream", "endless", "slow-prefill", "stall-mid-stream", "linger"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
            await resp.prepare(request)
            try:
                if mode == "slow-prefill":  # headers at once, then silence, as vLLM during a prefill
                    await asyncio.sleep(float(request.headers.get("x-fake-delay", "2.5")))
                if mode == "stall-mid-stream":
                    await resp.write(SSE_EVENT)
                    await asyncio.sleep(3600)
                for _ in range(10**6 if mode == "endless" else 3):
                    await resp.write(SSE_EVENT)
                    await asyncio.sleep(0.01)
                if mode == "crash-mid-stream":
                    request.transport.abort()  # the engine process dies: the socket is reset
                    return resp
                await resp.write(b"data: [DONE]\n\n")
                if mode == "linger":  # the end of the response comes a while after the last event
                    await asyncio.sleep(float(request.headers.get("x-fake-delay", "1")))
            except (ConnectionResetError, asyncio.CancelledError):
                self.closed_early += 1
                raise
            return resp
        headers = {
            "x-engine-header": "kept",
            "keep-alive": "timeout=5",
            "connection": "keep-alive, x-hop",
            "x-hop": "dropped",
            "access-control-allow-origin": "*",  # vLLM's default CORS answer
        }
        if mode == "engine-request-id":  # vLLM with --enable-request-id-headers
            headers["x-request-id"] = "engine-id"
        return web.json_response(
            {
                "echo": json.loads(body) if body[:1] == b"{" else None,
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            },
            headers=headers,
        )

    def __enter__(self) -> FakeEngine:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake engine did not start")
        return self

    async def _serve(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._stop = asyncio.Event()
        self._gate = asyncio.Semaphore(0)
        self._loop = asyncio.get_running_loop()
        self._started.set()
        await self._stop.wait()
        await runner.cleanup()

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
