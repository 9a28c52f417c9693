"""RUNPOD_MODE=queue against real vLLM on the CPU: the handler on its own, the handler inside the
runpod SDK's own job code and development API, and the whole worker through scripts/start.sh."""

import asyncio
import json
import signal
import subprocess
import time

import httpx
import pytest

from app.runpod_worker import make_handler
from stack import START, Stack, free_port

pytestmark = pytest.mark.integration

CHAT = {"model": "tiny-text", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


def run_job(handler, job: dict) -> list:
    async def collect():
        return [item async for item in handler(job)]

    return asyncio.run(collect())


def sse_data(items: list[str]) -> list[str]:
    """The `data:` payloads of a stream job's items, joined back into one event stream."""
    text = "".join(items)
    assert text.endswith("\n\n")
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_a_chat_job_in_either_shape_is_answered_through_the_proxy(text_stack):
    handler = make_handler(text_stack.url)
    ours = run_job(handler, {"id": "job-ours-1", "input": {"route": "/v1/chat/completions", "body": CHAT}})
    theirs = run_job(
        handler,
        {"id": "job-openai-1", "input": {"openai_route": "/v1/chat/completions", "openai_input": CHAT}},
    )
    for output in (ours, theirs):
        assert len(output) == 1 and output[0]["object"] == "chat.completion"
        assert output[0]["usage"]["completion_tokens"] == 5
    # The job went through the proxy: its canonical log line carries the job id.
    record = text_stack.request_log("job-ours-1")
    assert record["path"] == "/v1/chat/completions" and record["status"] == 200
    models = run_job(handler, {"id": "job-models", "input": {"openai_route": "/v1/models"}})
    assert models[0]["data"][0]["id"] == "tiny-text"


def test_worker_vllm_s_plain_jobs_are_answered_in_its_output_shape(text_stack):
    """RunPod's console offers `{"input": {"prompt": ...}}` as sample input, worker-vllm's shape."""
    handler = make_handler(text_stack.url, model="tiny-text")
    sample = run_job(handler, {"id": "job-plain-prompt", "input": {"prompt": "Hello World"}})
    assert len(sample) == 1 and len(sample[0]["choices"]) == 1
    assert isinstance(sample[0]["choices"][0]["tokens"][0], str)
    assert sample[0]["usage"]["output"] == 16  # vLLM's SamplingParams default, as worker-vllm gets it
    assert text_stack.request_log("job-plain-prompt")["path"] == "/v1/completions"
    chat = {
        "messages": [{"role": "user", "content": "hi"}],
        "sampling_params": {"max_tokens": 6, "ignore_eos": True},
    }
    streamed = run_job(handler, {"id": "job-plain-chat", "input": {**chat, "stream": True}})
    assert streamed and all(set(item) <= {"choices", "usage"} for item in streamed)
    assert streamed[-1]["usage"]["output"] == 6
    whole = run_job(handler, {"id": "job-plain-chat-2", "input": chat})
    assert (
        whole[0]["usage"]["output"] == 6
        and text_stack.request_log("job-plain-chat-2")["path"] == "/v1/chat/completions"
    )


def test_a_stream_job_yields_the_apis_events_batched_and_complete(text_stack):
    body = {**CHAT, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
    items = run_job(
        make_handler(text_stack.url),
        {"id": "job-stream", "input": {"route": "/v1/chat/completions", "body": body}},
    )
    assert all(isinstance(item, str) and item.endswith("\n\n") for item in items)
    data = sse_data(items)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    record = text_stack.request_log("job-stream")
    assert record["stream"] is True and record["ttft_ms"] is not None


def test_an_api_error_is_the_jobs_error(text_stack):
    bad = {**CHAT, "model": "no-such-model"}
    output = run_job(
        make_handler(text_stack.url),
        {"id": "job-bad", "input": {"route": "/v1/chat/completions", "body": bad}},
    )
    assert len(output) == 1 and "error" in output[0]
    assert "no-such-model" in json.dumps(output[0])
    malformed = run_job(make_handler(text_stack.url), {"id": "job-malformed", "input": {"body": CHAT}})
    assert malformed[0]["error"]["message"].startswith("job input needs a route")


def test_the_sdks_own_job_code_runs_the_handler(text_stack):
    """The runpod SDK's development API (what `--rp_serve_api` serves), in-process: /runsync
    aggregates a generator handler's items, as RunPod does with return_aggregate_stream."""
    from fastapi.testclient import TestClient
    from runpod.serverless.modules.rp_fastapi import WorkerAPI

    api = WorkerAPI({"handler": make_handler(text_stack.url), "return_aggregate_stream": True})
    with TestClient(api.rp_app) as client:
        plain = client.post(
            "/runsync",
            json={
                "input": {
                    "route": "/v1/completions",
                    "body": {"model": "tiny-text", "prompt": "x", "max_tokens": 3},
                }
            },
        )
        assert plain.status_code == 200 and plain.json()["status"] == "COMPLETED"
        assert plain.json()["output"][0]["usage"]["completion_tokens"] == 3
        body = {"model": "tiny-text", "prompt": "x", "max_tokens": 8, "stream": True}
        streamed = client.post(
            "/runsync", json={"input": {"openai_route": "/v1/completions", "openai_input": body}}
        )
        assert streamed.json()["status"] == "COMPLETED"
        assert sse_data(streamed.json()["output"])[-1] == "[DONE]"


def test_the_worker_starts_the_stack_takes_jobs_and_stops_it(stack_logs, tiny_models):
    """scripts/start.sh with RUNPOD_MODE=queue, in the SDK's local API mode (no RunPod needed)."""
    rp_port = free_port()
    stack = Stack(
        stack_logs,
        "runpod-queue",
        MODEL_NAME=str(tiny_models["text"]),
        SERVED_MODEL_NAME="tiny-text",
        MAX_MODEL_LEN="1024",
        RUNPOD_MODE="queue",
        API_KEY="sk-worker",  # the worker authenticates to its own proxy
    )
    log = open(stack.log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(START), "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(rp_port)],
        env=stack.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{rp_port}/runsync",
                    json={"id": "x", "input": {"route": "/v1/chat/completions", "body": CHAT}},
                    timeout=60,
                )
                break
            except httpx.TransportError:
                time.sleep(0.25)
        assert answer is not None, stack.tail()
        assert answer.json()["status"] == "COMPLETED", answer.text
        assert answer.json()["output"][0]["choices"][0]["message"]["role"] == "assistant"
        # The stack listens on loopback only, behind the worker.
        assert any(r.get("event") == "stack started" for r in stack.records())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        events = [r.get("event") for r in stack.records()]
        assert "engine stopped" in events
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
