"""The SSE keep-alive, read by the clients that read our streams: vLLM's own benchmark client
(`vllm bench serve`: its `StreamedResponseHandler` and the loop of its chat request function) and
the OpenAI SDK's decoder (also under LiteLLM and LangChain). Keep-alives are off by default; when
an operator turns them on, each is a blank line, which neither client reads as an event wherever it
falls in a stream and however the network splits it. An SSE comment (`: keep-alive`), what the
proxy sent before, glues the bench client's next events together and loses them (issue 12, 5)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from app.proxy.handler import _Keepalive
from fake_engine import SSE_EVENT, FakeEngine
from inproc import InProcessProxy

PING = _Keepalive.PING["body"]
COMMENT = b": keep-alive\n\n"
ROLE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
USAGE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
EVENTS = [ROLE, SSE_EVENT, SSE_EVENT, USAGE, b"data: [DONE]\n\n"]


def _writes(ping: bytes) -> list[bytes]:
    """The stream as written: a keep-alive before the first event, between two, and two in a row."""
    return [ping, EVENTS[0], EVENTS[1], ping, EVENTS[2], ping, ping, EVENTS[3], EVENTS[4]]


def _groupings(writes: list[bytes]):
    """Every way the network may hand whole writes over: each read one write or several in a row."""
    for mask in range(1 << (len(writes) - 1)):
        reads, current = [], writes[0]
        for i, write in enumerate(writes[1:]):
            if mask >> i & 1:
                reads.append(current)
                current = write
            else:
                current += write
        yield [*reads, current]


def _splits(stream: bytes):
    """The stream cut anywhere: in two reads at every point, in three at many."""
    yield [stream]
    for i in range(1, len(stream)):
        yield [stream[:i], stream[i:]]
    for i in range(1, len(stream), 7):
        for j in range(i + 1, len(stream), 11):
            yield [stream[:i], stream[i:j], stream[j:]]


def _bench_messages(reads: list[bytes]) -> list[str]:
    """What `vllm bench serve` does with each network read (its chat request function's loop,
    around its own parser class), up to the JSON it decodes."""
    from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

    handler = StreamedResponseHandler()
    out = []
    for chunk_bytes in reads:
        chunk_bytes = chunk_bytes.strip()
        if not chunk_bytes:
            continue
        for message in handler.add_chunk(chunk_bytes):
            if message.startswith(":"):
                continue
            chunk = message.removeprefix("data: ")
            if chunk != "[DONE]":
                json.loads(chunk)  # raises on a glued message: the request fails
            out.append(chunk)
    return out


def _sdk_events(reads: list[bytes]) -> list[str]:
    from openai._streaming import SSEDecoder

    return [event.data for event in SSEDecoder().iter_bytes(iter(reads))]


EXPECTED = [e[len(b"data: ") :].strip().decode() for e in EVENTS]


def test_keepalive_pings_are_no_event_to_vllm_bench_serve_however_writes_are_grouped():
    """vLLM's client strips every read, so it already loses an event cut inside (`data: ` then
    its JSON): what it needs is whole writes, whichever ones arrive together."""
    for reads in _groupings(_writes(PING)):
        assert _bench_messages(reads) == EXPECTED, reads


def test_keepalive_pings_are_no_event_to_the_openai_sdk_however_the_stream_is_cut():
    for reads in _splits(b"".join(_writes(PING))):
        assert _sdk_events(reads) == EXPECTED, reads


def test_an_sse_comment_breaks_vllm_bench_serve():
    """Why the keep-alive is not an SSE comment: the bench client strips each read, so a comment
    read alone glues onto the next event and both are dropped (or fail to decode)."""
    broken = 0
    for reads in _groupings(_writes(COMMENT)):
        try:
            broken += _bench_messages(reads) != EXPECTED
        except json.JSONDecodeError:
            broken += 1
    assert broken > 0
    assert _bench_messages([COMMENT, *EVENTS]) != EXPECTED  # before the first event: every request
    assert _sdk_events([b"".join(_writes(COMMENT))]) == EXPECTED  # the SDK tolerates it


@pytest.fixture(scope="module")
def fake():
    with FakeEngine() as engine:
        yield engine


def _bench_request(url: str, delay: float):
    """One request with `vllm bench serve`'s own chat request function."""
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
    )

    async def run():
        async with aiohttp.ClientSession(headers={"x-fake": "slow-prefill", "x-fake-delay": str(delay)}) as s:
            return await async_request_openai_chat_completions(
                RequestFuncInput(
                    prompt="hi", api_url=url + "/v1/chat/completions", prompt_len=1, output_len=3, model="m"
                ),
                s,
            )

    return asyncio.run(run())


def test_vllm_bench_serve_through_the_proxy_with_keepalives_on_gets_every_token(fake):
    """Fake: a stream silent for 1.2 s before its first event (a long prefill), with keep-alives
    every 0.2 s; before, every such request failed ("Never received a valid chunk...")."""
    with InProcessProxy(fake.url, SSE_KEEPALIVE_INTERVAL=0.2) as p:
        out = _bench_request(p.url, 1.2)
    assert out.success, out.error
    assert out.generated_text == "tok" * 3


def test_by_default_a_silent_stream_carries_exactly_the_engines_bytes(fake):
    """Fake: the same slow stream; with the default settings the proxy adds nothing to it."""
    headers = {"x-fake": "slow-prefill", "x-fake-delay": "0.6"}
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    direct = httpx.post(fake.url + "/v1/chat/completions", json=body, headers=headers, timeout=10).content
    with InProcessProxy(fake.url) as p:
        assert p.settings.SSE_KEEPALIVE_INTERVAL == 0
        proxied = httpx.post(p.url + "/v1/chat/completions", json=body, headers=headers, timeout=10).content
    assert proxied == direct
