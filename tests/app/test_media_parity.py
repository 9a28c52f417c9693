"""The proxy reads a JSON body as vLLM 0.32 does, and checks every URL vLLM would fetch from it.

vLLM's side comes from vLLM's own code (tests/vllm_probe.py replays tests/media_corpus.py through
its request models and parsers, with the media connector recording instead of fetching), FastAPI's
own body handling, and Python's `json.loads` (what Starlette calls). No engine is started.
"""

from __future__ import annotations

import json
import math

import orjson
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from media_corpus import CASES
from pydantic import BaseModel
from starlette.testclient import TestClient

from app.proxy.request_body import _INVALID, inspect_json, is_json_type, parse_json

# Bodies where the proxy checks more URLs than vLLM fetches: a part whose `type` names one media
# key while it holds others is checked under every key, whichever vLLM ends up reading.
OVER_CHECKED = {"chat type disagrees with key", "chat part with uuid reads image_url first"}


def _fetched(probe, name: str) -> list[str]:
    return [u for u in probe["fetched"][name]["urls"] if u[:5].lower() != "data:"]


@pytest.mark.parametrize("name", list(CASES))
def test_the_urls_checked_are_the_urls_vllm_would_fetch(vllm_probe, name):
    route, body = CASES[name]
    ours = inspect_json(orjson.dumps(body), route).media_urls
    theirs = _fetched(vllm_probe, name)
    assert set(theirs) <= set(ours), f"vLLM would fetch {theirs}, the proxy checked {ours}"
    if name not in OVER_CHECKED and vllm_probe["fetched"][name]["error"] is None:
        assert sorted(ours) == sorted(theirs)


ENCODINGS = {
    "orjson": orjson.dumps,
    "json.dumps": lambda b: json.dumps(b).encode(),
    "escaped slashes": lambda b: json.dumps(b).replace("/", "\\/").encode(),
    "unicode escapes in keys and values": lambda b: (
        json.dumps(b)
        .replace("/", "\\u002f")
        .replace("url", "\\u0075rl")
        .replace("source", "\\u0073ource")
        .encode()
    ),
    "utf-8 BOM": lambda b: b"\xef\xbb\xbf" + json.dumps(b).encode(),
    "utf-16": lambda b: json.dumps(b).encode("utf-16"),
    "utf-16-be, no BOM": lambda b: json.dumps(b).encode("utf-16-be"),
    "utf-32": lambda b: json.dumps(b).encode("utf-32"),
    "NaN, Infinity, a lone surrogate, a huge integer": lambda b: json.dumps(
        {"temperature": math.nan, "top_p": math.inf, "user": "\ud800", "seed": 2**90, **b}
    ).encode(),
    "an earlier duplicate of every key": lambda b: (
        b"{" + b",".join(json.dumps(k).encode() + b":null" for k in b) + b"," + json.dumps(b)[1:].encode()
    ),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("name", list(CASES))
def test_however_the_json_is_written_the_proxy_sees_what_vllm_reads(vllm_probe, name, encoding):
    route, body = CASES[name]
    data = ENCODINGS[encoding](body)
    engine_reads = json.loads(data)  # Starlette's `request.json()`
    assert {k: v for k, v in engine_reads.items() if k in body} == body
    ours = inspect_json(data, route).media_urls
    assert set(_fetched(vllm_probe, name)) <= set(ours)


class Body(BaseModel):
    model: str


@pytest.mark.parametrize(
    "ctype",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "APPLICATION/vnd.api+json",
        "application/merge-patch+json; x=y",
        "application/jsonx",
        "application/json-seq",
        "text/json",
        "text/plain",
        "application/json, text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/",
        "json",
        "application/json\t",
        "application/+json",
    ],
)
def test_a_body_is_json_for_the_proxy_exactly_when_fastapi_parses_it_as_json(ctype):
    """vLLM's routes are FastAPI routes with a pydantic body: FastAPI decides from the first
    Content-Type whether to parse the body as JSON; a body it does not parse fails validation."""
    app = FastAPI()

    @app.post("/x")
    async def endpoint(body: Body) -> dict:
        return {"model": body.model}

    with TestClient(app) as client:
        r = client.post("/x", content=b'{"model":"m"}', headers=[("content-type", ctype)])
        fastapi_parsed = r.status_code == 200
        two = client.post(
            "/x", content=b'{"model":"m"}', headers=[("content-type", ctype), ("content-type", "text/plain")]
        )
    assert is_json_type(ctype.encode("latin-1")) is fastapi_parsed
    assert (two.status_code == 200) is fastapi_parsed  # the first header is the one read


_json_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
).map(json.dumps)


def _strings_and_shape(value):
    """The value with every number replaced: orjson reads integers past 64 bits as floats."""
    if isinstance(value, dict):
        return {k: _strings_and_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings_and_shape(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0
    return value


@settings(max_examples=300, deadline=None)
@given(
    text=_json_text,
    mutation=st.sampled_from(["", " ", "\ufeff", "NaN", ",", "\\ud800", '"\\u0000"', "1e999", "]", "\x00"]),
    at=st.integers(min_value=0, max_value=60),
)
def test_whatever_orjson_accepts_json_loads_reads_the_same(text, mutation, at):
    """The fast path's premise: orjson reads a body only when `json.loads` (the engine) reads the
    same strings, keys and structure; everything else goes to `json.loads` itself."""
    data = (text[:at] + mutation + text[at:]).encode("utf-8", "surrogatepass")
    value, fast = parse_json(data)
    try:
        engine = json.loads(data)
    except (ValueError, RecursionError):
        assert value is _INVALID
        return
    assert value is not _INVALID
    if fast:
        assert _strings_and_shape(value) == _strings_and_shape(engine)
    else:
        assert value == engine or json.dumps(value) == json.dumps(engine)  # NaN != NaN
