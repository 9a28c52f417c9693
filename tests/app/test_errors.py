import orjson

from app.errors import error_body, error_message


def test_error_body_is_openai_shaped():
    body = orjson.loads(error_body(504, "slow", code="engine_timeout"))
    assert body == {
        "error": {"message": "slow", "type": "gateway_timeout", "param": None, "code": "engine_timeout"}
    }


def test_error_message_reads_every_shape_engines_send():
    assert error_message(b'{"error":{"message":"bad model","type":"NotFoundError"}}') == "bad model"
    assert error_message(b'{"object":"error","message":"old vllm"}') == "old vllm"
    assert error_message(b'{"detail":"Not Found"}') == "Not Found"
    assert error_message(b'{"error":"plain"}') == "plain"
    assert error_message(b"Internal Server Error") == "Internal Server Error"
    assert error_message(b"{}") is None
