"""The Batch API on the real stack (scripts/start.sh, vLLM on the CPU) through the OpenAI SDK:
outputs matched to inputs by custom_id, the error file, the request log lines with the batch id,
cancel, and a SIGKILL half-way through a batch followed by a restart on the same BATCH_DIR.

One stack for the module (its own BATCH_DIR, restarted by the last test)."""

from __future__ import annotations

import io
import os
import signal
import time
from collections import Counter

import httpx
import orjson
import pytest
from openai import OpenAI

from app.keys import plain_name
from stack import Stack

pytestmark = pytest.mark.integration

KEY = "batch-test-key"
CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "cancelled", "expired")


def make_stack(logs, tiny_models, batch_dir, name: str) -> Stack:
    return Stack(
        logs,
        name,
        MODEL_NAME=str(tiny_models["text"]),
        SERVED_MODEL_NAME="tiny-text",
        MAX_MODEL_LEN="4096",
        BATCH_DIR=str(batch_dir),
        BATCH_CONCURRENCY="4",
        API_KEY=KEY,
    )


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batch-dir")


@pytest.fixture(scope="module")
def stacks(stack_logs, tiny_models, batch_dir):
    """The running stack is stacks[-1]; the SIGKILL test appends its successor."""
    running = [make_stack(stack_logs, tiny_models, batch_dir, "batch-1")]
    try:
        running[0].start()
        yield running
    finally:  # also when a start failed: no stack left behind
        for stack in running:
            stack.stop()


def sdk(stack: Stack) -> OpenAI:
    return OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=2, timeout=60)


def chat_line(custom_id: str, text: str, max_tokens: int = 8, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": "tiny-text",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            **body,
        },
    }


def jsonl(lines) -> bytes:
    return b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)


def submit(client: OpenAI, lines, endpoint: str = CHAT):
    file = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")


def wait(client: OpenAI, batch_id: str, timeout: float = 240, until=lambda b: b.status in TERMINAL):
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch)
        if until(batch):
            return batch, seen
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)


def read_lines(client: OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines()]


def test_a_batch_runs_through_the_sdk_with_outputs_matched_by_custom_id(stacks):
    stack = stacks[-1]
    client = sdk(stack)
    good = [chat_line(f"q-{n}", f"question number {n}") for n in (7, 3, 11, 1, 5, 9)]
    lines = [
        good[0],
        b"{this is not json",
        good[1],
        chat_line("refused", "hi", max_tokens=-1),  # the engine's own 400, in the error file
        good[2],
        {**chat_line("wrong-url", "hi"), "url": "/v1/embeddings"},
        good[3],
        chat_line("q-3", "a repeated custom_id"),
        good[4],
        good[5],
    ]
    batch = submit(client, lines)
    completions = submit(
        client,
        [
            {"custom_id": f"c-{i}", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny-text", "prompt": f"once {i}", "max_tokens": 4}}
            for i in range(2)
        ],
        endpoint="/v1/completions",
    )  # fmt: skip
    done, seen = wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 10
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 4)
    counts = [(b.request_counts.completed, b.request_counts.failed) for b in seen if b.request_counts]
    assert counts == sorted(counts)  # progress only goes forward
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.usage.output_tokens == 6 * 8 and done.usage.input_tokens > 0
    assert done.model == "tiny-text"

    outputs = read_lines(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(x["custom_id"] for x in good)
    by_id = {o["custom_id"]: o for o in outputs}
    for line in good:  # matched by custom_id: each answer is that line's request's
        out = by_id[line["custom_id"]]
        assert out["error"] is None and out["response"]["status_code"] == 200
        body = out["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny-text"
        assert body["usage"]["completion_tokens"] == 8
        record = stack.request_log(out["response"]["request_id"])
        assert record["batch_id"] == done.id and record["path"] == CHAT and record["status"] == 200
        assert record["prompt_tokens"] == body["usage"]["prompt_tokens"]
        assert record["key"] == plain_name(KEY.encode())  # the batch's key, whose usage it is

    errors = read_lines(client, done.error_file_id)
    assert [(e["custom_id"], (e["error"] or {}).get("code")) for e in errors] == [
        (None, "invalid_json_line"),
        ("refused", None),
        ("wrong-url", "url_mismatch"),
        ("q-3", "duplicate_custom_id"),
    ]
    refused = errors[1]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["message"]
    assert stack.request_log(refused["request_id"])["status"] == 400
    assert [e["error"]["line"] for e in errors if e["error"]] == [2, 6, 8]

    done_c, _ = wait(client, completions.id)
    outs = read_lines(client, done_c.output_file_id)
    assert sorted(o["custom_id"] for o in outs) == ["c-0", "c-1"]
    assert all(o["response"]["body"]["object"] == "text_completion" for o in outs)

    exposition = httpx.get(stack.url + "/metrics", timeout=10).text
    assert 'vllm_api_batch_requests_total{outcome="completed"} 8.0' in exposition
    assert 'vllm_api_batch_requests_total{outcome="invalid"} 3.0' in exposition


def test_cancel_stops_a_batch_and_hangs_up_on_its_lines_in_flight(stacks):
    stack = stacks[-1]
    client = sdk(stack)
    lines = [chat_line(f"long-{i}", "go on", max_tokens=2000, ignore_eos=True) for i in range(12)]
    batch = submit(client, lines)
    wait(client, batch.id, until=lambda b: b.status == "in_progress")
    time.sleep(0.5)  # the first lines are being generated
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done, _ = wait(client, batch.id, timeout=60)
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    assert done.request_counts.total == 12 and done.request_counts.completed < 12
    assert len(read_lines(client, done.output_file_id)) == done.request_counts.completed
    hung_up = [
        r
        for r in stack.records()
        if r.get("event") == "request" and r.get("batch_id") == batch.id and r.get("status") == 499
    ]
    assert hung_up, "the lines in flight were not hung up on"  # so the engine aborted them


@pytest.mark.timeout(600)  # a second stack start in the test (each may take up to 180 s)
def test_sigkill_half_way_then_a_restart_finishes_with_no_line_lost_or_doubled(
    stacks, stack_logs, tiny_models, batch_dir
):
    first = stacks[-1]
    client = sdk(first)
    lines = [chat_line(f"k-{i:02d}", f"line {i}", max_tokens=96, ignore_eos=True) for i in range(16)]
    batch = submit(client, lines)
    before, _ = wait(
        client, batch.id, until=lambda b: b.request_counts is not None and b.request_counts.completed >= 3
    )
    assert before.status == "in_progress", "the batch ended before the kill: make it longer"
    os.killpg(first.proc.pid, signal.SIGKILL)  # the container's main process, with no warning
    first.proc.wait(10)
    first.stop()  # and the engine, as a container's end would

    second = make_stack(stack_logs, tiny_models, batch_dir, "batch-2")
    stacks.append(second)
    second.start()
    client = sdk(second)
    done, _ = wait(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        16,
        16,
        0,
    )
    outputs = read_lines(client, done.output_file_id)
    assert Counter(o["custom_id"] for o in outputs) == Counter(
        x["custom_id"] for x in lines
    )  # none lost, none twice
    assert [o["custom_id"] for o in outputs] == [x["custom_id"] for x in lines]  # input order

    def answered(stack):
        return {
            r["request_id"]
            for r in stack.records()
            if r.get("event") == "request" and r.get("batch_id") == batch.id and r.get("status") == 200
        }

    kept = {o["response"]["request_id"] for o in outputs} & answered(first)
    assert len(kept) >= before.request_counts.completed  # recorded before the kill: kept, not re-run
    rerun = answered(second)
    assert len(rerun) == 16 - len(kept)  # the restart ran exactly the lines that had no result
