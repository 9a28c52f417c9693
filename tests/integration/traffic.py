"""A little of every kind of traffic, for the observability tests: chat and completions, streamed
and not, a long prompt sent twice (prefix-cache hits), one refused request (4xx)."""

from __future__ import annotations

import concurrent.futures

import httpx

MODEL = "tiny-text"
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)


def send_traffic(base_url: str, rounds: int = 1, workers: int = 4) -> int:
    """Send the mix `rounds` times; returns how many requests were sent."""
    bodies = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 16, "stream": True},
        ),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "stream": True}),
        ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}),
        ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}),
    ]
    jobs = [(path, {"model": MODEL, **body}) for _ in range(rounds) for path, body in bodies]

    def send(job):
        path, body = job
        r = httpx.post(base_url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(send, jobs))
    refused = httpx.post(
        base_url + "/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=30
    )
    assert refused.status_code == 404
    return len(jobs) + 1
