"""`make test` on a fresh machine: scripts/system_deps.py installs (as root, with apt-get) or names
in one line what the tests need from the system, before anything else runs; .ci/run is exactly
`make test`. The apt-get install itself is not run here (it would change this machine): a PATH
without the tools stands in for a machine that lacks them, with --check."""

import os
import re
import subprocess
import sys

from deploy_tools import ROOT

from scripts.system_deps import NEEDED

SCRIPT = str(ROOT / "scripts" / "system_deps.py")


def _path_with(tmp_path, tools: list[str]) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        stub = bin_dir / tool
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return str(bin_dir)


def _check(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, "--check"],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_machine_without_chromium_is_told_in_one_line_what_to_install(tmp_path):
    result = _check(_path_with(tmp_path, ["prometheus", "promtool"]))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "chromium" in lines[0] and "apt-get install -y chromium" in lines[0]
    assert "prometheus" not in lines[0].split("needs", 1)[1].split("(", 1)[0]


def test_a_machine_with_every_tool_passes(tmp_path):
    tools = [tool for group in NEEDED.values() for tool in group]
    assert {"chromium", "prometheus", "promtool"} <= set(tools)
    assert _check(_path_with(tmp_path, tools)).returncode == 0


def _recipe(makefile: str, target: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of a Makefile target."""
    m = re.search(rf"^{target}:([^\n]*)\n((?:\t[^\n]*\n)*)", makefile, re.M)
    assert m, target
    return m.group(1).split(), [line.strip() for line in m.group(2).splitlines()]


def test_make_test_checks_the_system_first_and_ci_runs_exactly_make_test():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test", "unit", "integration"):
        prerequisites, _ = _recipe(makefile, target)
        assert prerequisites[0] == "prereqs", target  # before the venv's minutes of installing
    _, recipe = _recipe(makefile, "prereqs")
    assert recipe == ["$(PYTHON) scripts/system_deps.py"]
    commands = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert commands == ["exec make test"]
    assert "make test" in (ROOT / "README.md").read_text()
