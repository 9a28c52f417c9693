"""./build_and_push.sh: the commands it prints (and would run), and its refusals; no Docker here."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_tools import ROOT, run

SCRIPT = str(ROOT / "build_and_push.sh")


def plan(*args: str, **env: str) -> list[str]:
    result = run(SCRIPT, *args, "--dry-run", env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.splitlines()[1:]]


def test_every_variant_is_built_and_pushed_with_buildx():
    assert plan("alice", "1.2.0") == [
        "docker buildx build --push -f Dockerfile --target vllm -t alice/vllm-inference-api:1.2.0 .",
        "docker buildx build --push -f Dockerfile --target runpod -t alice/vllm-inference-api:1.2.0-runpod .",
        "docker buildx build --push -f Dockerfile.trtllm --target trtllm -t alice/vllm-inference-api:1.2.0-trtllm .",
        "docker buildx build --push -f Dockerfile.trtllm --target runpod "
        "-t alice/vllm-inference-api:1.2.0-trtllm-runpod .",
    ]


def test_platform_no_push_versions_and_cpu_are_passed_through():
    lines = plan(
        "alice",
        "1.2.0",
        "--platform",
        "linux/amd64",
        "--no-push",
        "--cpu",
        VLLM_VERSION="v0.33.0",
        VLLM_CUDA_VARIANT="-cu129",
        TRTLLM_VERSION="1.3.0",
    )
    vllm_args = "--build-arg VLLM_VERSION=v0.33.0 --build-arg VLLM_CUDA_VARIANT=-cu129"
    assert lines[0] == (
        f"docker buildx build --platform linux/amd64 --load {vllm_args} "
        "-f Dockerfile --target vllm -t alice/vllm-inference-api:1.2.0 ."
    )
    assert vllm_args in lines[1] and lines[1].endswith(
        "--target runpod -t alice/vllm-inference-api:1.2.0-runpod ."
    )
    assert "--build-arg TRTLLM_VERSION=1.3.0" in lines[2] and lines[2].endswith(":1.2.0-trtllm .")
    assert "--build-arg TRTLLM_VERSION=1.3.0" in lines[3] and lines[3].endswith(":1.2.0-trtllm-runpod .")
    assert lines[4].endswith("--target cpu -t alice/vllm-inference-api:1.2.0-cpu .")


def test_bad_arguments_are_refused_before_anything_runs():
    assert run(SCRIPT).returncode == 2
    assert run(SCRIPT, "alice", "1.0", "--bogus").returncode == 2
    bad_tag = run(SCRIPT, "alice", "no spaces")
    assert bad_tag.returncode == 1 and "not a valid image tag" in bad_tag.stderr
    multi = run(SCRIPT, "alice", "1.0", "--no-push", "--platform", "linux/amd64,linux/arm64")
    assert multi.returncode == 1 and "one platform" in multi.stderr


def test_without_docker_it_says_what_it_would_do_then_fails_clearly(tmp_path):
    # A PATH with bash and coreutils but no docker.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "env"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    result = run("bash", SCRIPT, "alice", "1.0", env={"PATH": str(bin_dir)})
    assert result.returncode == 1
    assert "docker buildx build" in result.stdout  # the plan comes first
    assert "docker is not installed" in result.stderr


# --- bash 3.2 (macOS's /bin/bash), the oldest bash the script promises ---------------------------
# No bash older than 4.4 can be had here (Debian ships 5.2, and no compat level restores the old
# rule), so the one rule of bash < 4.4 that bites under `set -u` is made explicit: there, "${a[@]}"
# and "${a[*]}" of an empty array stop the script with "unbound variable". Bash 5 applies exactly that
# to `${a[@]?...}`, so every plain array expansion of a copy of the script is rewritten to it; lengths
# (`${#a[@]}`) and the guarded form `${a[@]+"${a[@]}"}` keep their meaning.
ARRAY_EXPANSION = re.compile(r"\$\{(\w+)\[([@*])\]\}")


def under_bash32_rules(text: str) -> str:
    return ARRAY_EXPANSION.sub(r"${\1[\2]?unbound variable}", text)


def test_the_rewrite_reproduces_bash_3_2_s_empty_array_rule(tmp_path):
    script = tmp_path / "t.sh"
    script.write_text(
        under_bash32_rules(
            'set -u\na=()\necho "n=${#a[@]}" ${a[@]+"${a[@]}"}\nb=(x)\necho "${b[@]}"\necho "${a[@]}"\n'
        )
    )
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert result.returncode != 0 and "a[@]: unbound variable" in result.stderr
    assert result.stdout.splitlines() == ["n=0", "x"]


@pytest.mark.parametrize("env", [{}, {"VLLM_VERSION": "v0.33.0"}], ids=["defaults", "vllm-version"])
def test_the_script_runs_under_bash_3_2_s_rules(tmp_path, env):
    copy = tmp_path / "build_and_push.sh"
    copy.write_text(under_bash32_rules(Path(SCRIPT).read_text()))
    result = subprocess.run(
        ["bash", str(copy), "alice", "1.2.0", "--dry-run"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [f"  {line}" for line in plan("alice", "1.2.0", **env)]
