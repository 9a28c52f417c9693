"""Launcher pieces of the deployment issue, in-process (no engine): the health port of RunPod
load-balancing endpoints, and the engine's preparation (options files, unmapped settings)."""

import asyncio
import json
import sys

import httpx

from app.engines.trtllm import options_path
from app.launcher import Launcher
from app.runtime import Phase
from app.settings import Settings
from inproc import LOGS
from stack import free_port


def _records(event: str) -> list[dict]:
    return [r for r in LOGS.records() if r.get("event") == event]


async def _serve_and_probe(settings: Settings, probes: list[tuple[int, str]]) -> tuple[Launcher, list[int]]:
    launcher = Launcher(settings)
    assert await launcher._start_server()
    try:
        statuses = []
        async with httpx.AsyncClient(timeout=5) as client:
            for port, path in probes:
                statuses.append((await client.get(f"http://127.0.0.1:{port}{path}")).status_code)
            launcher.runtime.set_phase(Phase.DRAINING)
            statuses.append((await client.get(f"http://127.0.0.1:{probes[0][0]}/ping")).status_code)
        return launcher, statuses
    finally:
        await launcher._stop_server()


def external(**env) -> Settings:
    # ENGINE=external to an address where nothing listens: the proxy stays "starting".
    return Settings(ENGINE="external", ENGINE_URL=f"http://127.0.0.1:{free_port()}", HOST="127.0.0.1", **env)


def test_a_separate_health_port_answers_ping_and_health_and_nothing_else():
    port, health = free_port(), free_port()
    launcher, statuses = asyncio.run(
        _serve_and_probe(
            external(PORT=port, PORT_HEALTH=health),
            [(health, "/ping"), (health, "/health"), (health, "/v1/models"), (port, "/ping")],
        )
    )
    # initializing: 204 on /ping and 503 on /health on both ports; the API is not on the health
    # port; draining: /ping turns 503.
    assert statuses == [204, 503, 404, 204, 503]
    assert launcher.health_server is None  # stopped with the proxy


def test_health_port_equal_to_port_or_unset_adds_nothing():
    for same in (False, True):
        port = free_port()
        launcher = Launcher(external(PORT=port, PORT_HEALTH=port if same else None))

        async def run(launcher=launcher, port=port):
            assert await launcher._start_server()
            try:
                assert launcher.health_task is None
                async with httpx.AsyncClient(timeout=5) as client:
                    return (await client.get(f"http://127.0.0.1:{port}/ping")).status_code
            finally:
                await launcher._stop_server()

        assert asyncio.run(run()) == 204


def trtllm(**env) -> Settings:
    return Settings(MODEL_NAME="org/m", ENGINE="trtllm", ENGINE_PORT=free_port(), **env)


def test_trtllm_options_file_is_written_and_unmapped_settings_are_named_once(tmp_path):
    s = trtllm(DTYPE="bfloat16", IMAGE_LIMIT=5, VIDEO_LIMIT=1)
    before = len(_records("settings this engine has no equivalent for are ignored"))
    # The engine's executable stands in: the real trtllm-serve is not installed here.
    assert Launcher(s)._prepare_engine([sys.executable, "serve", "/m"])
    warnings = _records("settings this engine has no equivalent for are ignored")[before:]
    assert len(warnings) == 1
    assert warnings[0]["settings"] == [
        "IMAGE_LIMIT (no per-prompt multimodal limits)",
        "VIDEO_LIMIT (no per-prompt multimodal limits)",
    ]
    with open(options_path(s)) as fh:
        assert json.load(fh)["dtype"] == "bfloat16"


def test_a_missing_engine_executable_is_one_clear_error():
    s = trtllm()
    assert not Launcher(s)._prepare_engine(["trtllm-serve-not-installed", "serve", "/m"])
    error = _records("the engine's executable is not installed in this image")[-1]
    assert error["engine"] == "trtllm" and error["executable"] == "trtllm-serve-not-installed"


def test_vllm_needs_no_files_and_reports_nothing():
    s = Settings(MODEL_NAME="org/m", IMAGE_LIMIT=5)
    before = len(LOGS.records())
    assert Launcher(s)._prepare_engine([sys.executable])
    assert not any(r.get("level") in ("warning", "error") for r in LOGS.records()[before:])
