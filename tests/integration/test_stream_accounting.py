"""What real clients see of a stream is what the proxy logs and counts (issue 12, section 5), with
real vLLM (CPU) behind the proxy and `vllm bench serve`'s own request function in front. (A stream
the client closes at `data: [DONE]` is in tests/app/proxy/test_edge.py: whether vLLM's end of the
response comes in the same read as that event is chance, so a fake engine makes it come later.)"""

from __future__ import annotations

import asyncio
import random

import pytest

pytestmark = pytest.mark.integration

MODEL = "tiny-text"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away"]


def test_every_vllm_bench_serve_stream_is_logged_with_its_ttft(text_stack):
    """The tiny model's tokens often decode to nothing (held-back UTF-8, special tokens): a quarter
    of these streams carry no text at all, yet every one generated tokens and `vllm bench serve`
    took a TTFT for each. Before, those streams were logged without one."""
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_completions

    rng = random.Random(1)

    async def run():
        limit = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as session:

            async def one(i: int):
                async with limit:
                    request = RequestFuncInput(
                        prompt=" ".join(rng.choice(WORDS) for _ in range(20)),
                        api_url=text_stack.url + "/v1/completions",
                        prompt_len=20,
                        output_len=8,
                        model=MODEL,
                        ignore_eos=True,
                        request_id=f"bench-ttft-{i}",
                    )
                    return await async_request_openai_completions(request, session)

            return await asyncio.gather(*(one(i) for i in range(32)))

    outputs = asyncio.run(run())
    assert all(o.success for o in outputs), [o.error for o in outputs if not o.success][:1]
    for i, output in enumerate(outputs):
        line = text_stack.request_log(f"bench-ttft-{i}")
        assert line["status"] == 200 and line["model"] == MODEL
        assert line["ttft_ms"] is not None, (output.generated_text, line)
        assert line["completion_tokens"] == output.output_tokens == 8


@pytest.mark.parametrize("include_usage", [True, False])
def test_real_vllm_streams_pass_on_unchanged_with_only_their_ends_through_the_sink(
    text_stack, monkeypatch, include_usage
):
    """vLLM writes each event as a chunk of its own: once the first token is out, the proxy passes
    those chunks on as they came (app/proxy/passthrough.py), and only a stream's start and end go
    through the response parser and the sink. Through an in-process proxy in front of the real
    engine, greedy and with EOS ignored: the OpenAI SDK reads through it the same tokens, chunks and
    usage as straight from vLLM; the log line has the counts and a TTFT. Without `include_usage`
    the proxy asks for usage and removes the usage chunk: that end goes through the sink too."""
    from openai import OpenAI

    from inproc import InProcessProxy, count_slow_reads

    def read(base_url: str, rid: str) -> tuple[str, int, object]:
        client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(
            model=MODEL,
            prompt="the quick brown fox jumps over the lazy dog and",
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True} if include_usage else None,
            extra_body={"ignore_eos": True},
            extra_headers={"x-request-id": rid},
        )
        texts, usage = [], None
        for chunk in stream:
            texts.extend(choice.text for choice in chunk.choices)
            usage = chunk.usage or usage
        return "".join(texts), len(texts), usage

    direct = read(text_stack.engine_url, "direct-passthrough")
    slow = count_slow_reads(monkeypatch)
    with InProcessProxy(text_stack.engine_url, MODEL_NAME=MODEL) as proxy:
        relayed = read(proxy.url, f"passthrough-{include_usage}")
        line = proxy.logs.request(f"passthrough-{include_usage}")
    # The same tokens and usage (how vLLM groups them into chunks varies from run to run).
    (text, chunks, usage), (relayed_text, relayed_chunks, relayed_usage) = direct, relayed
    assert relayed_text == text and relayed_usage == usage and (usage is not None) is include_usage
    assert min(chunks, relayed_chunks) >= 40
    body_reads = [data for data in slow if b"data: " in data]
    assert 1 <= len(body_reads) <= 8, body_reads  # of ~50 events
    assert line["status"] == 200 and line["ttft_ms"] is not None
    assert line["completion_tokens"] == 48 and line["prompt_tokens"] > 0
    if include_usage:
        assert line["prompt_tokens"] == usage.prompt_tokens
