"""Engines the proxy can front. Each knows how to be started and how to be asked how it is."""

from __future__ import annotations

from app.engines.base import Engine
from app.engines.trtllm import TRTLLM
from app.engines.vllm import VLLM

# An OpenAI-compatible server started by someone else (vLLM, SGLang, TensorRT-LLM...): the proxy
# only waits for its /health and fronts it.
EXTERNAL = Engine(name="external", build_command=None)

ENGINES: dict[str, Engine] = {"vllm": VLLM, "trtllm": TRTLLM, "external": EXTERNAL}


def engine_for(settings) -> Engine:
    return ENGINES[settings.ENGINE]


__all__ = ["ENGINES", "Engine", "engine_for"]
