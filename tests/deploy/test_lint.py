"""hadolint on every Dockerfile, shellcheck on every shell script; each shown able to fail."""

from deploy_tools import ROOT, dockerfiles, run, shell_scripts, tool


def test_every_dockerfile_passes_hadolint():
    files = dockerfiles()
    assert {p.name for p in files} >= {"Dockerfile", "Dockerfile.trtllm"}
    result = run(tool("hadolint"), "--no-color", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_refuses_a_secret_in_an_arg_and_an_unpinned_base(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nARG HF_TOKEN\nRUN pip install requests\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0
    for rule in ("DL3006", "DL3064", "DL3013"):  # untagged FROM, secret ARG, unpinned pip
        assert rule in result.stdout, result.stdout


def test_every_shell_script_passes_shellcheck():
    files = shell_scripts()
    names = {str(p.relative_to(ROOT)) for p in files}
    assert {"build_and_push.sh", "scripts/start.sh", "scripts/install-app.sh", ".ci/run"} <= names
    result = run(tool("shellcheck"), "--external-sources", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_refuses_an_unquoted_expansion(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/data\n")
    result = run(tool("shellcheck"), str(bad))
    assert result.returncode != 0 and "SC2086" in result.stdout
