"""The proxy in front of real vLLM (CPU) serving the tiny text model, through the OpenAI SDK."""

import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from stack import wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-text"


def rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_and_its_log_line(client, text_stack):
    request_id = rid("chat")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
        extra_headers={"X-Request-ID": request_id},
    )
    assert raw.headers["x-request-id"] == request_id
    resp = raw.parse()
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens > 0
    line = text_stack.request_log(request_id)
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["status"] == 200 and line["model"] == MODEL and line["stream"] is False
    assert line["prompt_tokens"] == resp.usage.prompt_tokens
    assert line["completion_tokens"] == resp.usage.completion_tokens
    assert line["ttft_ms"] is None and line["duration_ms"] > 0 and line["tokens_per_second"] > 0
    assert line["modalities"] == {"text": 1}
    assert line["client"].startswith("127.0.0.1:") and line["error"] is None
    assert line["level"] == "info" and "timestamp" in line


def test_usage_is_logged_when_prompt_logprobs_follow_it(client, text_stack):
    """vLLM writes a chat answer's prompt_logprobs after its usage (megabytes, for a long prompt):
    the proxy finds the usage without parsing the body whole (app/proxy/response_body.py). This
    checks that layout and the counts on real vLLM; an answer over 4 MiB, which the proxy did not
    count before, is in tests/app/proxy/test_handler.py."""
    request_id = rid("prompt-logprobs")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "usage: the usage of usage " * 20}],
        max_tokens=4,
        extra_body={"prompt_logprobs": 5},
        extra_headers={"X-Request-ID": request_id},
    )
    body = raw.http_response.content
    assert body.index(b'"usage":') < body.index(b'"prompt_logprobs":[')  # the layout this is about
    usage = raw.parse().usage
    line = text_stack.request_log(request_id)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert usage.prompt_tokens > 60


def test_usage_of_an_answer_over_4_mib_is_logged(client, text_stack):
    """An answer larger than the 4 MiB the proxy used to keep for parsing (logprobs of every prompt
    position, twice, and prompt_logprobs): before, its tokens were counted nowhere."""
    request_id = rid("big-answer")
    raw = client.completions.with_raw_response.create(
        model=MODEL,
        prompt=[100 + i % 50 for i in range(3000)],  # token ids: exactly 3,000 prompt tokens
        max_tokens=2,
        echo=True,
        logprobs=20,
        n=2,
        temperature=0.8,
        extra_body={"prompt_logprobs": 20},
        extra_headers={"X-Request-ID": request_id},
        timeout=120,
    )
    assert len(raw.http_response.content) > 4 * 1024 * 1024
    usage = raw.parse().usage
    line = text_stack.request_log(request_id)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert usage.prompt_tokens == 3000


def test_completion(client, text_stack):
    request_id = rid("cmpl")
    resp = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=5, extra_headers={"X-Request-ID": request_id}
    )
    assert resp.choices[0].text is not None and resp.usage.completion_tokens == 5
    line = text_stack.request_log(request_id)
    assert line["path"] == "/v1/completions" and line["completion_tokens"] == 5


def test_stream_chunks_arrive_one_by_one_and_are_logged_with_ttft(client, text_stack):
    request_id = rid("stream")
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=300,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-ID": request_id},
    )
    arrivals, chunks = [], []
    for chunk in stream:
        arrivals.append(time.perf_counter() - start)
        chunks.append(chunk)
    total = arrivals[-1]
    assert len(chunks) > 50
    # Not buffered: the first chunks reach the client long before the stream ends.
    assert arrivals[1] < total / 3, (arrivals[:3], total)
    # The client did not ask for usage, so it gets no usage chunk, and the last chunk carries
    # the fingerprint, exactly as without the proxy.
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].system_fingerprint
    line = text_stack.request_log(request_id)
    assert line["stream"] is True and line["completion_tokens"] == 300
    assert 0 < line["ttft_ms"] < line["duration_ms"]


def test_stream_with_usage_requested_keeps_the_usage_chunk(client, text_stack):
    request_id = rid("usage")
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="hi",
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-ID": request_id},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert text_stack.request_log(request_id)["completion_tokens"] == 7


def _sse_objects(body: str) -> list[dict]:
    return [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: {")]


def _normalised(objs: list[dict]) -> list[dict]:
    for obj in objs:
        obj.pop("id", None)
        obj.pop("created", None)
    return objs


@pytest.mark.parametrize("stream", [False, True])
def test_answers_equal_what_the_engine_says_directly(text_stack, stream):
    """Same seeded request to the engine and through the proxy: same body (ids and times aside).

    Stream chunking is the engine's own timing: when it falls behind, vLLM merges the last tokens' text
    into the finishing chunk, or not. So streams are compared as the whole text, plus the finishing
    chunk's every field but its text (finish reason, fingerprint, index, logprobs)."""
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": 12,
        "temperature": 0,
        "seed": 1,
        "stream": stream,
    }
    direct = httpx.post(text_stack.engine_url + "/v1/completions", json=body, timeout=30)
    proxied = httpx.post(text_stack.url + "/v1/completions", json=body, timeout=30)
    assert proxied.status_code == direct.status_code == 200
    if not stream:
        assert _normalised([proxied.json()]) == _normalised([direct.json()])
        return
    d, p = _normalised(_sse_objects(direct.text)), _normalised(_sse_objects(proxied.text))
    assert "".join(c["choices"][0]["text"] for c in p) == "".join(c["choices"][0]["text"] for c in d)
    for chunk in (p[-1], d[-1]):
        chunk["choices"][0].pop("text")
    assert p[-1] == d[-1] and p[-1]["choices"][0]["finish_reason"] is not None
    assert direct.text.endswith("data: [DONE]\n\n") and proxied.text.endswith("data: [DONE]\n\n")


def test_unknown_model_is_the_engines_404_passed_through(client, text_stack):
    request_id = rid("unknown")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Request-ID": request_id},
        )
    assert "no-such-model" in info.value.message
    line = text_stack.request_log(request_id)
    assert line["status"] == 404 and "no-such-model" in line["error"]


def test_other_engine_routes_pass_through(text_stack):
    r = httpx.post(text_stack.url + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}, timeout=10)
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 0
    assert httpx.get(text_stack.url + "/openapi.json", timeout=10).json()["paths"]["/v1/chat/completions"]


def test_health_ping_info(text_stack):
    health = httpx.get(text_stack.url + "/health").json()
    assert health["status"] == "ready" and health["model"] == MODEL
    assert httpx.get(text_stack.url + "/ping").status_code == 200
    info = httpx.get(text_stack.url + "/info").json()
    assert info["served_model_name"] == MODEL and info["engine"]["name"] == "vllm"
    assert info["engine"]["version"]  # asked from the engine's /version
    assert "--served-model-name" in info["engine"]["command"]
    assert info["device"] == "cpu" and info["proxy_version"]


def test_metrics_carry_the_proxys_and_the_engines_families(client, text_stack):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(text_stack.url + "/metrics").text)
    }
    assert "vllm:num_requests_running" in families and "vllm:kv_cache_usage_perc" in families
    requests = families["vllm_api_requests"]
    assert any(
        s.labels["route"] == "/v1/completions" and s.labels["model"] == MODEL for s in requests.samples
    )
    assert not any(s.labels["route"] in ("/health", "/metrics") for s in requests.samples)


def _assert_engine_aborted(stack, request_id: str, generated_before: float) -> None:
    """The engine's own log says it aborted this request, and its counters agree: nothing is
    running and far fewer than the 4000 requested tokens were generated."""
    wait_for(
        lambda: any(
            "Aborted request" in str(r.get("event")) and request_id in str(r.get("event"))
            for r in stack.records()
        ),
        what=lambda: stack.tail(20),
        interval=0.1,
    )
    wait_for(lambda: stack.engine_metric("vllm:num_requests_running") == 0, interval=0.1)
    assert stack.engine_metric("vllm:generation_tokens_total") - generated_before < 2000


def test_client_hanging_up_mid_stream_aborts_the_generation_in_the_engine(text_stack):
    generated = text_stack.engine_metric("vllm:generation_tokens_total")
    request_id = rid("hangup")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST",
        text_stack.url + "/v1/completions",
        json=body,
        timeout=30,
        headers={"X-Request-ID": request_id},
    ) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    _assert_engine_aborted(text_stack, request_id, generated)
    line = text_stack.request_log(request_id)
    assert line["status"] == 499 and line["error"] == "client disconnected"


def test_client_hanging_up_before_a_non_stream_answer_aborts_it_too(text_stack):
    generated = text_stack.engine_metric("vllm:generation_tokens_total")
    request_id = rid("hangup-nonstream")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            text_stack.url + "/v1/completions",
            json=body,
            headers={"X-Request-ID": request_id},
            timeout=httpx.Timeout(30, read=1),
        )
    _assert_engine_aborted(text_stack, request_id, generated)
    assert text_stack.request_log(request_id)["status"] == 499


def test_concurrent_streams_are_all_served_and_logged_once(text_stack):
    ids = [rid("conc") for _ in range(8)]
    results = {}

    def run(request_id):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "ignore_eos": True, "stream": True}
        r = httpx.post(
            text_stack.url + "/v1/completions", json=body, timeout=60, headers={"X-Request-ID": request_id}
        )
        results[request_id] = (r.status_code, r.text.count("data: {"))

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(status == 200 and n >= 2 for status, n in results.values()), results
    for request_id in ids:
        assert text_stack.request_log(request_id)["completion_tokens"] == 20
    lines = [r for r in text_stack.records() if r.get("event") == "request" and r.get("request_id") in ids]
    assert len(lines) == len(ids)
