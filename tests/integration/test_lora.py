"""LoRA adapters on the real stack (scripts/start.sh, vLLM on the CPU): one stack configured the three
ways at once (LORA_MODULES, LORA_CONFIG with one adapter outside auto_load, LORA_DIR), runtime
loading from the config file, the admin key set; tiny random adapters of ranks 8 and 16 built by
hand (scripts/tiny_adapters.py). Plus two launcher runs that must fail before any engine starts.

LoRA is not turned on for the session's text stack: measured side by side (bench/lora.py,
bench/RESULTS.md), an engine with LoRA on answers the base model ~1.25x slower on the CPU, which
every test on that stack would pay, and its start, metric labels and /v1/models would change for
all of them; this module's stack costs one engine start.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts.tiny_adapters import build_adapter
from stack import ROOT, Stack, wait_for

pytestmark = pytest.mark.integration

BASE = "tiny-text"
USER = {"authorization": "Bearer sk-user"}
ADMIN = {"authorization": "Bearer sk-admin"}


@pytest.fixture(scope="module")
def adapters(stack_logs) -> Path:
    root = stack_logs / "lora"
    build_adapter(root / "static-r8", 8, seed=8)
    build_adapter(root / "cfg-r16", 16, seed=16)
    build_adapter(root / "cfg-lazy", 8, seed=3)
    build_adapter(root / "dir" / "alpha", 8, seed=4)
    build_adapter(root / "spare-r16", 16, seed=5)
    build_adapter(root / "spare-r8", 8, seed=6)
    (root / "lora.yaml").write_text(
        f"""
base_model: {{model_path: tiny-text, model_name: tiny-text}}
lora_adapters:
  - {{name: math, path: {root}/cfg-r16, format: huggingface, description: "math reasoning"}}
  - {{name: lazy, path: {root}/cfg-lazy}}
lora_settings: {{max_loras: 2, enable_dynamic_loading: true, cache_size: 4}}
auto_load: [math]
"""
    )
    return root


@pytest.fixture(scope="module")
def lora_stack(tiny_models, stack_logs, adapters):
    stack = Stack(
        stack_logs,
        "lora",
        MODEL_NAME=str(tiny_models["text"]),
        SERVED_MODEL_NAME=BASE,
        MAX_MODEL_LEN="512",
        LORA_MODULES=f"sql={adapters}/static-r8",
        LORA_CONFIG=str(adapters / "lora.yaml"),
        LORA_DIR=str(adapters / "dir"),
        LORA_SCAN_INTERVAL="1",
        API_KEY="sk-user",
        ADMIN_API_KEY="sk-admin",
        SCRAPE_INTERVAL="1",
    ).start()
    yield stack
    stack.stop()


@pytest.fixture
def client(lora_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_stack.url + "/v1", api_key="sk-user", max_retries=0, timeout=120)


def models(stack) -> dict[str, str | None]:
    data = httpx.get(stack.url + "/v1/models", headers=USER, timeout=30).json()["data"]
    return {m["id"]: m["parent"] for m in data}


def listed(stack) -> dict[str, dict]:
    r = httpx.get(stack.url + "/v1/lora_adapters", headers=USER, timeout=30)
    assert r.status_code == 200, r.text
    return {a["name"]: a for a in r.json()["data"]}


def complete(client, model: str, request_id: str | None = None, **kw):
    return client.completions.create(
        model=model,
        prompt="Hello world",
        max_tokens=kw.pop("max_tokens", 12),
        temperature=0,
        extra_headers={"x-request-id": request_id} if request_id else None,
        **kw,
    )


def test_each_way_of_configuring_serves_its_adapters_and_the_list_agrees_with_the_engine(lora_stack):
    served = models(lora_stack)
    assert {name: parent for name, parent in served.items() if name in ("sql", "math", "alpha")} == {
        "sql": BASE,
        "math": BASE,
        "alpha": BASE,
    }
    assert served[BASE] is None
    adapters = listed(lora_stack)
    assert {n for n, a in adapters.items() if a["loaded"]} == {n for n, p in served.items() if p}
    assert (adapters["sql"]["origin"], adapters["sql"]["rank"]) == ("static", 8)
    assert (adapters["math"]["origin"], adapters["math"]["rank"]) == ("config", 16)
    assert adapters["math"]["description"] == "math reasoning"
    assert (adapters["alpha"]["origin"], adapters["alpha"]["parent"]) == ("dir", BASE)
    assert adapters["math"]["loaded_at"] is not None
    body = httpx.get(lora_stack.url + "/v1/lora_adapters", headers=USER).json()
    assert (body["max_lora_rank"], body["runtime_loading"], body["engine_checked"]) == (16, True, True)
    # The one outside auto_load is known, not loaded until first used (test below).
    assert "lazy" in adapters and adapters["lazy"]["origin"] == "config"


def test_greedy_output_through_an_adapter_differs_from_the_base_and_repeats_exactly(client, lora_stack):
    base = complete(client, BASE, "lora-base-1").choices[0].text
    sql = complete(client, "sql", "lora-sql-1").choices[0].text
    assert complete(client, "sql").choices[0].text == sql
    assert sql != base
    assert complete(client, "math").choices[0].text not in (sql, base)
    assert lora_stack.request_log("lora-base-1")["adapter"] is None
    line = lora_stack.request_log("lora-sql-1")
    assert (line["model"], line["adapter"], line["status"]) == ("sql", "sql", 200)


def test_base_colon_adapter_is_the_adapter_and_the_answer_names_the_adapter(client, lora_stack):
    direct = complete(client, "math")
    aliased = complete(client, f"{BASE}:math", "lora-alias-1")
    assert aliased.choices[0].text == direct.choices[0].text
    assert aliased.model == "math"  # what the engine says
    line = lora_stack.request_log("lora-alias-1")
    assert (line["model"], line["adapter"], line["status"]) == (f"{BASE}:math", "math", 200)


def test_a_config_adapter_outside_auto_load_is_loaded_on_first_use(client, lora_stack):
    assert "lazy" not in models(lora_stack) and not listed(lora_stack)["lazy"]["loaded"]
    answer = complete(client, "lazy", "lora-lazy-1")
    assert answer.model == "lazy" and answer.choices[0].text
    assert models(lora_stack)["lazy"] == BASE
    entry = listed(lora_stack)["lazy"]
    assert entry["loaded"] and entry["requests"] >= 1 and entry["last_used"]


def test_runtime_load_list_request_unload_then_404(client, lora_stack, adapters):
    body = {"lora_name": "late", "lora_path": str(adapters / "spare-r16")}
    for headers in ({}, USER):
        r = httpx.post(lora_stack.url + "/v1/load_lora_adapter", json=body, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_route"
    r = httpx.post(lora_stack.url + "/v1/load_lora_adapter", json=body, headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    assert models(lora_stack)["late"] == BASE
    entry = listed(lora_stack)["late"]
    assert (entry["loaded"], entry["origin"], entry["rank"], entry["source"]) == (
        True,
        "runtime",
        16,
        body["lora_path"],
    )
    answer = complete(client, "late")
    assert answer.model == "late"
    r = httpx.post(lora_stack.url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert "late" not in models(lora_stack)
    entry = listed(lora_stack)["late"]
    assert not entry["loaded"] and entry["requests"] == 1
    assert entry["completion_tokens"] == answer.usage.completion_tokens
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "late")
    assert err.value.status_code == 404 and "late" in err.value.message
    # A folder that is no adapter, and one over the rank the engine was started with: refused with
    # their sentence, the engine never asked.
    r = httpx.post(
        lora_stack.url + "/v1/load_lora_adapter",
        json={"lora_name": "nope", "lora_path": str(adapters)},
        headers=ADMIN,
    )
    assert r.status_code == 400 and "has no adapter_config.json" in r.json()["error"]["message"]
    assert "nope" not in models(lora_stack) and "nope" not in listed(lora_stack)


def test_a_new_lora_dir_folder_is_picked_up_without_a_restart(client, lora_stack, adapters):
    # Scanned: listed once the folder stood still for one scan interval (LORA_SCAN_INTERVAL=1).
    shutil.copytree(adapters / "spare-r8", adapters / "dir" / "beta")
    wait_for(lambda: models(lora_stack).get("beta") == BASE, 30, "beta listed by the engine", interval=0.25)
    assert listed(lora_stack)["beta"]["origin"] == "dir"
    # Named by a request before any scan saw it: loaded for that request.
    shutil.copytree(adapters / "spare-r16", adapters / "dir" / "gamma")
    assert complete(client, "gamma").model == "gamma"
    assert models(lora_stack)["gamma"] == BASE


def test_metrics_carry_the_adapter_and_made_up_names_add_no_series(client, lora_stack):
    stream = client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    )
    assert [c for c in stream]
    complete(client, "math")
    with pytest.raises(openai.BadRequestError):  # over MAX_MODEL_LEN: the engine's 400, for this adapter
        complete(client, "math", max_tokens=100_000)

    def families() -> dict[str, list]:
        text = httpx.get(lora_stack.url + "/metrics", timeout=30).text
        return {
            f.name: f.samples for f in text_string_to_metric_families(text) if f.name.startswith("vllm_api_")
        }

    def made_up(name: str) -> None:
        r = httpx.post(
            lora_stack.url + "/v1/completions",
            json={"model": name, "prompt": "x", "max_tokens": 1},
            headers=USER,
            timeout=30,
        )
        assert r.status_code == 404 and r.json()["error"]["message"], r.text

    made_up("made-up")  # the unlabelled 404 series exists from here on
    before = families()
    labels = {s.labels.get("model") for s in before["vllm_api_requests"]}
    assert {"sql", "math", BASE} <= labels
    errors = {(s.labels["model"], s.labels["status"]) for s in before["vllm_api_requests"] if s.value}
    assert ("math", "400") in errors  # errors per adapter
    ttft = {s.labels["model"] for s in before["vllm_api_time_to_first_token_seconds"] if s.value}
    assert "sql" in ttft
    loaded = [s.value for s in before["vllm_api_lora_adapters_loaded"]]
    assert loaded == [sum(1 for p in models(lora_stack).values() if p)]
    for i in range(12):
        for name in (f"made-up-{uuid.uuid4().hex}", f"{BASE}:made-up-{i}", f"../../etc-{i}"):
            made_up(name)
    after = families()
    series = {name: {tuple(sorted(s.labels.items())) for s in samples} for name, samples in after.items()}
    old = {name: {tuple(sorted(s.labels.items())) for s in samples} for name, samples in before.items()}
    grown = {n: series[n] - old.get(n, set()) for n in series if series[n] - old.get(n, set())}
    assert grown == {}, grown


def test_the_dashboard_shows_a_row_per_adapter(client, lora_stack):
    for _ in range(3):
        complete(client, "alpha")

    def alpha_row():
        rows = httpx.get(lora_stack.url + "/api/v1/live_metrics", timeout=30).json()["models"]
        return next((r for r in rows if r["model"] == "alpha" and r["request_rate"]), None)

    row = wait_for(alpha_row, 20, "alpha's row with a request rate", interval=0.25)
    assert row["adapter"] is True and row["requests"] >= 3 and row["completion_tokens_per_s"] > 0
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(lora_stack.url + "/dashboard")
            row = page.locator('#models-body tr[data-model="alpha"]')
            row.wait_for(timeout=20_000)
            cells = row.locator("td").all_inner_texts()
            assert cells[0].startswith("alpha") and cells[0].endswith("adapter")
            assert int(cells[1]) >= 3  # requests since start
            base = page.locator(f'#models-body tr[data-model="{BASE}"] td').first.inner_text()
            assert base.endswith("base")
            assert errors == []
        finally:
            browser.close()


def test_the_cli_end_to_end(lora_stack, adapters):
    env = {**os.environ, "LORA_SERVER_URL": lora_stack.url, "API_KEY": "sk-user", "ADMIN_API_KEY": "sk-admin"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app.lora", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli("load", "cli-one", str(adapters / "spare-r8"))
    assert done.returncode == 0 and "cli-one" in done.stdout, done.stderr
    done = cli("list")
    row = next(line for line in done.stdout.splitlines() if line.startswith("cli-one "))
    assert row.split()[1:4] == ["yes", "runtime", "8"]
    done = cli("test", "cli-one", "Hello there", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"adapter cli-one: TTFT ([\d.]+ ms|-), \d+ tokens in [\d.]+ s, [\d.]+ tokens/s", summary
    ), summary
    assert cli("unload", "cli-one").returncode == 0
    done = cli("test", "cli-one", "Hello")
    assert done.returncode == 1 and "404" in done.stderr
    env.pop("ADMIN_API_KEY")
    done = cli("load", "cli-two", str(adapters / "spare-r8"))
    assert done.returncode == 1 and "403" in done.stderr


# --- start-up failures: one sentence, exit 1, before the engine starts ---------------------------


def _fails_before_the_engine(stack: Stack, sentence: str) -> None:
    started = time.monotonic()
    assert stack.wait_exit(120) == 1
    records = stack.records()
    errors = [r["event"] for r in records if r.get("level") == "error"]
    assert len(errors) == 1 and sentence in errors[0], errors
    assert not any(r.get("event") in ("starting engine", "engine started") for r in records)
    assert "Traceback" not in stack.log_path.read_text()
    assert time.monotonic() - started < 60


def test_a_broken_adapter_folder_fails_fast_with_its_sentence(stack_logs, tiny_models, adapters):
    broken = adapters / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    stack = Stack(
        stack_logs, "lora-broken", MODEL_NAME=str(tiny_models["text"]), LORA_MODULES=f"support={broken}"
    )
    stack.start(wait=False)
    try:
        _fails_before_the_engine(stack, f"LoRA adapter 'support' ({broken}) has no weights")
    finally:
        stack.stop()


def test_a_rank_above_max_lora_rank_fails_fast_with_its_sentence(stack_logs, tiny_models, adapters):
    stack = Stack(
        stack_logs,
        "lora-rank",
        MODEL_NAME=str(tiny_models["text"]),
        LORA_MODULES=f"big={adapters}/spare-r16",
        MAX_LORA_RANK="8",
    )
    stack.start(wait=False)
    try:
        _fails_before_the_engine(
            stack, "has rank 16, above this server's MAX_LORA_RANK (8): set MAX_LORA_RANK to 16"
        )
    finally:
        stack.stop()
