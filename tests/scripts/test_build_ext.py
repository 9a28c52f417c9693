"""scripts/build_ext.py: a failed build fails `make` and only warns in the images, and never leaves
a partial file where the proxy imports it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_ext.py"


@pytest.mark.parametrize(("flags", "code"), [([], 1), (["--optional"], 0)])
def test_a_failed_build_fails_unless_optional_and_leaves_the_built_module_as_it_was(flags, code):
    built = sorted((ROOT / "app" / "proxy").glob("_passthrough*"))
    before = {p: p.stat().st_mtime_ns for p in built}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags],
        env={**os.environ, "CC": "false"},  # a compiler that always fails
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    assert "not built" in proc.stderr and "Python stand-in" in proc.stderr
    after = sorted((ROOT / "app" / "proxy").glob("_passthrough*"))
    assert after == built and {p: p.stat().st_mtime_ns for p in after} == before
    assert not list((ROOT / "app" / "proxy").glob("*.tmp"))
