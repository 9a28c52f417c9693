"""The drain's grace (DRAIN_GRACE_SECONDS), in-process: after SIGTERM `/health` answers 503 at once
while new requests are still served, then refused. A fake engine stands in for vLLM (the timing is
what is tested; tests/integration/test_fleet.py drains a real replica behind vllm-router)."""

import asyncio
import signal

import httpx

from app.launcher import Launcher
from app.runtime import Phase
from app.settings import Settings
from stack import free_port


async def _drain_with(settings: Settings, signum: int) -> tuple[list[tuple[str, int, str]], int]:
    """Serve in front of the fake engine, take `signum`, and probe /health and a request at once,
    then again after DRAIN_GRACE_SECONDS."""
    launcher = Launcher(settings)
    assert await launcher._start_server()
    seen = []
    try:
        launcher.runtime.set_phase(Phase.READY)
        launcher._on_signal(signum)
        drain = asyncio.ensure_future(launcher._drain())
        url = f"http://127.0.0.1:{settings.PORT}"
        body = {"model": "m", "prompt": "x"}
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            for when in ("at once", "after the grace"):
                if when == "after the grace":
                    await asyncio.sleep(settings.DRAIN_GRACE_SECONDS + 0.3)
                health = await client.get("/health")
                request = await client.post("/v1/completions", json=body)
                seen.append((when, health.status_code, health.json()["status"], request.status_code))
        return seen, await drain
    finally:
        await launcher._stop_server()


def test_sigterm_turns_health_503_at_once_but_serves_new_requests_for_the_grace_then_refuses():
    from fake_engine import FakeEngine

    with FakeEngine() as engine:
        s = Settings(
            ENGINE="external",
            ENGINE_URL=engine.url,
            HOST="127.0.0.1",
            PORT=free_port(),
            DRAIN_GRACE_SECONDS=1,
        )
        seen, code = asyncio.run(_drain_with(s, signal.SIGTERM))
        assert seen == [("at once", 503, "draining", 200), ("after the grace", 503, "draining", 503)]
        assert code == 0
        assert sum(r.path == "/v1/completions" for r in engine.seen) == 1  # the refused one never reached it


def test_sigint_and_a_zero_grace_refuse_new_requests_at_once():
    from fake_engine import FakeEngine

    with FakeEngine() as engine:
        for signum, grace in ((signal.SIGINT, 1), (signal.SIGTERM, 0)):
            s = Settings(
                ENGINE="external",
                ENGINE_URL=engine.url,
                HOST="127.0.0.1",
                PORT=free_port(),
                DRAIN_GRACE_SECONDS=grace,
            )
            seen, _ = asyncio.run(_drain_with(s, signum))
            assert seen[0] == ("at once", 503, "draining", 503), (signum, grace)
