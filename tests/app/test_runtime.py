"""app/runtime.py: extend_lifespan, the one way the app's parts (dashboard, LoRA, usage, batch) run
work for the app's lifetime."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from app.runtime import extend_lifespan


def test_start_tasks_and_stop_run_in_order_and_tasks_are_cancelled_on_the_way_out():
    seen: list[str] = []
    api = FastAPI()

    async def start() -> None:
        seen.append("start")

    async def forever() -> None:
        seen.append("task running")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("task cancelled")
            raise

    async def stop() -> None:
        seen.append("stop")

    extend_lifespan(api, start=start, tasks=lambda: [forever()], stop=stop)
    extend_lifespan(api, stop=lambda: seen.append("outer sync stop"))  # wraps the first one: ends first
    with TestClient(api):
        while "task running" not in seen:
            pass
        assert seen == ["start", "task running"]
    assert seen == ["start", "task running", "outer sync stop", "task cancelled", "stop"]


def test_a_task_that_failed_is_logged_and_shutdown_goes_on():
    stopped: list[bool] = []
    api = FastAPI()

    async def broken() -> None:
        raise RuntimeError("boom")

    extend_lifespan(api, tasks=lambda: [broken()], stop=lambda: stopped.append(True))
    with capture_logs() as records, TestClient(api):
        pass
    assert stopped == [True]
    assert [r["event"] for r in records] == ["background task failed"]
