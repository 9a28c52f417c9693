"""RunPod templates (deploy/runpod/*-template.json): the keys RunPod's template API takes
(template.schema.json), and values this image understands."""

import json

import pytest
from deploy_tools import ROOT, run, tool
from test_dockerfiles import card_defaults

from app.settings import ENV_NAMES, Settings

RUNPOD = ROOT / "deploy" / "runpod"
SCHEMA = RUNPOD / "template.schema.json"
TEMPLATES = sorted(RUNPOD.glob("*-template.json"))


def load(name: str) -> dict:
    return json.loads((RUNPOD / name).read_text())


def test_templates_have_only_keys_runpod_takes():
    assert {p.name for p in TEMPLATES} == {
        "pod-template.json",
        "serverless-lb-template.json",
        "serverless-queue-template.json",
    }
    result = run(tool("check-jsonschema"), "--schemafile", str(SCHEMA), *map(str, TEMPLATES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "change",
    [
        {"ports": ["8000/https"]},
        {"volumeMountPath": "data"},
        {"env": {"MAX_MODEL_LEN": 32768}},
        {"containerDisk": 40},
    ],
)
def test_the_schema_refuses_what_runpod_would(tmp_path, change):
    bad = tmp_path / "bad-template.json"
    bad.write_text(json.dumps({**load("pod-template.json"), **change}))
    assert run(tool("check-jsonschema"), "--schemafile", str(SCHEMA), str(bad)).returncode != 0


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_env_is_settings_the_image_accepts(path, monkeypatch):
    env = json.loads(path.read_text())["env"]
    assert set(env) <= set(ENV_NAMES), set(env) - set(ENV_NAMES)
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    Settings()  # raises on any invalid value
    # The summary card's defaults, as the image has them.
    assert {k: env[k] for k in card_defaults()} == card_defaults()


def test_the_pod_serves_http_8000_and_keeps_the_model_on_its_volume():
    pod = load("pod-template.json")
    assert pod["ports"] == ["8000/http"] and pod["isServerless"] is False
    assert pod["volumeMountPath"] == "/data" and pod["env"]["HF_HOME"].startswith("/data/")
    assert pod["containerDiskInGb"] >= 20 and pod["volumeInGb"] >= 30


def test_serverless_templates_pick_their_mode():
    lb, queue = load("serverless-lb-template.json"), load("serverless-queue-template.json")
    assert lb["isServerless"] is queue["isServerless"] is True
    assert lb["volumeInGb"] == queue["volumeInGb"] == 0
    assert f"{lb['env']['PORT']}/http" in lb["ports"] and f"{lb['env']['PORT_HEALTH']}/http" in lb["ports"]
    assert queue["env"]["RUNPOD_MODE"] == "queue" and "RUNPOD_MODE" not in lb["env"]


def test_templates_run_the_root_variant_and_name_the_cuda_filter():
    """RunPod's volumes are root-owned: the -runpod image (Dockerfile target runpod) runs as root.
    The images are CUDA 13 builds: each template says which hosts to allow."""
    for path in TEMPLATES:
        template = json.loads(path.read_text())
        assert template["imageName"].endswith("-runpod"), path.name
        assert "CUDA 13.0 or newer" in template["readme"] or "13.0 and newer" in template["readme"], path.name
    assert "524" in load("serverless-lb-template.json")["readme"]
