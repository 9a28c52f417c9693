"""Issue 12, sections 1, 2, 4 and 5: every example, against the proxy in process in front of a
recording fake engine (tests/fake_engine.py), which shows what reached the engine. What vLLM itself
would route or fetch is derived from vLLM's code in tests/app/test_routes.py and
tests/app/test_media_parity.py; here the question is what the proxy lets through."""

from __future__ import annotations

import json
import socket
import time

import httpx
import orjson
import pytest

from app.routes import ADMIN, TABLE
from fake_engine import FakeEngine
from inproc import InProcessProxy

PUBLIC = "http://93.184.215.14/p.png"  # a literal public address: no DNS needed to pass the guard
PRIVATE = "http://127.0.0.1:8001/metrics"
ADMIN_PATHS = sorted(r.path for r in TABLE if r.kind == ADMIN and "{" not in r.path)


@pytest.fixture(scope="module")
def fake():
    with FakeEngine() as engine:
        yield engine


@pytest.fixture(scope="module")
def proxy(fake):
    with InProcessProxy(
        fake.url,
        API_KEY="sk-user",
        ADMIN_API_KEY="sk-admin",
        METRICS_API_KEY="sk-metrics",
        MAX_REQUEST_BYTES=4 << 20,
    ) as p:
        yield p


USER = {"authorization": "Bearer sk-user"}


def raw(proxy, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """One request exactly as written (httpx would normalise the path); (status, head, body)."""
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(head + body)
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_out, _, body_out = data.partition(b"\r\n\r\n")
    return int(head_out.split(b" ", 2)[1]), head_out, body_out


def request_line(method: str, target: str, extra: str = "") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-user\r\n{extra}"
        "content-length: 2\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{}"
    ).encode()


def seen_since(fake, n: int) -> list:
    return fake.seen[n:]


# --- section 1: the path sent to the engine is the path that was checked ------------------------


@pytest.mark.parametrize("suffix", ["%3F", "%3Flevel=1", "%23", "%20", "%0A", "%3Fx%23y"])
@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_no_admin_route_is_reached_with_an_api_key_through_percent_encoding(proxy, fake, path, suffix):
    n = len(fake.seen)
    status, _, body = raw(proxy, request_line("POST", path + suffix))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_path"
    assert seen_since(fake, n) == []


def test_admin_routes_with_a_query_still_need_the_admin_key(proxy, fake):
    n = len(fake.seen)
    status, _, _ = raw(proxy, request_line("POST", "/sleep?level=1"))
    assert status == 403 and seen_since(fake, n) == []


def test_a_smuggled_second_request_never_reaches_the_engine(proxy, fake):
    n = len(fake.seen)
    target = "/v1/models%20HTTP/1.1%0D%0Ahost:%20e%0D%0A%0D%0APOST%20/collective_rpc"
    status, _, body = raw(proxy, request_line("GET", target))
    assert status == 400 and orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert seen_since(fake, n) == []
    r = httpx.get(proxy.url + "/v1/models", headers=USER)  # the next request gets its own answer
    assert r.status_code == 200 and fake.seen[-1].target == "/v1/models"


def test_non_utf8_and_odd_percent_encodings_are_a_404_not_a_500(proxy, fake):
    n = len(fake.seen)
    for target in ("/%E2%82%AC", "/%FF%FE", "/v1/%C0%AFmodels", "/%", "/%zz"):
        status, head, body = raw(proxy, request_line("GET", target))
        assert status in (400, 404), (target, head)
        assert orjson.loads(body)["error"]["code"] in ("not_found", "invalid_path", "invalid_http")
    assert seen_since(fake, n) == []


@pytest.mark.parametrize("target", ["/metrics/", "/metrics%3F", "/metrics%2F", "/metricsx", "/metrics/x"])
def test_the_engines_metrics_mount_is_not_reachable_without_the_metrics_key(proxy, fake, target):
    n = len(fake.seen)
    status, _, body = raw(proxy, request_line("GET", target))
    assert status in (400, 404) and b"vllm:" not in body
    assert seen_since(fake, n) == []


def test_unknown_paths_are_a_404_from_the_proxy_and_never_reach_the_engine(proxy, fake):
    n = len(fake.seen)
    for path in ("/nope", "/v1/models/", "/v1/../sleep", "/admin", "/v1/chat/completions/x"):
        status, _, body = raw(proxy, request_line("POST", path))  # as written: httpx would drop `..`
        assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found", path
    assert seen_since(fake, n) == []


def test_the_engine_gets_the_clients_bytes_not_the_decoded_path_re_encoded(proxy, fake):
    status, _, _ = raw(proxy, request_line("GET", "/v1/responses/resp%5F1?stream=%74rue&x=%20"))
    assert status == 200
    assert fake.seen[-1].target == "/v1/responses/resp%5F1?stream=%74rue&x=%20"


# --- section 2: every URL the engine could fetch is checked --------------------------------------


def _chat(*parts) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


SSRF_BODIES = {
    "part without type": _chat({"image_url": {"url": PRIVATE}}),
    "type disagrees with the key vLLM reads": _chat(
        {"type": "video_url", "image_url": {"url": PUBLIC}, "video_url": {"url": PRIVATE}}
    ),
    "uuid makes vLLM read image_url": _chat(
        {"type": "video_url", "uuid": "u", "video_url": {"url": PUBLIC}, "image_url": {"url": PRIVATE}}
    ),
    "responses input_image": {
        "model": "m",
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": PRIVATE}]}],
    },
    "responses function_call_output parts": {
        "model": "m",
        "input": [
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [{"type": "input_image", "image_url": PRIVATE}],
            }
        ],
    },
    "anthropic image block": {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": PRIVATE}}]}
        ],
    },
    "anthropic image inside tool_result": {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "image", "source": {"type": "url", "url": PRIVATE}}],
                    }
                ],
            }
        ],
    },
    "rerank documents": {
        "model": "m",
        "query": "q",
        "documents": [{"content": [{"type": "image_url", "image_url": {"url": PRIVATE}}]}],
    },
    "score data_2": {"model": "m", "data_1": "q", "data_2": {"content": [{"image_url": {"url": PRIVATE}}]}},
    "score text_1": {"model": "m", "text_1": [{"content": [{"video_url": {"url": PRIVATE}}]}], "text_2": "d"},
    "generate content_parts": {"token_ids": [1], "content_parts": [{"type": "audio_url", "url": PRIVATE}]},
    "systemone images": {"state": "s", "questions": {}, "images": [PUBLIC, PRIVATE]},
    "cohere embed images": {"model": "m", "images": [PRIVATE]},
}
SSRF_ROUTES = {
    "responses input_image": "/v1/responses",
    "responses function_call_output parts": "/v1/responses",
    "anthropic image block": "/v1/messages",
    "anthropic image inside tool_result": "/v1/messages",
    "rerank documents": "/v1/rerank",
    "score data_2": "/score",
    "score text_1": "/v1/score",
    "generate content_parts": "/inference/v1/generate",
    "systemone images": "/v1/systemone",
    "cohere embed images": "/v2/embed",
}


def _post_raw(proxy, path: str, body: bytes, ctype: str | list[str] = "application/json") -> httpx.Response:
    headers = [("authorization", "Bearer sk-user")]
    headers += [("content-type", c) for c in ([ctype] if isinstance(ctype, str) else ctype)]
    return httpx.post(proxy.url + path, content=body, headers=headers, timeout=10)


def _refused(r: httpx.Response) -> bool:
    return r.status_code == 400 and r.json()["error"]["code"] in ("media_url_refused", "invalid_json")


@pytest.mark.parametrize("name", list(SSRF_BODIES))
def test_media_urls_are_checked_wherever_vllm_reads_them(proxy, fake, name):
    n = len(fake.seen)
    r = _post_raw(proxy, SSRF_ROUTES.get(name, "/v1/chat/completions"), orjson.dumps(SSRF_BODIES[name]))
    assert _refused(r), r.text
    assert seen_since(fake, n) == []


ENCODINGS = {
    "escaped slashes": lambda body: json.dumps(body).replace("/", "\\/").encode(),
    "unicode escapes": lambda body: (
        json.dumps(body).replace("/", "\\u002f").replace("url", "\\u0075rl").encode()
    ),
    "utf-8 BOM": lambda body: b"\xef\xbb\xbf" + json.dumps(body).encode(),
    "NaN elsewhere": lambda body: json.dumps({**body, "temperature": float("nan")}).encode(),
    "Infinity elsewhere": lambda body: json.dumps({**body, "top_p": float("inf")}).encode(),
    "lone surrogate elsewhere": lambda body: json.dumps({**body, "user": "\ud800"}).encode(),
    "huge integer elsewhere": lambda body: json.dumps({**body, "seed": 2**80}).encode(),
    "utf-16": lambda body: json.dumps(body).encode("utf-16"),
    "utf-32-le": lambda body: json.dumps(body).encode("utf-32-le"),
    "duplicate key, the last wins": lambda body: b'{"messages":[],' + json.dumps(body)[1:].encode(),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_json_the_engine_would_parse_is_read_the_same_way(proxy, fake, encoding):
    body = _chat({"type": "image_url", "image_url": {"url": PRIVATE}})
    data = ENCODINGS[encoding](body)
    assert json.loads(data)["messages"] == body["messages"]  # what vLLM (json.loads) reads
    n = len(fake.seen)
    assert _refused(_post_raw(proxy, "/v1/chat/completions", data))
    assert seen_since(fake, n) == []


@pytest.mark.parametrize(
    "ctype",
    [
        "Application/JSON",
        "APPLICATION/json; charset=utf-8",
        "application/vnd.api+json",
        ["application/json", "text/plain"],  # the first header is the one the engine reads
    ],
)
def test_content_types_the_engine_parses_as_json_are_checked(proxy, fake, ctype):
    body = orjson.dumps(_chat({"type": "image_url", "image_url": {"url": PRIVATE}}))
    n = len(fake.seen)
    assert _refused(_post_raw(proxy, "/v1/chat/completions", body, ctype))
    assert seen_since(fake, n) == []


def test_accepted_json_reaches_the_engine_byte_for_byte(proxy, fake):
    """The proxy reads with json.loads' rules but never rewrites what it accepted."""
    for data in (
        json.dumps({"model": "m", "temperature": float("nan"), "user": "\ud800", "seed": 2**80}).encode(),
        b"\xef\xbb\xbf" + json.dumps(_chat({"type": "image_url", "image_url": {"url": PUBLIC}})).encode(),
        json.dumps(_chat({"type": "text", "text": PRIVATE})).encode("utf-16"),  # text is not fetched
    ):
        r = _post_raw(proxy, "/v1/chat/completions", data)
        assert r.status_code == 200, r.text
        assert fake.seen[-1].body == data


def test_a_stream_keeps_the_clients_bytes_when_the_proxy_asks_for_usage(proxy, fake):
    data = b'{"model":"m","seed":123456789012345678901234567890,"stream":true,"stream_options":null}'
    r = _post_raw(proxy, "/v1/chat/completions", data)
    assert r.status_code == 200
    sent = fake.seen[-1].body
    assert sent.startswith(data[:-1]) and json.loads(sent)["seed"] == 123456789012345678901234567890
    assert json.loads(sent)["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}


def test_json_nested_past_what_the_engine_may_parse_is_refused(proxy, fake):
    n = len(fake.seen)
    data = b'{"model":"m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = _post_raw(proxy, "/v1/chat/completions", data)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert seen_since(fake, n) == []


# --- section 4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/info", "/metrics"])
def test_two_authorization_headers_are_refused_on_every_route(proxy, fake, path):
    n = len(fake.seen)
    for pair in (("Bearer sk-user", "Bearer wrong"), ("Bearer wrong", "Bearer sk-user")):
        r = httpx.get(proxy.url + path, headers=[("authorization", v) for v in pair])
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_authorization"
    assert seen_since(fake, n) == []


def test_info_masks_the_password_of_an_engine_url(fake):
    url = fake.url.replace("http://", "http://admin:hunter2@")
    with InProcessProxy(url, ENGINE="external", ENGINE_URL=url) as p:
        info = httpx.get(p.url + "/info").json()
    assert "hunter2" not in json.dumps(info) and info["engine"]["url"].startswith("http://***@127.0.0.1")


def test_a_huge_model_value_is_neither_logged_whole_nor_a_metric_label(proxy):
    model = "m" * (512 * 1024)
    r = httpx.post(
        proxy.url + "/v1/completions", json={"model": model}, headers={**USER, "x-request-id": "big"}
    )
    assert r.status_code == 200  # the fake engine accepts any model
    line = proxy.logs.request("big")
    assert len(line["model"]) < 400 and line["model"].startswith("m" * 256)
    metrics = httpx.get(proxy.url + "/metrics", headers={"authorization": "Bearer sk-metrics"}).text
    assert "m" * 300 not in metrics


def test_the_client_gets_one_request_id_even_when_the_engine_sends_its_own(proxy):
    r = httpx.get(
        proxy.url + "/v1/models", headers={**USER, "x-fake": "engine-request-id", "x-request-id": "abc"}
    )
    assert r.headers.get_list("x-request-id") == ["abc"]


def test_the_engine_gets_the_proxys_request_id_never_a_refused_one(proxy, fake):
    r = httpx.get(proxy.url + "/v1/models", headers={**USER, "x-request-id": "bad id\twith spaces"})
    ours = r.headers["x-request-id"]
    assert ours != "bad id\twith spaces"
    assert [v for k, v in fake.seen[-1].headers.items() if k.lower() == "x-request-id"] == [ours]
    httpx.get(proxy.url + "/v1/models", headers={**USER, "x-request-id": "good-1"})
    assert fake.seen[-1].headers["X-Request-ID"] == "good-1"


# --- section 5 ----------------------------------------------------------------------------------


def test_a_stream_the_client_closes_right_after_done_is_complete(proxy, fake):
    """Fake: the response's end comes a second after `data: [DONE]` (the end arriving in a later
    read than the last event, which real vLLM does by chance); the client closes at [DONE], as the
    OpenAI SDK does."""
    before = fake.closed_early
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "stream": True},
        headers={**USER, "x-fake": "linger", "x-request-id": "done-then-close"},
        timeout=10,
    ) as r:
        seen = b""
        for chunk in r.iter_raw():
            seen += chunk
            if seen.endswith(b"data: [DONE]\n\n"):
                break
    line = proxy.logs.request("done-then-close")
    assert line["status"] == 200 and line["model"] == "m" and line["ttft_ms"] is not None
    assert line["completion_tokens"] is None or line["completion_tokens"] >= 0
    time.sleep(1.2)
    assert fake.closed_early == before  # read to its end, not cut: nothing was aborted


def test_client_hangups_leave_no_future_exception_never_retrieved(proxy, fake):
    import gc

    def hang_up(head: bytes) -> None:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(head)
            time.sleep(0.3)

    n = len(proxy.logs.records())
    for framing in (b"content-length: 100000", b"transfer-encoding: chunked"):
        hang_up(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-user\r\n"
            b"content-type: audio/wav\r\nx-fake: hang\r\n" + framing + b"\r\n\r\n" + b"5\r\nhello\r\n"
        )
    hang_up(
        request_line("POST", "/v1/chat/completions", "x-fake: hang\r\n").replace(
            b"connection: close", b"x: y"
        )
    )
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    errors = [r for r in proxy.logs.records()[n:] if "never retrieved" in str(r.get("event"))]
    assert errors == []
