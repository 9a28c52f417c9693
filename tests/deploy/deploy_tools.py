"""The deployment files' checks: each runs the real tool (hadolint, shellcheck, check-jsonschema,
installed by requirements-dev.txt next to the test interpreter) as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{name} is not installed next to {sys.executable}: run `make venv` (requirements-dev.txt)"
        )
    return str(path)


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def dockerfiles() -> list[Path]:
    return sorted(p for p in ROOT.glob("Dockerfile*") if p.is_file())


def shell_scripts() -> list[Path]:
    """Every script of the repo run by bash or sh: *.sh anywhere, and extensionless files with a shell
    shebang (.ci/run)."""
    skip = {".venv", ".git", ".cache", "node_modules"}
    out = []
    for path in ROOT.rglob("*"):
        if not path.is_file() or skip & set(path.relative_to(ROOT).parts):
            continue
        if (
            path.suffix == ".sh"
            or path.suffix == ""
            and path.read_bytes()[:32].startswith((b"#!/usr/bin/env bash", b"#!/bin/bash", b"#!/bin/sh"))
        ):
            out.append(path)
    return sorted(out)
