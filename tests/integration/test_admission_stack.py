"""Admission control and usage per key against real vLLM (the session's text stack): a proxy with
API keys and a small queue in this process, in front of the stack's engine (tests/inproc.py).
Token counts are the engine's own: what usage records is compared with vLLM's counters."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from app import metrics
from inproc import InProcessProxy

pytestmark = pytest.mark.integration

MODEL = "tiny-text"
TOKENS = 48  # per request: long enough that 12 sent at once find the 2 slots and 2 places taken
KEYS = """\
- name: team
  key: sk-team
- name: metered
  key: sk-metered
  tpm: 40
"""


def client(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_n_requests_m_served_the_rest_429_and_usage_holds_the_engines_tokens(text_stack, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    n = 12
    prompt_before = text_stack.engine_metric("vllm:prompt_tokens_total")
    generated_before = text_stack.engine_metric("vllm:generation_tokens_total")
    refused_before = metrics.REJECTIONS.labels("queue_full").value
    with InProcessProxy(
        text_stack.engine_url,
        MODEL_NAME=MODEL,
        API_KEY_FILE=str(keys),
        MAX_CONCURRENT_REQUESTS=2,
        MAX_QUEUED_REQUESTS=2,
        QUEUE_TIMEOUT=120,
    ) as p:
        team = client(p.url, "sk-team")
        results: dict[int, object] = {}
        start = threading.Barrier(n)

        def one(i: int) -> None:
            start.wait()
            kwargs = {"model": MODEL, "max_tokens": TOKENS, "extra_body": {"ignore_eos": True}}
            try:
                if i % 3 == 0:  # a stream whose client does not ask for usage: counted all the same
                    chunks = list(
                        team.chat.completions.create(
                            messages=[{"role": "user", "content": f"Hi {i}"}], stream=True, **kwargs
                        )
                    )
                    results[i] = ("stream", len(chunks))
                elif i % 3 == 1:
                    stream = team.completions.create(
                        prompt=f"Once upon a time {i}",
                        stream=True,
                        stream_options={"include_usage": True},
                        **kwargs,
                    )
                    usage = [c.usage for c in stream if c.usage is not None]
                    results[i] = ("usage", usage[0].prompt_tokens, usage[0].completion_tokens)
                else:
                    r = team.chat.completions.create(
                        messages=[{"role": "user", "content": f"Hello {i}"}], **kwargs
                    )
                    results[i] = ("usage", r.usage.prompt_tokens, r.usage.completion_tokens)
            except openai.RateLimitError as exc:
                results[i] = ("429", exc.response.headers.get("retry-after"), exc.body)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        shedding_health = []
        while any(t.is_alive() for t in threads):
            shedding_health.append(httpx.get(p.url + "/health", timeout=10).status_code)
            for t in threads:
                t.join(0.2)
        # The SDK stops reading a stream at `[DONE]`, which can come before the engine's end of the
        # answer, after which the proxy counts the request: polled until every request is counted.
        deadline = time.monotonic() + 15
        while True:
            rows = httpx.get(
                p.url + "/v1/usage?window=1h", headers={"authorization": "Bearer sk-team"}
            ).json()["data"]
            if sum(row["requests"] for row in rows) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.1)

        # tpm: tokens are counted when a request ends, from the engine's usage
        metered = client(p.url, "sk-metered")
        first = metered.completions.create(
            model=MODEL, prompt="Hi", max_tokens=48, extra_body={"ignore_eos": True}
        )
        assert first.usage.total_tokens > 40
        try:
            metered.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
            raise AssertionError("the second request of a key past its tpm was served")
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "key_tpm"
            assert exc.response.headers["x-ratelimit-remaining-tokens"] == "0"
            assert 1 <= int(exc.response.headers["retry-after"]) <= 60

    assert sorted(results) == list(range(n))  # every request answered, once
    refused = [r for r in results.values() if r[0] == "429"]
    served = n - len(refused)
    assert served >= 4  # 2 in flight and 2 queued, at least
    assert refused, "12 requests at once past 2 slots and 2 places: some must be refused"
    for _, retry_after, body in refused:
        assert 1 <= int(retry_after) <= 60
        assert body["code"] == "queue_full"
    assert metrics.REJECTIONS.labels("queue_full").value - refused_before == len(refused)
    assert set(shedding_health) == {200}
    print(f"admission: {n} sent at once, {served} served, {len(refused)} refused (429 queue_full)")

    # Usage is the engine's own count of what it did for this key (the metered key's one request
    # was made after the usage was read).
    (row,) = rows
    assert (row["key"], row["requests"], row["rate_limited"], row["errors"]) == (
        "team",
        n,
        len(refused),
        len(refused),
    )
    generated = text_stack.engine_metric("vllm:generation_tokens_total") - generated_before
    prompted = text_stack.engine_metric("vllm:prompt_tokens_total") - prompt_before
    assert row["completion_tokens"] == served * TOKENS == generated - first.usage.completion_tokens
    assert row["prompt_tokens"] == prompted - first.usage.prompt_tokens
    reported = [r for r in results.values() if r[0] == "usage"]
    assert sum(r[2] for r in reported) == TOKENS * len(reported)


def test_a_key_limited_to_some_models_lists_only_those(text_stack, tmp_path):
    """GET /v1/models from real vLLM, through the OpenAI SDK: a key with a `models` list sees the
    served models it may use (OpenAI lists a project's models only); any other key sees them all,
    byte for byte as the engine answered."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "- name: all\n  key: sk-all\n- name: base\n  key: sk-base\n  models: [tiny-text]\n"
        "- name: adapters\n  key: sk-adapters\n  models: [sql-adapter]\n"
    )
    with InProcessProxy(text_stack.engine_url, MODEL_NAME=MODEL, API_KEY_FILE=str(keys)) as p:
        assert [m.id for m in client(p.url, "sk-all").models.list()] == [MODEL]
        assert [m.id for m in client(p.url, "sk-base").models.list()] == [MODEL]
        assert [m.id for m in client(p.url, "sk-adapters").models.list()] == []
        whole = httpx.get(p.url + "/v1/models", headers={"authorization": "Bearer sk-all"})
        only = httpx.get(p.url + "/v1/models", headers={"authorization": "Bearer sk-base"})
        # the same entries, whole (vLLM mints `created` and the permission ids per answer)
        assert [sorted(m) for m in only.json()["data"]] == [sorted(m) for m in whole.json()["data"]]
        assert int(only.headers["content-length"]) == len(only.content)
        assert only.headers["x-request-id"]
