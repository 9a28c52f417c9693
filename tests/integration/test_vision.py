"""Images through the proxy to real vLLM (CPU) serving the tiny Idefics3 model."""

import base64
import io
import uuid

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

pytestmark = pytest.mark.integration

MODEL = "tiny-vision"


@pytest.fixture
def vclient(vision_stack) -> OpenAI:
    return OpenAI(base_url=vision_stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def png_data_url(size: int = 64, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def rid() -> str:
    return f"img-{uuid.uuid4().hex[:8]}"


def test_base64_image_is_answered_and_logged_with_its_modalities(vclient, vision_stack):
    request_id = rid()
    resp = vclient.chat.completions.create(
        model=MODEL,
        messages=image_message(png_data_url()),
        max_tokens=6,
        extra_headers={"X-Request-ID": request_id},
    )
    assert resp.choices[0].message.content is not None and resp.usage.completion_tokens > 0
    line = vision_stack.request_log(request_id)
    assert line["status"] == 200 and line["modalities"] == {"text": 1, "image": 1}
    assert line["prompt_tokens"] == resp.usage.prompt_tokens


def test_image_request_streams(vclient, vision_stack):
    request_id = rid()
    chunks = list(
        vclient.chat.completions.create(
            model=MODEL,
            messages=image_message(png_data_url(), png_data_url(color=(0, 0, 255))),
            max_tokens=8,
            stream=True,
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-ID": request_id},
        )
    )
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
    line = vision_stack.request_log(request_id)
    assert line["stream"] is True and line["modalities"] == {"text": 1, "image": 2}
    assert line["completion_tokens"] == 8 and line["ttft_ms"] is not None


def test_text_only_request_to_the_image_model(vclient):
    resp = vclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert resp.usage.completion_tokens > 0


def test_more_images_than_the_limit_is_the_engines_400(vclient, vision_stack):
    request_id = rid()
    with pytest.raises(openai.BadRequestError) as info:
        vclient.chat.completions.create(
            model=MODEL,
            messages=image_message(*[png_data_url()] * 3),
            max_tokens=4,
            extra_headers={"X-Request-ID": request_id},
        )
    assert "At most 2 image" in info.value.message
    line = vision_stack.request_log(request_id)
    assert line["status"] == 400 and "At most 2 image" in line["error"]


def test_malformed_base64_is_a_400(vclient):
    with pytest.raises(openai.BadRequestError):
        vclient.chat.completions.create(
            model=MODEL, messages=image_message("data:image/png;base64,!!!notbase64"), max_tokens=4
        )


def test_a_multi_megabyte_image_passes_the_default_body_limit(vclient):
    big = Image.frombytes("RGB", (1400, 1400), bytes(range(256)) * (1400 * 1400 * 3 // 256 + 1))
    buf = io.BytesIO()
    big.save(buf, format="PNG", compress_level=0)
    assert len(buf.getvalue()) > 4_000_000
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    resp = vclient.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=2)
    assert resp.usage.completion_tokens > 0


def test_after_the_engine_answers_500_the_next_request_is_served(vision_stack):
    """vLLM's server drops the connection after a 500: the proxy must not reuse it."""
    body = {"model": MODEL, "messages": image_message("http://127.0.0.1:9/nothing.png"), "max_tokens": 2}
    with httpx.Client(base_url=vision_stack.url, timeout=30) as http:
        failed = http.post("/v1/chat/completions", json=body)
        assert failed.status_code == 500 and "error" in failed.json()
        for _ in range(3):
            ok = http.post(
                "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]}
            )
            assert ok.status_code == 200, ok.text


def test_media_urls_to_internal_addresses_are_refused_before_vllm_fetches_them(vision_stack):
    """A proxy with default settings in front of the real engine: vLLM itself would fetch these."""
    from inproc import InProcessProxy

    urls = [
        f"http://127.0.0.1:{vision_stack.engine_port}/metrics",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://localhost\\@example.com/cat.png",
    ]
    with InProcessProxy(vision_stack.engine_url, MODEL_NAME=MODEL) as proxy:
        for url in urls:
            body = {"model": MODEL, "messages": image_message(url), "max_tokens": 2}
            r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"]["code"] == "media_url_refused"
        ok = httpx.post(
            proxy.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": image_message(png_data_url()), "max_tokens": 2},
            timeout=30,
        )
        assert ok.status_code == 200
