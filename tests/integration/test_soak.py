"""A bounded soak against the real stack (vLLM on the CPU, the tiny image model): thousands of mixed
requests (streams, plain answers, images, client hang-ups, client errors) at once, then:
every request got the status its kind calls for, each was logged exactly once, nothing is left in
flight, and the proxy's memory stayed flat."""

import asyncio
import base64
import io
import random
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

MODEL = "tiny-vision"
TOTAL = 2400
CONCURRENCY = 16


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (10, 200, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = _png()


def _request(kind: str) -> tuple[dict | bytes, int, bool]:
    """(body, expected status, stream?) for one kind of request."""
    text = [{"role": "user", "content": "hello"}]
    image = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": IMAGE}}],
        }
    ]
    if kind == "chat":
        return {"model": MODEL, "messages": text, "max_tokens": 4}, 200, False
    if kind == "stream":
        return {"model": MODEL, "messages": text, "max_tokens": 8, "stream": True}, 200, True
    if kind == "image":
        return {"model": MODEL, "messages": image, "max_tokens": 3}, 200, False
    if kind == "hangup":
        return (
            {"model": MODEL, "messages": text, "max_tokens": 1000, "ignore_eos": True, "stream": True},
            499,
            True,
        )
    if kind == "unknown_model":
        return {"model": "nope", "messages": text}, 404, False
    if kind == "bad_json":
        return b'{"model": "tiny-vision", "messages": [', 400, False
    raise AssertionError(kind)


KINDS = (
    ["chat"] * 35
    + ["stream"] * 30
    + ["image"] * 10
    + ["hangup"] * 10
    + ["unknown_model"] * 8
    + ["bad_json"] * 7
)


async def _one(client: httpx.AsyncClient, kind: str, results: dict) -> None:
    rid = f"soak-{kind}-{uuid.uuid4().hex[:10]}"
    body, expected, stream = _request(kind)
    headers = {"x-request-id": rid, "content-type": "application/json"}
    content = body if isinstance(body, bytes) else None
    json = None if isinstance(body, bytes) else body
    if not stream:
        r = await client.post("/v1/chat/completions", json=json, content=content, headers=headers)
        results[rid] = (kind, expected, r.status_code)
        return
    async with client.stream("POST", "/v1/chat/completions", json=json, headers=headers) as r:
        status = r.status_code
        lines = 0
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                lines += 1
                if kind == "hangup" and lines == 3:
                    break  # the client goes away mid-stream
        if kind == "stream" and not (lines >= 2):
            status = -1
    results[rid] = (kind, expected, 499 if kind == "hangup" else status)


async def _soak(url: str, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(n)]
    results: dict = {}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for kind in kinds:
            queue.put_nowait(kind)

        async def worker():
            while not queue.empty():
                await _one(client, queue.get_nowait(), results)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def test_soak_mixed_traffic_loses_nothing_and_keeps_memory_flat(vision_stack):
    pid = vision_stack.proc.pid
    asyncio.run(_soak(vision_stack.url, 300, seed=1))  # warm-up: pools, caches, label sets
    rss_before = _rss_kib(pid)
    started = time.monotonic()
    results = asyncio.run(_soak(vision_stack.url, TOTAL, seed=2))
    elapsed = time.monotonic() - started
    rss_after = _rss_kib(pid)

    assert len(results) == TOTAL
    wrong = [(rid, kind, expected, got) for rid, (kind, expected, got) in results.items() if expected != got]
    assert not wrong, wrong[:10]

    # Every request was logged exactly once, with the status the client saw (499 for hang-ups the
    # proxy saw happen mid-stream).
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in vision_stack.records() if r.get("event") == "request"]
        lines = Counter(r["request_id"] for r in records)
        if all(lines.get(rid) == 1 for rid in results) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    missing = [rid for rid in results if lines.get(rid, 0) != 1]
    assert not missing, missing[:10]
    logged = {r["request_id"]: r for r in records if r["request_id"] in results}

    def logged_right(rid: str) -> bool:
        line, status = logged[rid], results[rid][2]
        if results[rid][0] == "hangup" and line["status"] == 200:
            # A client starved of CPU may go away only after the proxy sent the whole stream: then
            # the proxy rightly logs a complete answer.
            return line["completion_tokens"] == 1000
        return line["status"] == status

    mislogged = [(rid, results[rid], logged[rid]["status"]) for rid in logged if not logged_right(rid)]
    assert not mislogged, mislogged[:10]
    hangups = [rid for rid in logged if results[rid][0] == "hangup"]
    noticed = sum(logged[rid]["status"] == 499 for rid in hangups)
    assert noticed >= 0.8 * len(hangups), (noticed, len(hangups))

    health = httpx.get(vision_stack.url + "/health").json()
    assert health["status"] == "ready" and health["in_flight"] == 0
    growth = (rss_after - rss_before) / rss_before
    print(
        f"soak: {TOTAL} requests in {elapsed:.1f}s ({TOTAL / elapsed:.0f} req/s), RSS {rss_before} -> {rss_after} KiB ({growth:+.1%})"
    )
    assert growth < 0.10, (rss_before, rss_after)
