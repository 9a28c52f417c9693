"""docker-compose.yml (and the TensorRT-LLM override) against the compose spec, then what this
project needs of it: GPU reservation, profiles, monitoring wiring, pinned images."""

import io
import re

import pytest
import yaml
from deploy_tools import ROOT, run, tool

from app.settings import ENV_NAMES

COMPOSE = ROOT / "docker-compose.yml"
TRTLLM = ROOT / "docker-compose.trtllm.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_files_are_valid_against_the_compose_spec():
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(TRTLLM)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_spec_check_refuses_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restart: [sometimes]", 1))
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0


def test_the_gpu_service_is_the_default_and_has_what_a_gpu_box_needs(compose):
    api = compose["services"]["vllm-api"]
    assert "profiles" not in api  # `docker compose up` starts it
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "${GPU_COUNT:-all}", "capabilities": ["gpu"]}]
    assert api["env_file"] == [{"path": ".env", "required": False}]
    assert api["volumes"] == ["hf-cache:/data"] and "hf-cache" in compose["volumes"]
    assert api["healthcheck"]["test"] == ["CMD", "python3", "/app/scripts/healthcheck.py"]
    assert api["restart"] == "unless-stopped"
    assert (
        api["build"]["target"] == "vllm"
        and api["build"]["args"]["VLLM_VERSION"] == "${VLLM_VERSION:-v0.32.0}"
        and api["build"]["args"]["VLLM_CUDA_VARIANT"] == "${VLLM_CUDA_VARIANT:-}"
    )


def test_the_cpu_profile_needs_no_gpu_and_answers_to_the_name_prometheus_scrapes(compose):
    cpu = compose["services"]["vllm-api-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["build"]["target"] == "cpu"
    assert cpu["networks"]["default"]["aliases"] == ["vllm-api"]
    assert set(cpu.get("environment", {})) <= set(ENV_NAMES)


def test_the_monitoring_profile_mounts_the_observability_files(compose):
    prom, graf = compose["services"]["prometheus"], compose["services"]["grafana"]
    assert prom["profiles"] == graf["profiles"] == ["monitoring"]
    assert "./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in graf["volumes"]
    assert "./monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in graf["volumes"]


def test_every_image_is_pinned_to_an_explicit_tag(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        assert tag and "latest" not in tag, (name, image)
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", compose["services"]["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", compose["services"]["grafana"]["image"])


def test_the_trtllm_override_swaps_the_image_of_the_same_service():
    override = yaml.safe_load(TRTLLM.read_text())
    api = override["services"]["vllm-api"]
    assert api["build"]["dockerfile"] == "Dockerfile.trtllm" and api["build"]["target"] == "trtllm"
    assert api["image"].endswith("-trtllm")
    # Each build target a compose file names exists in its Dockerfile.
    assert re.search(r"^FROM \S+ AS trtllm$", (ROOT / "Dockerfile.trtllm").read_text(), re.M)
    for target in ("vllm", "cpu"):
        assert re.search(rf"^FROM \S+ AS {target}$", (ROOT / "Dockerfile").read_text(), re.M)


# --- .env: `cp .env.example .env` must change nothing ---------------------------------------------
# Compose cannot run here (no Docker engine), so the file is read by the rules of compose's
# env-file syntax (docs.docker.com/compose/how-tos/environment-variables/variable-interpolation/,
# "Syntax for environment files"), and by python-dotenv, the format's reference implementation.

ENV_EXAMPLE = ROOT / ".env.example"


def compose_env_file(text: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What compose puts in a container's environment from an env file (interpolation aside)."""
    environ = {} if environ is None else environ
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # blank lines and comment lines are ignored
            continue
        line = line.removeprefix("export ").lstrip()
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq:  # `VAR` alone: the value from compose's own environment, if it has one
            if key in environ:
                out[key] = environ[key]
            continue
        value = value.lstrip()
        if value[:1] in ("'", '"'):
            quote, chars, escaped = value[0], [], False
            for ch in value[1:]:
                if escaped:
                    chars.append({"n": "\n", "t": "\t", "r": "\r"}.get(ch, ch) if quote == '"' else ch)
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    break
                else:
                    chars.append(ch)
            out[key] = "".join(chars)
        else:  # an inline comment needs a space before its `#`
            out[key] = re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
    return out


def test_the_env_file_reader_follows_compose_s_syntax():
    text = "\n".join(
        [
            "# a comment",
            "",
            "A=VAL # comment",
            "B=VAL# not a comment",
            'C="VAL # not a comment" # comment',
            "D='$OTHER'",
            "E=",
            "export F=1",
            "G",
            "H",
        ]
    )
    assert compose_env_file(text, {"G": "from-shell"}) == {
        "A": "VAL",
        "B": "VAL# not a comment",
        "C": "VAL # not a comment",
        "D": "$OTHER",
        "E": "",  # an empty value is set, to "": this is what overrode the image's ENV
        "F": "1",
        "G": "from-shell",
    }


def test_copying_env_example_to_dot_env_sets_nothing_in_the_container():
    from dotenv import dotenv_values

    text = ENV_EXAMPLE.read_text()
    assert compose_env_file(text, environ=dict.fromkeys(ENV_NAMES, "x")) == {}
    assert dotenv_values(ENV_EXAMPLE) == {}


def test_uncommenting_one_line_sets_that_one_setting_to_its_default():
    from dotenv import dotenv_values

    lines = ENV_EXAMPLE.read_text().splitlines()
    settings = [i for i, line in enumerate(lines) if re.fullmatch(r"#[A-Z][A-Z0-9_]*=.*", line)]
    assert len(settings) == len(ENV_NAMES)
    for i in settings:
        key, _, value = lines[i][1:].partition("=")
        text = "\n".join([*lines[:i], lines[i][1:], *lines[i + 1 :]])
        assert compose_env_file(text) == {key: value}, lines[i]
        assert dotenv_values(stream=io.StringIO(text)) == {key: value}, lines[i]


# --- stopping: the container must get the whole drain ---------------------------------------------


def _seconds(duration: str) -> float:
    """A compose duration (`90s`, `2m`, `1m30s`) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    h, m, s = (int(x or 0) for x in parts.groups())
    return h * 3600 + m * 60 + s


def stop_needs_s() -> float:
    """How long a SIGTERM'd container may take with the default settings: the grace in which new
    requests are still served, the drain, the proxy server's graceful shutdown, then the engine's
    stop and its children's."""
    from app import launcher
    from app.server import server_config
    from app.settings import Settings

    graceful = server_config(None, "127.0.0.1", 1, 1).timeout_graceful_shutdown
    drain = Settings.model_fields["DRAIN_TIMEOUT"].default
    grace = Settings.model_fields["DRAIN_GRACE_SECONDS"].default
    return grace + drain + graceful + launcher.ENGINE_STOP_TIMEOUT + launcher.LEFTOVER_GRACE


def test_compose_gives_the_container_longer_than_the_drain_to_stop(compose):
    for name in ("vllm-api", "vllm-api-cpu"):
        grace = compose["services"][name].get("stop_grace_period")
        assert grace is not None and _seconds(grace) >= stop_needs_s(), (name, grace, stop_needs_s())


def test_every_docker_run_of_the_image_in_the_docs_sets_a_stop_timeout():
    for doc in ("README.md", "QUICKSTART.md"):
        text = (ROOT / doc).read_text().replace("\\\n", " ")
        runs = [line for line in text.splitlines() if "docker run" in line and "vllm-inference-api" in line]
        assert runs, doc
        for line in runs:
            found = re.search(r"--stop-timeout[ =](\d+)", line)
            assert found and int(found.group(1)) >= stop_needs_s(), (doc, line)
