from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROBE = Path(__file__).resolve().parents[1] / "vllm_probe.py"


@pytest.fixture(scope="session")
def vllm_probe() -> dict[str, Any]:
    """vLLM's own route list and media-URL parsing, from the installed vllm (tests/vllm_probe.py),
    asked once per session in a process of its own."""
    done = subprocess.run(
        [sys.executable, str(PROBE)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
