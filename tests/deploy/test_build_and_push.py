"""./build_and_push.sh: the commands it prints (and would run), and its refusals; no Docker here."""

import os
import shutil

from deploy_tools import ROOT, run

SCRIPT = str(ROOT / "build_and_push.sh")


def plan(*args: str, **env: str) -> list[str]:
    result = run(SCRIPT, *args, "--dry-run", env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.splitlines()[1:]]


def test_both_variants_are_built_and_pushed_with_buildx():
    assert plan("alice", "1.2.0") == [
        "docker buildx build --push -f Dockerfile --target vllm -t alice/vllm-inference-api:1.2.0 .",
        "docker buildx build --push -f Dockerfile.trtllm --target trtllm -t alice/vllm-inference-api:1.2.0-trtllm .",
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
        TRTLLM_VERSION="1.3.0",
    )
    assert lines[0] == (
        "docker buildx build --platform linux/amd64 --load --build-arg VLLM_VERSION=v0.33.0 "
        "-f Dockerfile --target vllm -t alice/vllm-inference-api:1.2.0 ."
    )
    assert "--build-arg TRTLLM_VERSION=1.3.0" in lines[1] and lines[1].endswith(":1.2.0-trtllm .")
    assert lines[2].endswith("--target cpu -t alice/vllm-inference-api:1.2.0-cpu .")


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
