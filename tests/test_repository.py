"""Checks on the repository itself."""

import subprocess

from stack import ROOT


def test_no_merge_conflict_markers_are_committed():
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "=======":
                found.append(f"{name}:{number}")
    assert not found, found


def test_python_sources_pass_ruff_check_and_format():
    """What `make lint` checks, so a change that breaks it fails the test command too."""
    import sys

    paths = ["app", "scripts", "tests", "bench", "test_api.py", "client_example.py"]
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, *paths], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
