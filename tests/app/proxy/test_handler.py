"""The proxy's own behaviour, in front of a fault-injecting fake engine (tests/fake_engine.py) where
the fault cannot be produced with real vLLM, or in front of a closed port. The same behaviour
against real vLLM is in tests/integration."""

import time

import httpx
import orjson
import pytest

from app.runtime import Phase, Runtime
from fake_engine import SSE_EVENT, FakeEngine
from inproc import InProcessProxy
from stack import free_port, wait_for


@pytest.fixture(scope="module")
def fake():
    with FakeEngine() as engine:
        yield engine


@pytest.fixture(scope="module")
def proxy(fake):
    with InProcessProxy(fake.url, UPSTREAM_FIRST_BYTE_TIMEOUT=1, MAX_REQUEST_BYTES=4096) as p:
        yield p


def post(proxy, body=None, headers=None, path="/v1/chat/completions", timeout=10, **kw):
    return httpx.post(
        proxy.url + path,
        json=body if body is not None else {"model": "m"},
        headers=headers or {},
        timeout=timeout,
        **kw,
    )


def test_engine_unreachable_is_a_502_with_an_openai_error_and_a_log_line():
    with InProcessProxy(f"http://127.0.0.1:{free_port()}") as p:
        r = post(p, headers={"x-request-id": "conn-refused-1"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "engine_unreachable"
    line = p.logs.request("conn-refused-1")
    assert line["status"] == 502 and "cannot connect" in line["error"]


def test_hung_engine_gives_504_and_does_not_block_other_requests(proxy):
    """Fake: real vLLM cannot be made to hang on demand."""
    import threading

    result = {}

    def hang():
        result["r"] = post(proxy, headers={"x-fake": "hang", "x-request-id": "hang-1"})

    t = threading.Thread(target=hang)
    t.start()
    time.sleep(0.1)
    assert post(proxy).status_code == 200
    assert "r" not in result  # served while the other one still hangs (ordering, not a clock)
    t.join(5)
    assert result["r"].status_code == 504
    assert result["r"].json()["error"]["type"] == "gateway_timeout"
    assert proxy.logs.request("hang-1")["status"] == 504


def read_until_cut(r) -> bytes:
    """The body of a response whose connection ends before the body does (httpx raises)."""
    body = b""
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        for chunk in r.iter_bytes():
            body += chunk
    return body


def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event(proxy):
    """Fake: the engine's socket is reset after three events (a crash real vLLM won't do on cue).
    The error event, then the connection ends without the stream's end."""
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "stream": True},
        headers={"x-fake": "crash-mid-stream", "x-request-id": "crash-1"},
        timeout=10,
    ) as r:
        assert r.status_code == 200
        body = read_until_cut(r)
    events = [e for e in body.split(b"\n\n") if e]
    assert events[:3] == [SSE_EVENT.rstrip(b"\n")] * 3
    last = orjson.loads(events[-1][len(b"data: ") :])
    assert "mid-stream" in last["error"]["message"]
    line = proxy.logs.request("crash-1")
    assert line["stream"] is True and line["error"].startswith("stream broken")


def test_headers_pass_through_less_hop_by_hop_ones(proxy, fake):
    r = post(
        proxy,
        headers={
            "x-custom": "yes",
            "connection": "keep-alive, x-secret",
            "x-secret": "hop",
            "te": "trailers",
        },
    )
    assert r.headers["x-engine-header"] == "kept"
    assert "x-hop" not in r.headers and "keep-alive" not in r.headers
    seen = fake.seen[-1]
    assert seen.headers["x-custom"] == "yes"
    assert "x-secret" not in seen.headers and "te" not in {k.lower() for k in seen.headers}


def test_streams_get_usage_requested_and_content_length_matches_the_new_body(proxy, fake):
    post(proxy, {"model": "m", "stream": True, "messages": []}, headers={"x-fake": "stream"})
    seen = fake.seen[-1]
    assert orjson.loads(seen.body)["stream_options"]["include_usage"] is True
    assert int(seen.headers["Content-Length"]) == len(seen.body)


def test_non_stream_usage_is_logged(proxy):
    post(
        proxy,
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": "usage-1"},
    )
    line = proxy.logs.request("usage-1")
    assert (line["prompt_tokens"], line["completion_tokens"], line["modalities"]) == (3, 4, {"text": 1})
    assert line["tokens_per_second"] > 0


def test_usage_of_an_answer_larger_than_4_mib_is_logged(proxy):
    """Fake: a 5 MiB answer with its usage before prompt_logprobs, as vLLM's chat writes them (the
    layout from real vLLM is in tests/integration/test_text.py). Before, the proxy kept at most
    4 MiB of an answer to parse it whole: this one's tokens were never counted."""
    r = post(proxy, headers={"x-fake": "large", "x-request-id": "large-1"})
    assert r.status_code == 200 and len(r.content) > 4 * 1024 * 1024
    assert r.json()["usage"]["prompt_tokens"] == 4000
    line = proxy.logs.request("large-1")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (4000, 2)


def test_engine_errors_pass_through_unchanged_and_are_logged(proxy):
    r = post(proxy, headers={"x-fake": "status", "x-request-id": "err-1"})
    assert r.status_code == 400 and r.json() == {"error": {"message": "nope", "type": "BadRequestError"}}
    assert proxy.logs.request("err-1")["error"] == "nope"


def test_bodies_over_the_limit_get_413_whether_announced_or_streamed(proxy, fake):
    big = {"model": "m", "prompt": "x" * 5000}
    r = post(proxy, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        yield b"x" * 3000
        yield b"x" * 3000

    n = len(fake.seen)
    r = httpx.post(
        proxy.url + "/v1/audio/transcriptions",
        content=chunks(),
        headers={"content-type": "audio/wav"},
        timeout=10,
    )
    assert r.status_code == 413
    assert all(s.path != "/v1/audio/transcriptions" or len(s.body) < 6000 for s in fake.seen[n:])


def test_small_streamed_bodies_are_passed_through(proxy, fake):
    r = httpx.post(
        proxy.url + "/v1/audio/transcriptions",
        content=iter([b"a" * 100, b"b" * 100]),
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=10,
    )
    assert r.status_code == 200
    assert fake.seen[-1].body == b"a" * 100 + b"b" * 100


def test_request_id_is_echoed_when_sane_and_replaced_when_not(proxy):
    assert post(proxy, headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    r = post(proxy, headers={"x-request-id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 32


@pytest.fixture(scope="module")
def plain(fake):
    with InProcessProxy(fake.url, plain_uvicorn=True) as p:
        yield p


@pytest.mark.parametrize("server", ["proxy", "plain"])
def test_client_hanging_up_mid_stream_closes_the_upstream_stream(server, fake, request):
    """`proxy`: the server's protocol calls the hang-up hook; `plain`: uvicorn's own protocol, where
    the handler watches `receive` instead."""
    proxy = request.getfixturevalue(server)
    before = fake.closed_early
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "stream": True},
        headers={"x-fake": "endless", "x-request-id": f"hangup-{server}"},
        timeout=10,
    ) as r:
        for _ in r.iter_bytes():
            break
    wait_for(lambda: fake.closed_early != before, 5, "the engine's connection closed early")
    assert fake.closed_early == before + 1
    assert proxy.logs.request(f"hangup-{server}")["status"] == 499


@pytest.fixture(scope="module")
def keyed(fake):
    with InProcessProxy(fake.url, API_KEY="sk-test") as p:
        yield p


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic sk-test", "sk-test"])
def test_api_key_is_required_on_v1_routes(keyed, auth):
    r = post(keyed, headers={"authorization": auth} if auth else {})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_right_key_passes_and_is_not_forwarded_and_probes_stay_open(keyed, fake):
    assert post(keyed, headers={"authorization": "Bearer sk-test"}).status_code == 200
    assert "Authorization" not in fake.seen[-1].headers
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/ping").status_code == 200
    assert all("sk-test" not in str(rec) for rec in keyed.logs.records())


def test_while_starting_requests_get_503_with_retry_after_and_ping_204(fake):
    runtime = Runtime()
    runtime.detail = "downloading model"
    with InProcessProxy(fake.url, runtime=runtime) as p:
        r = post(p)
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        assert "downloading model" in r.json()["error"]["message"]
        assert httpx.get(p.url + "/ping").status_code == 204
        health = httpx.get(p.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        runtime.set_phase(Phase.READY)
        assert post(p).status_code == 200
        assert httpx.get(p.url + "/ping").status_code == 200
        runtime.set_phase(Phase.STOPPED, "engine exited with code -9")
        assert post(p).status_code == 503
        health = httpx.get(p.url + "/health")
        assert health.status_code == 503 and health.json()["detail"] == "engine exited with code -9"
        assert httpx.get(p.url + "/ping").status_code == 503


def test_metrics_merge_the_engines_families_without_clashes(proxy):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(proxy.url + "/metrics").text
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert "vllm:num_requests_running" in names and "vllm_api_requests" in names
    assert text.count("# TYPE process_cpu_seconds_total") == 1


@pytest.fixture(scope="module")
def patient(fake):
    with InProcessProxy(
        fake.url, SSE_KEEPALIVE_INTERVAL=0.5, UPSTREAM_IDLE_TIMEOUT=1.5, CLIENT_TIMEOUT=1
    ) as p:
        yield p


def test_a_silent_stream_gets_keepalive_blank_lines_until_the_first_event(patient):
    """Fake: a long prefill (2.5 s of silence after the headers) on cue."""
    with httpx.stream(
        "POST",
        patient.url + "/v1/chat/completions",
        json={"model": "m", "stream": True},
        headers={"x-fake": "slow-prefill", "x-fake-delay": "1.2"},
        timeout=10,
    ) as r:
        body = b"".join(r.iter_bytes())
    pings, _, events = body.partition(b"data:")
    assert pings and pings == b"\n\n" * (len(pings) // 2)  # blank lines: no event to any SSE client
    assert events.endswith(b"data: [DONE]\n\n") and b"\n\n\n" not in events  # none once events flow


def test_a_stream_silent_past_the_idle_timeout_ends_with_an_error_event(patient):
    """Fake: the engine stops mid-stream without closing (a hang real vLLM won't do on cue)."""
    started = time.monotonic()
    with httpx.stream(
        "POST",
        patient.url + "/v1/chat/completions",
        json={"model": "m", "stream": True},
        headers={"x-fake": "stall-mid-stream", "x-request-id": "stall-1"},
        timeout=10,
    ) as r:
        lines = [line for line in read_until_cut(r).decode().split("\n") if line and not line.startswith(":")]
    assert 1.4 < time.monotonic() - started < 5
    assert "did not answer in time" in orjson.loads(lines[-1][6:])["error"]["message"]
    assert patient.logs.request("stall-1")["error"].startswith("stream broken")


def test_a_client_slow_to_send_its_headers_gets_408_and_is_cut(patient):
    import socket

    with socket.create_connection(("127.0.0.1", patient.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # ...and nothing more
        sock.settimeout(5)
        started = time.monotonic()
        data = sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 408") and 0.8 < time.monotonic() - started < 3
        assert sock.recv(4096) == b""  # closed


def test_a_connection_that_sends_nothing_is_closed(patient):
    import socket

    with socket.create_connection(("127.0.0.1", patient.port)) as sock:
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


def test_a_client_stalling_mid_body_is_disconnected_and_logged(patient, fake):
    import socket

    n = len(fake.seen)
    with socket.create_connection(("127.0.0.1", patient.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-request-id: stall-body\r\n"
            b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"model":'
        )
        sock.settimeout(5)
        assert sock.recv(4096) == b""
    assert patient.logs.request("stall-body")["status"] == 499
    assert len(fake.seen) == n  # nothing reached the engine


@pytest.fixture(scope="module")
def guarded(fake, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# rotated monthly\nsk-from-file\n")
    with InProcessProxy(
        fake.url,
        API_KEY="sk-one,sk-two",
        API_KEY_FILE=str(keys),
        ADMIN_API_KEY="sk-admin",
        LOG_PROMPTS=True,
        CORS_ALLOW_ORIGINS="https://app.example.com",
    ) as p:
        yield p


@pytest.mark.parametrize("key", ["sk-one", "sk-two", "sk-from-file"])
def test_every_configured_key_works(guarded, key):
    assert post(guarded, headers={"authorization": f"Bearer {key}"}).status_code == 200


def test_info_needs_a_key_and_probes_do_not(guarded):
    assert httpx.get(guarded.url + "/info").status_code == 401
    assert httpx.get(guarded.url + "/info", headers={"authorization": "Bearer sk-two"}).status_code == 200
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_every_engine_route_needs_a_key_not_only_v1(guarded):
    r = httpx.post(guarded.url + "/tokenize", json={"prompt": "x"})
    assert r.status_code == 401


@pytest.mark.parametrize(
    "path", ["/adapters", "/invocations", "/scale_elastic_ep", "/collective_rpc"]
)  # LoRA's /v1/load_lora_adapter is checked by the proxy first: tests/app/lora/test_service.py
def test_admin_routes_need_the_admin_key(guarded, fake, path):
    n = len(fake.seen)
    r = httpx.post(guarded.url + path, json={}, headers={"authorization": "Bearer sk-one"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_route"
    assert len(fake.seen) == n
    r = httpx.post(guarded.url + path, json={}, headers={"authorization": "Bearer sk-admin"})
    assert r.status_code == 200 and fake.seen[-1].path == path
    assert "Authorization" not in fake.seen[-1].headers


def test_admin_routes_are_refused_outright_without_an_admin_key(proxy):
    r = httpx.post(proxy.url + "/v1/unload_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 403 and "ADMIN_API_KEY is not set" in r.json()["error"]["message"]


def test_cors_is_the_proxys_the_engines_headers_never_pass(proxy, guarded):
    r = post(proxy, headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers  # the fake engine sent `*`: dropped
    ok = httpx.options(
        guarded.url + "/v1/chat/completions",
        headers={
            "origin": "https://app.example.com",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        },
    )
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
    bad = httpx.options(
        guarded.url + "/v1/chat/completions",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in bad.headers
    r = post(guarded, headers={"authorization": "Bearer sk-one", "origin": "https://app.example.com"})
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"


def test_prompts_are_logged_only_with_log_prompts_and_inline_media_never(proxy, guarded):
    image = "data:image/png;base64," + "A" * 5000
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    }
    post(guarded, body, headers={"authorization": "Bearer sk-one", "x-request-id": "prompt-on"})
    post(proxy, body, headers={"x-request-id": "prompt-off"})
    logged = guarded.logs.request("prompt-on")["prompt"]["messages"][0]["content"]
    assert logged[0]["text"] == "describe"
    assert logged[1]["image_url"]["url"] == "<image/png, 5000 bytes inline>"
    assert "prompt" not in proxy.logs.request("prompt-off")
    assert "AAAAAAAA" not in str(guarded.logs.records())
    assert "sk-one" not in str(guarded.logs.records()) and "sk-admin" not in str(guarded.logs.records())


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:8001/metrics",
        "http://x\\@127.0.0.1/a.png",
        "http://u:p@example.com/a.png",
        "file:///etc/passwd",
    ],
)
def test_media_urls_to_private_hosts_or_with_tricks_never_reach_the_engine(proxy, fake, url):
    n = len(fake.seen)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }
    r = post(proxy, body, headers={"x-request-id": "ssrf"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "media_url_refused"
    assert r.json()["error"]["param"] == "messages"
    assert len(fake.seen) == n
    assert "169.254" not in r.json()["error"]["message"] or "169.254.169.254" in url  # no resolved IPs leaked


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-bad: a\x01b\r\ncontent-length: 2\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nHo st: x\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ],
)
def test_unparsable_requests_get_an_openai_shaped_400(proxy, raw):
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(raw)
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert orjson.loads(body)["error"]["code"] == "invalid_http"


def test_client_hanging_up_before_the_answer_starts_drops_the_upstream_request(fake):
    """Fake: an engine that takes forever to answer (vLLM's non-streamed generation, on cue)."""
    with InProcessProxy(fake.url) as p:
        before = fake.closed_early
        with pytest.raises(httpx.ReadTimeout):
            post(
                p,
                headers={"x-fake": "hang", "x-request-id": "early-hangup"},
                timeout=httpx.Timeout(5, read=0.5),
            )
        wait_for(lambda: fake.closed_early != before, 5, "the engine's connection closed early")
        assert fake.closed_early == before + 1
        assert p.logs.request("early-hangup")["status"] == 499
