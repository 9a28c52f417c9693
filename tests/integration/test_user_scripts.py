"""The scripts users run themselves, against the real stack."""

import subprocess
import sys

import pytest

from stack import ROOT

pytestmark = pytest.mark.integration


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_test_api_passes_against_the_image_model(vision_stack):
    result = run("test_api.py", vision_stack.url)
    assert result.returncode == 0, [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    for check in ("health", "chat", "streaming", "stream_usage", "request_id", "image_base64", "errors"):
        assert any(line.startswith("PASS") and f" {check} " in line for line in result.stdout.splitlines()), (
            check
        )


def test_test_api_skips_images_on_a_text_model_and_fails_on_a_dead_url(text_stack):
    result = run("test_api.py", text_stack.url)
    assert result.returncode == 0, result.stdout
    assert any(line.startswith("SKIP") and "image_base64" in line for line in result.stdout.splitlines())
    dead = run("test_api.py", "http://127.0.0.1:9", "--timeout", "2")
    assert dead.returncode == 1 and "FAIL" in dead.stdout


def test_client_example_runs_text_and_streaming(vision_stack, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    for only in ("text", "stream", "image-base64"):
        result = run("client_example.py", "--base-url", vision_stack.url + "/v1", "--only", only)
        assert result.returncode == 0, result.stdout + result.stderr
    result = run(
        "client_example.py",
        "--base-url",
        vision_stack.url + "/v1",
        "--only",
        "image-file",
        "--image-file",
        str(image),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def sections(output: str) -> dict[str, str]:
    """client_example.py's output by example: `== name (model)` starts one."""
    out: dict[str, str] = {}
    name = None
    for line in output.splitlines():
        if line.startswith("== "):
            name = line.split()[1]
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


def test_client_example_reads_naturally_against_the_real_default_model(smollm2_stack):
    """`make dev`, then `python client_example.py`, as the README says: real answers, and the image
    examples skipped on a text-only model rather than failed."""
    result = run("client_example.py", "--base-url", smollm2_stack.url + "/v1")
    assert result.returncode == 0, result.stdout + result.stderr
    got = sections(result.stdout)
    assert "Paris" in got["text"] and "completion tokens]" in got["text"], got["text"]
    assert len(got["stream"].strip()) > 10, got["stream"]
    assert "Zoltan" in got["conversation"], got["conversation"]
    assert "Paris" in got["json"] and got["json"].startswith("{"), got["json"]
    assert got["image-base64"].strip() == "skipped: smollm2 takes text only", got["image-base64"]
    # The default image URL is on the internet: no DNS here, so the proxy refuses it before vLLM would.
    assert (
        got["image-url"].strip() == "skipped: smollm2 takes text only"
        or "cannot be resolved" in got["image-url"]
    )
    assert "skipped (pass --image-file PATH)" in result.stdout


def test_test_api_passes_against_the_real_default_model(smollm2_stack):
    result = run("test_api.py", smollm2_stack.url)
    assert result.returncode == 0, [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    lines = result.stdout.splitlines()
    chat = next(line for line in lines if " chat " in line)
    assert chat.startswith("PASS") and "completion tokens" in chat
    assert any(
        line.startswith("SKIP") and "image_base64" in line and "not a multimodal" in line for line in lines
    )
