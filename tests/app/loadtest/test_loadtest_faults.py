"""The load tester against a server that fails in every way a real one can.

The server here is an in-process aiohttp stand-in: real vLLM cannot be made to cut a stream, send an
error event, hang or leave out usage on demand (the errors real vLLM answers are tested in
tests/integration/test_loadtest.py). Each request's behaviour is picked by its prompt.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from aiohttp import web

from app.loadtest.cli import main
from stack import free_port

ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
TOKEN = {"choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
FIRST_TOKEN_DELAY = 0.2


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class FaultyServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._ready = threading.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        if request.path == "/metrics":  # vLLM's counters, 10 of every 40 prompt tokens hit so far
            n = self.requests
            return web.Response(
                text=f'vllm:prefix_cache_queries_total{{engine="0"}} {40.0 * n}\n'
                f'vllm:prefix_cache_hits_total{{engine="0"}} {10.0 * n}\n'
            )
        if request.path != "/v1/chat/completions":
            return web.Response(status=404)
        self.requests += 1
        body = await request.json()
        mode = body["messages"][-1]["content"]
        if mode == "http500":
            return web.json_response(
                {"error": {"message": "engine on fire", "type": "InternalServerError"}}, status=500
            )
        if mode == "hang":
            await asyncio.sleep(30)
        if not body.get("stream"):
            return web.json_response(
                {"choices": [{"message": {"content": "tok tok tok"}}], "usage": USAGE["usage"]}
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(event(ROLE))  # the first event carries no text: it is not the first token
        await asyncio.sleep(FIRST_TOKEN_DELAY)
        if mode == "midstream":
            await resp.write(event(TOKEN) + event({"error": {"message": "engine died", "code": 500}}))
            return resp
        if mode == "cut":
            await resp.write(event(TOKEN))
            request.transport.abort()
            return resp
        stream = event(TOKEN) * 3 + (b"" if mode == "nousage" else event(USAGE))
        stream += b"" if mode == "nodone" else b"data: [DONE]\n\n"  # nodone: ends cleanly, unfinished
        for i in range(0, len(stream), 7):  # events split across writes (and so across reads)
            await resp.write(stream[i : i + 7])
            await asyncio.sleep(0.001)
        return resp

    async def serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> FaultyServer:
        self.thread = threading.Thread(target=asyncio.run, args=(self.serve(),), daemon=True)
        self.thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    with FaultyServer() as s:
        yield s


def run(server: FaultyServer, tmp_path: Path, modes: list[str], *flags: str) -> tuple[int, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(modes) + "\n")
    out = tmp_path / "out"
    argv = ["--server-url", server.url, "--prompts-file", str(prompts), "--save", str(out)]
    code = main([*argv, "--concurrency", str(len(modes)), "--no-console-output", "--no-progress", *flags])
    (saved,) = out.glob("loadtest-*.json")
    return code, json.loads(saved.read_text())


MODES = ["ok", "ok", "http500", "midstream", "cut", "hang", "nousage", "nodone"]


def test_every_failure_is_counted_and_the_exit_code_says_so(server, tmp_path):
    code, report = run(server, tmp_path, MODES, "--timeout", "1.5")
    assert code == 1
    summary = report["summary"]
    assert (summary["requests"], summary["ok"], summary["failed"]) == (8, 3, 5)
    assert summary["error_rate"] == pytest.approx(5 / 8)
    by_mode = {MODES[int(r["id"])]: r for r in report["requests"] if MODES[int(r["id"])] != "ok"}
    assert by_mode["http500"]["error"] == "HTTP 500: engine on fire" and by_mode["http500"]["status"] == 500
    assert by_mode["midstream"]["error"] == "error event in the stream: engine died"
    assert by_mode["cut"]["error"].startswith("ClientPayloadError: Response payload is not completed")
    assert by_mode["hang"]["error"] == "timeout after 1.5 s" and by_mode["hang"]["status"] is None
    assert by_mode["hang"]["latency_s"] >= 1.5
    assert by_mode["nodone"]["error"] == "the stream ended before data: [DONE]"
    assert sum(e["count"] for e in summary["errors"]) == 5
    assert summary["failed_latency_s"]["count"] == 5
    assert summary["latency_s"]["count"] == summary["ttft_s"]["count"] == 3  # over the successful only
    assert summary["latency_s"]["max"] < 1.5  # the hung request's time is not in them


def test_ttft_is_the_first_event_with_text_and_tokens_come_from_usage(server, tmp_path):
    code, report = run(server, tmp_path, ["ok", "ok", "nousage"])
    assert code == 0
    for r in report["requests"]:
        assert r["ok"] and r["ttft_s"] >= FIRST_TOKEN_DELAY  # not the role-only first event
        assert r["ttft_s"] <= r["latency_s"] and r["tpot_s"] > 0
        assert r["completion_tokens"] == 3 and r["output_chars"] == len("toktoktok")
        assert r["tpot_s"] == pytest.approx((r["latency_s"] - r["ttft_s"]) / 2)
    assert [r["tokens_from_usage"] for r in sorted(report["requests"], key=lambda r: r["id"])] == [
        True,
        True,
        False,
    ]
    assert report["summary"]["tokens_without_usage"] == 1


def test_max_error_rate_is_the_threshold(server, tmp_path):
    assert run(server, tmp_path / "a", ["ok", "http500"], "--max-error-rate", "0.5")[0] == 0
    assert run(server, tmp_path / "b", ["ok", "http500"], "--max-error-rate", "0.49")[0] == 1


def test_hit_rate_from_the_metrics_deltas(server, tmp_path):
    _, report = run(server, tmp_path, ["ok", "ok"], "--no-stream")
    assert report["summary"]["engine"]["prefix_cache_queries"] == 80.0
    assert report["summary"]["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert report["summary"]["ttft_s"]["count"] == 0 and report["summary"]["latency_s"]["count"] == 2


def test_a_server_that_cannot_be_reached_is_exit_2(capsys):
    assert main(["--server-url", f"http://127.0.0.1:{free_port()}", "--no-progress"]) == 2
    assert "Cannot connect" in capsys.readouterr().err


def test_compare_with_a_duration_gives_both_sides_whole_blocks(server, tmp_path):
    """Each stream takes FIRST_TOKEN_DELAY: the 0.3 s deadline falls inside a block, which still
    runs whole on both sides, A B then B A."""
    code, report = run(server, tmp_path, ["ok"], "--compare", server.url, "--duration", "0.3",
                       "--compare-block", "2", "--concurrency", "1")  # fmt: skip
    assert code == 0
    a, b = report["summary"], report["compare"]["summary"]
    assert a["requests"] == b["requests"] and a["requests"] % 2 == 0 and a["requests"] >= 2
    sides = [r["side"] for r in sorted(report["requests"], key=lambda r: r["start_s"])]
    assert sides[:4] == list("aabb") and (len(sides) < 8 or sides[4:8] == list("bbaa"))
