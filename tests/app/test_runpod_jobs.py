"""RUNPOD_MODE=queue: the job input shapes and the SSE batching, without an engine (the handler
against the real engine is in tests/integration/test_runpod_worker.py)."""

import pytest

from app.runpod_worker import (
    JobError,
    WorkerVllmOutput,
    is_worker_vllm_job,
    parse_job,
    split_events,
    worker_vllm_request,
)


def test_both_job_shapes_give_method_route_and_body():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_job({"route": "/v1/chat/completions", "body": body}) == (
        "POST",
        "/v1/chat/completions",
        body,
    )
    assert parse_job({"openai_route": "/v1/completions", "openai_input": body}) == (
        "POST",
        "/v1/completions",
        body,
    )
    assert parse_job({"openai_route": "/v1/models"}) == ("GET", "/v1/models", None)
    assert parse_job({"route": "/v1/models", "method": "get"}) == ("GET", "/v1/models", None)


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ("hello", "must be an object"),
        ({"body": {}}, "needs a route"),
        ({"route": "v1/models"}, "needs a route"),
        ({"route": "http://evil/v1/models"}, "needs a route"),
        ({"route": "/v1/completions", "body": [1]}, "JSON object"),
        ({"route": "/v1/completions", "body": {}, "method": "PATCH"}, "unsupported method"),
    ],
)
def test_bad_job_input_is_one_clear_message(job_input, message):
    with pytest.raises(JobError, match=message):
        parse_job(job_input)


def test_events_are_cut_at_event_boundaries_only():
    assert split_events(b"data: {}\n\ndata: {") == (b"data: {}\n\n", b"data: {")
    assert split_events(b"data: {") == (b"", b"data: {")
    assert split_events(b"data: 1\r\n\r\ndata: 2\r\n\r\n") == (b"data: 1\r\n\r\ndata: 2\r\n\r\n", b"")


# --- worker-vllm's plain jobs: what RunPod's console sends as its sample input ---------------------


def test_a_worker_vllm_prompt_is_a_completion_and_messages_a_chat_for_the_served_model():
    assert is_worker_vllm_job({"prompt": "Hello World"}) and is_worker_vllm_job({"messages": []})
    assert not is_worker_vllm_job({"route": "/v1/completions", "prompt": "x"})
    assert worker_vllm_request({"prompt": "Hello World"}, "served") == (
        "POST",
        "/v1/completions",
        {"max_tokens": 16, "model": "served", "prompt": "Hello World"},
    )
    messages = [{"role": "user", "content": "hi"}]
    method, route, body = worker_vllm_request(
        {"messages": messages, "sampling_params": {"max_tokens": 5, "temperature": 0}, "stream": True}, "m"
    )
    assert (method, route) == ("POST", "/v1/chat/completions")
    assert body == {
        "max_tokens": 5,
        "temperature": 0,
        "model": "m",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, route, body = worker_vllm_request({"prompt": "hi", "apply_chat_template": True}, "m")
    assert route == "/v1/chat/completions" and body["messages"] == messages


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ({"prompt": 3}, "prompt must be a string"),
        ({"messages": "hi"}, "messages must be a list"),
        ({"prompt": "x", "sampling_params": [1]}, "sampling_params must be an object"),
    ],
)
def test_bad_worker_vllm_input_is_one_clear_message(job_input, message):
    with pytest.raises(JobError, match=message):
        worker_vllm_request(job_input, "m")


def test_answers_become_worker_vllm_s_output_items():
    whole = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
    }
    assert WorkerVllmOutput().whole(whole) == {
        "choices": [{"tokens": ["Hi there"]}],
        "usage": {"input": 7, "output": 2},
    }
    out = WorkerVllmOutput()
    events = (
        b'data: {"choices":[{"index":0,"text":"a"}]}\n\n'
        b'data: {"choices":[{"index":0,"text":"b"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    )
    assert out.events(events) == [{"choices": [{"tokens": ["a", "b"]}], "usage": {"input": 1, "output": 2}}]
    assert out.events(b"data: [DONE]\n\n") == []
    assert out.events(b'data: {"error": {"message": "engine died"}}\n\n') == [
        {"error": {"message": "engine died"}}
    ]
