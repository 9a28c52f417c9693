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
