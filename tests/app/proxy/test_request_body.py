import orjson

from app.proxy.request_body import count_modalities, inspect_json


def test_stream_without_usage_gets_usage_requested_and_marked_for_stripping():
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    info = inspect_json(body, "/v1/chat/completions")
    assert info.strip_usage
    sent = orjson.loads(info.body)
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert (info.model, info.stream, info.modalities) == ("m", True, {"text": 1})


def test_client_that_asked_for_usage_is_left_alone_byte_for_byte():
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"prompt":"x"}'
    info = inspect_json(body, "/v1/completions")
    assert not info.strip_usage
    assert info.body is body


def test_other_stream_options_survive_injection():
    body = orjson.dumps({"stream": True, "stream_options": {"include_usage": False, "x": 1}, "prompt": "p"})
    info = inspect_json(body, "/v1/completions")
    assert orjson.loads(info.body)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": False,
        "x": 1,
    }


def test_non_streams_and_other_routes_are_not_touched():
    for body, path in [
        (b'{"model":"m","messages":[]}', "/v1/chat/completions"),
        (b'{"model":"m","stream":true,"input":"hi"}', "/v1/responses"),
    ]:
        info = inspect_json(body, path)
        assert info.body is body and not info.strip_usage


def test_bodies_that_are_not_json_objects_pass_untouched():
    for body in (b"{not json", b"[1,2]", b'"s"', b""):
        info = inspect_json(body, "/v1/chat/completions")
        assert info.body is body
        assert info.model is None


def test_modalities_are_counted_per_part():
    obj = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                    {"type": "image_url", "image_url": {"url": "http://x"}},
                    {"type": "video_url", "video_url": {"url": "http://v"}},
                    {"type": "input_audio", "input_audio": {"data": "..", "format": "wav"}},
                ],
            },
        ]
    }
    assert count_modalities(obj) == {"text": 2, "image": 2, "video": 1, "audio": 1}


def test_prompts_and_responses_input_are_counted():
    assert count_modalities({"prompt": "x"}) == {"text": 1}
    assert count_modalities({"prompt": ["a", "b", "c"]}) == {"text": 3}
    assert count_modalities({"prompt": [1, 2, 3]}) == {"text": 1}  # token ids
    assert count_modalities(
        {"input": [{"role": "user", "content": [{"type": "input_text"}, {"type": "input_image"}]}]}
    ) == {"text": 1, "image": 1}
