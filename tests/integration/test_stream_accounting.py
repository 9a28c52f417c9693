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
