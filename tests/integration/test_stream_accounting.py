"""What real clients see of a stream is what the proxy logs and counts (issue 12, section 5), with
real vLLM (CPU) behind the proxy and the clients' own code in front: `vllm bench serve`'s request
function and the OpenAI SDK."""

from __future__ import annotations

import asyncio
import random

import pytest
from openai import OpenAI

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


def test_openai_sdk_streams_closed_at_done_are_complete(text_stack):
    """The SDK stops reading at `data: [DONE]`, and a client may close the connection at once:
    when the stream's end came in a later read than that last event, it was logged as 499 with no
    model."""
    client = OpenAI(base_url=text_stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for i in range(20):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            extra_headers={"x-request-id": f"sdk-done-{i}"},
        )
        for _ in stream:  # at [DONE] the SDK stops and closes the response, read to its end or not
            pass
    for i in range(20):
        line = text_stack.request_log(f"sdk-done-{i}")
        assert line["status"] == 200 and line["model"] == MODEL, line
