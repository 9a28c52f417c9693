"""app/lora/service.py and its call sites, where no engine is needed: the admin routes' checks
(refused before anything reaches the engine), the `<base>:<adapter>` rewrite, and the metric label
rule. The engine is a fake (tests/fake_engine.py) only to show that nothing reached it; everything
the real engine does with adapters is in tests/integration/test_lora.py."""

from __future__ import annotations

import json

import httpx
import pytest

from app import metrics
from app.lora.config import LoraPlan
from app.lora.service import folder_signature, rewrite_model
from app.middleware import RequestRecord, observe
from app.routes import classify
from app.runtime import Phase, Runtime
from fake_engine import FakeEngine
from inproc import InProcessProxy
from scripts.tiny_adapters import build_adapter

ADMIN = {"authorization": "Bearer sk-admin"}


@pytest.fixture(scope="module")
def fake():
    with FakeEngine() as engine:
        yield engine


def ready(dynamic: bool, max_rank: int | None = 8) -> Runtime:
    runtime = Runtime()
    runtime.lora = LoraPlan(enabled=True, dynamic=dynamic, max_lora_rank=max_rank)
    runtime.set_phase(Phase.READY)
    return runtime


@pytest.fixture(scope="module")
def proxy(fake):
    with InProcessProxy(
        fake.url, runtime=ready(dynamic=True), API_KEY="sk-user", ADMIN_API_KEY="sk-admin"
    ) as p:
        yield p


def load(proxy, body, headers=ADMIN, **kw):
    return httpx.post(proxy.url + "/v1/load_lora_adapter", json=body, headers=headers, timeout=30, **kw)


def test_the_lora_routes_are_the_proxys_with_the_admin_key_and_an_api_key_for_the_list():
    assert classify("/v1/load_lora_adapter").auth == "admin"
    assert classify("/v1/unload_lora_adapter").auth == "admin"
    assert classify("/v1/lora_adapters").auth == "api"


def test_load_and_unload_without_the_admin_key_are_403_and_never_reach_the_engine(proxy, fake):
    n = len(fake.seen)
    for path, body in (
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"}),
        ("/v1/unload_lora_adapter", {"lora_name": "a"}),
    ):
        for headers in ({}, {"authorization": "Bearer sk-user"}):
            r = httpx.post(proxy.url + path, json=body, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_route", r.text
    assert len(fake.seen) == n
    r = httpx.get(proxy.url + "/v1/lora_adapters", headers={"authorization": "Bearer sk-user"})
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert httpx.get(proxy.url + "/v1/lora_adapters").status_code == 401


def test_a_bad_adapter_is_refused_with_its_sentence_before_the_engine_sees_it(proxy, fake, tmp_path):
    n = len(fake.seen)
    r = load(proxy, {"lora_name": "bad", "lora_path": str(tmp_path)})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_lora_adapter", "lora_path")
    assert (
        error["message"]
        == f"LoRA adapter 'bad' ({tmp_path}) has no adapter_config.json: it is not a PEFT LoRA adapter folder."
    )
    big = build_adapter(tmp_path / "big", 16)
    r = load(proxy, {"lora_name": "big", "lora_path": str(big)})
    assert (
        r.status_code == 400
        and "has rank 16, above this server's MAX_LORA_RANK (8)" in r.json()["error"]["message"]
    )
    r = load(proxy, {"lora_name": "gone", "lora_path": "/no/such/adapter"})
    assert r.status_code == 400 and "/no/such/adapter is not a directory" in r.json()["error"]["message"]
    assert len(fake.seen) == n


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        ({"lora_name": "a"}, {}, "lora_path: Field required"),
        ({"lora_name": 3, "lora_path": "/x"}, {}, "lora_name: Input should be a valid string"),
        ({"lora_name": "m", "lora_path": "/x"}, {}, "conflicts with a served base model"),
        ({"lora_name": "a", "lora_path": "/x"}, {"content-type": "text/plain"}, "Only 'application/json'"),
    ],
)
def test_load_bodies_are_read_as_vllm_reads_them(proxy, fake, body, headers, message):
    n = len(fake.seen)
    r = httpx.post(
        proxy.url + "/v1/load_lora_adapter",
        content=json.dumps(body),
        headers={**ADMIN, "content-type": "application/json", **headers},
    )
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert len(fake.seen) == n


def test_without_runtime_loading_the_routes_say_how_to_turn_it_on(fake, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    with InProcessProxy(fake.url, runtime=ready(dynamic=False), ADMIN_API_KEY="sk-admin") as p:
        n = len(fake.seen)
        r = load(p, {"lora_name": "a", "lora_path": "/x"})
        assert r.status_code == 404 and "LORA_DYNAMIC=true" in r.json()["error"]["message"]
        assert len(fake.seen) == n


def test_a_base_colon_adapter_name_is_rewritten_from_the_parsed_body_only_in_model():
    body = b'{"model":"llama:math","messages":[{"role":"user","content":"caf\\u00e9 \\ud83d\\ude00"}],"n":123456789012345678901234567890, "stream_options":{"include_usage":true}}'
    out = rewrite_model(body, "math")
    assert json.loads(out) == {**json.loads(body), "model": "math"}


def test_a_folder_signature_changes_while_it_is_written(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    first = folder_signature(tmp_path)
    assert folder_signature(tmp_path) == first
    (tmp_path / "a").write_bytes(b"12")
    assert folder_signature(tmp_path) != first
    assert folder_signature(tmp_path / "gone") is None


def label(model: str | None, status: int, served, adapter: str | None = None) -> set[str]:
    before = {
        s.labels["model"]
        for f in metrics.REGISTRY.collect()
        if f.name == "vllm_api_requests"
        for s in f.samples
    }
    rec = RequestRecord(
        "r", "POST", "/v1/completions", None, model=model, status=status, route=classify("/v1/completions")
    )
    rec.adapter = adapter
    observe(rec, 0.01, served)
    after = {
        s.labels["model"]
        for f in metrics.REGISTRY.collect()
        if f.name == "vllm_api_requests"
        for s in f.samples
    }
    return after - before


def test_only_names_the_engine_serves_become_model_labels_whatever_the_status():
    served = frozenset({"label-base", "label-math"})
    assert label("label-math", 400, served) == {"label-math"}  # errors per adapter
    assert label("label-base:label-math", 200, served, adapter="label-math") == set()  # counted as label-math
    for i in range(50):
        assert label(f"made-up-{i}", 404, served) == set()
        assert label(f"made-up-ok-{i}", 200, served) == set()  # even if an engine accepted it
    # Before the engine's list is known: the older rule (only accepted requests name a label).
    assert label("label-unknown", 404, None) == set()
    assert label("label-accepted", 200, None) == {"label-accepted"}
