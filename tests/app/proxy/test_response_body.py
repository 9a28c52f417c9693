"""UsageFinder: the token counts of a non-streamed answer, from its chunks, holding a few KiB.

The bodies are shaped as vLLM 0.32 writes them (compact JSON, `usage` after `choices`, chat's
`prompt_logprobs` after `usage`); the same layout from real vLLM is checked in
tests/integration/test_text.py. The reference is the whole-body parse the proxy did before."""

from __future__ import annotations

import json

import orjson
import pytest

from app.proxy.response_body import UsageFinder
from app.proxy.sse import usage_counts

USAGE = {"prompt_tokens": 12, "total_tokens": 20, "completion_tokens": 8, "prompt_tokens_details": None}


def chat_body(prompt_logprobs: list | None = None, content: str = "Paris.") -> bytes:
    """A chat completion in vLLM's field order (ChatCompletionResponse)."""
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": USAGE,
            "prompt_logprobs": prompt_logprobs,
            "prompt_token_ids": None,
            "kv_transfer_params": None,
        }
    )


def prompt_logprobs(n: int) -> list:
    """vLLM's prompt_logprobs: per prompt position, token id -> logprob, rank, text; one of the
    texts is `usage` (a string value spelled like the key), and every 100th is a quote."""
    out: list = [None]
    for i in range(n):
        text = "usage" if i == 7 else ('"usage":' if i % 100 == 0 else f"tok{i}")
        out.append({str(i): {"logprob": -1.5, "rank": 1, "decoded_token": text}})
    return out


def found(chunks: list[bytes]) -> tuple[int | None, int | None]:
    finder = UsageFinder()
    for chunk in chunks:
        finder.feed(chunk)
    return finder.counts()


def test_a_body_in_one_chunk():
    assert found([chat_body()]) == (12, 8)


def test_the_key_split_between_two_chunks_at_every_place():
    body = chat_body()
    key = body.index(b'"usage":')
    for cut in range(key - 2, key + 40):
        assert found([body[:cut], body[cut:]]) == (12, 8), cut


def test_a_body_one_byte_at_a_time():
    assert found([bytes([b]) for b in chat_body(prompt_logprobs(20))]) == (12, 8)


def test_usage_before_megabytes_of_prompt_logprobs_holding_the_word_usage():
    """Chat puts prompt_logprobs after usage; their texts may be `usage`, or hold `"usage":` inside
    a string (escaped there, so not the key)."""
    body = chat_body(prompt_logprobs(80_000))
    assert len(body) > 4 * 1024 * 1024  # larger than the proxy kept before (it gave no counts)
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    assert found(chunks) == (12, 8)


def test_what_the_finder_holds_stays_small():
    finder = UsageFinder()
    body = chat_body(prompt_logprobs(80_000))
    for i in range(0, len(body), 65536):
        finder.feed(body[i : i + 65536])
        assert sum(len(getattr(finder, name)) for name in finder.__slots__) <= 4096 + 8


@pytest.mark.parametrize(
    "body",
    [
        chat_body(),
        chat_body(prompt_logprobs(50)),
        chat_body(content='He said "usage": none {"usage":{"prompt_tokens":99}}'),
        # Responses API: input/output tokens, under the response object itself
        orjson.dumps(
            {
                "id": "resp_1",
                "object": "response",
                "output": [],
                "usage": {
                    "input_tokens": 5,
                    "output_tokens": 9,
                    "total_tokens": 14,
                    "input_tokens_details": {"cached_tokens": 0},
                },
            }
        ),
        # embeddings: prompt tokens only
        orjson.dumps(
            {
                "object": "list",
                "data": [{"embedding": [0.1] * 64}],
                "usage": {"prompt_tokens": 4, "total_tokens": 4},
            }
        ),
        json.dumps(json.loads(chat_body()), indent=2).encode(),  # pretty-printed
        orjson.dumps({"id": "x", "choices": []}),  # no usage
        orjson.dumps({"id": "x", "usage": None}),
        orjson.dumps({"id": "x", "usage": {"prompt_tokens": "many"}}),
        # the first `}` is not the value's end: a nested object first, a brace in a string
        orjson.dumps({"usage": {"details": {"cached": 1}, "prompt_tokens": 3, "completion_tokens": 4}}),
        orjson.dumps({"usage": {"note": "}", "prompt_tokens": 3, "completion_tokens": 4}}),
    ],
    ids=[
        "chat",
        "chat+prompt_logprobs",
        "quoted-in-content",
        "responses",
        "embeddings",
        "pretty",
        "none",
        "null",
        "not-int",
        "nested-first",
        "brace-in-string",
    ],
)
def test_counts_equal_a_whole_body_parse(body):
    assert found([body]) == usage_counts(orjson.loads(body))


def test_a_body_that_is_not_json_gives_no_counts():
    assert found([b'Internal "usage": {oops']) == (None, None)
    assert found([b""]) == (None, None)
    assert found([b'{"usage":']) == (None, None)
