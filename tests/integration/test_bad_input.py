"""Bad input through the proxy to real vLLM (CPU): every case gets a clear OpenAI-shaped error with
the right status, the log line says what happened, and the stack stays healthy."""

import base64
import socket
import uuid

import httpx
import pytest

from inproc import InProcessProxy

pytestmark = pytest.mark.integration

MODEL = "tiny-vision"
TEXT = [{"role": "user", "content": "hi"}]


def _image(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def _png() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CASES = {
    # name: (content-type, body, status, fragment of the error message)
    "malformed JSON": (
        "application/json",
        b'{"model": "tiny-vision", "messages": [',
        400,
        "JSON decode error",
    ),
    "wrong content type": (
        "text/plain",
        b'{"model":"tiny-vision","messages":[]}',
        400,
        "Unsupported Media Type",
    ),
    "empty body": ("application/json", b"", 400, "Field required"),
    "unknown model": ("application/json", {"model": "gpt-9", "messages": TEXT}, 404, "does not exist"),
    "huge max_tokens": (
        "application/json",
        {"model": MODEL, "messages": TEXT, "max_tokens": 10**9},
        400,
        "max_tokens",
    ),
    "malformed base64 image": (
        "application/json",
        {"model": MODEL, "messages": _image("data:image/png;base64,!!!")},
        400,
        "base64",
    ),
    "base64 that is not an image": (
        "application/json",
        {
            "model": MODEL,
            "messages": _image("data:image/png;base64," + base64.b64encode(b"hello world").decode()),
        },
        400,
        "cannot identify image",
    ),
    "more images than IMAGE_LIMIT": (
        "application/json",
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}}] * 3}
            ],
        },
        400,
        "At most 2 image",
    ),
    "a media URL that is not a URL": (
        "application/json",
        {"model": MODEL, "messages": _image("http://exa mple.com/x.png")},
        400,
        "space or control character",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_openai_error_and_a_log_line(vision_stack, name):
    ctype, body, status, fragment = CASES[name]
    request_id = f"bad-{uuid.uuid4().hex[:8]}"
    headers = {"content-type": ctype, "x-request-id": request_id}
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    r = httpx.post(vision_stack.url + "/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment.lower() in error["message"].lower(), error
    line = vision_stack.request_log(request_id)
    assert line["status"] == status and fragment.lower() in (line["error"] or "").lower()
    assert httpx.get(vision_stack.url + "/health").json()["status"] == "ready"


def test_a_body_over_max_request_bytes_is_refused_before_it_is_sent(vision_stack):
    with socket.create_connection(("127.0.0.1", vision_stack.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"x-request-id: too-big\r\ncontent-length: 70000000\r\n\r\n{"
        )
        sock.settimeout(10)
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 413") and b"MAX_REQUEST_BYTES" in data
    assert vision_stack.request_log("too-big")["error"] == "request body too large"


def test_an_unresolvable_media_host_is_a_400_not_an_engine_500(vision_stack):
    """Default settings (the session's stack allows private media URLs for another test)."""
    with InProcessProxy(vision_stack.engine_url, MODEL_NAME=MODEL) as proxy:
        body = {"model": MODEL, "messages": _image("https://no-such-host.invalid/cat.png"), "max_tokens": 2}
        r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and "cannot be resolved" in r.json()["error"]["message"]
