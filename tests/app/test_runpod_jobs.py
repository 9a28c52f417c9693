"""RUNPOD_MODE=queue: the job input shapes and the SSE batching, without an engine (the handler
against the real engine is in tests/integration/test_runpod_worker.py)."""

import pytest

from app.runpod_worker import JobError, parse_job, split_events


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
