"""Request bodies with media URLs in every place vLLM 0.32 reads one, and in places it does not.

Shared by the proxy's side of the parity test (tests/app/test_media_parity.py) and vLLM's side
(tests/vllm_probe.py, which replays each body through vLLM's own request models and parsers and
records every URL vLLM would fetch). `P` URLs stand for the public one a guard would let through,
`Q` for the loopback one it must see.
"""

from __future__ import annotations

from typing import Any

P = "http://public.example/p.png"
Q = "http://127.0.0.1:8001/q.png"
V = "http://127.0.0.1:8001/v.mp4"
A = "http://127.0.0.1:8001/a.wav"


def _chat(*parts: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


# name -> (route, body)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat image": ("/v1/chat/completions", _chat({"type": "image_url", "image_url": {"url": Q}})),
    "chat image, string url": ("/v1/chat/completions", _chat({"type": "image_url", "image_url": Q})),
    "chat video and audio": (
        "/v1/chat/completions",
        _chat({"type": "video_url", "video_url": {"url": V}}, {"type": "audio_url", "audio_url": {"url": A}}),
    ),
    "chat part without type": ("/v1/chat/completions", _chat({"image_url": {"url": Q}})),
    "chat type disagrees with key": (
        "/v1/chat/completions",
        _chat({"type": "video_url", "image_url": {"url": P}, "video_url": {"url": V}}),
    ),
    "chat part with uuid reads image_url first": (
        "/v1/chat/completions",
        _chat({"type": "video_url", "uuid": "u1", "image_url": {"url": Q}, "video_url": {"url": V}}),
    ),
    "chat several messages and roles": (
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "see"},
                        {"type": "image_url", "image_url": {"url": P}},
                    ],
                },
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "input_image", "image_url": Q, "detail": "auto"}]},
            ],
        },
    ),
    "chat text that is a url is not fetched": (
        "/v1/chat/completions",
        _chat({"type": "text", "text": Q}),
    ),
    "responses input image": (
        "/v1/responses",
        {
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_image", "image_url": Q, "detail": "auto"}]}
            ],
        },
    ),
    "responses input text only": ("/v1/responses", {"model": "m", "input": Q}),
    "anthropic image url": (
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 4,
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": Q}}]}
            ],
        },
    ),
    "anthropic image in tool_result": (
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 4,
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {"type": "text", "text": "shot"},
                                {"type": "image", "source": {"type": "url", "url": Q}},
                            ],
                        }
                    ],
                },
            ],
        },
    ),
    "rerank documents": (
        "/v1/rerank",
        {
            "model": "m",
            "query": "q",
            "documents": [{"content": [{"type": "image_url", "image_url": {"url": Q}}]}, "text"],
        },
    ),
    "score data_2": (
        "/score",
        {
            "model": "m",
            "data_1": "q",
            "data_2": [{"content": [{"type": "image_url", "image_url": {"url": Q}}]}],
        },
    ),
    "score text_1": (
        "/score",
        {
            "model": "m",
            "text_1": {"content": [{"type": "video_url", "video_url": {"url": V}}]},
            "text_2": "d",
        },
    ),
}
