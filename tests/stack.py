"""Start the real stack (scripts/start.sh: launcher, proxy, vLLM on the CPU) for tests, and read it.

Each Stack gets free ports, writes its output to a file, and is stopped (process group) at the end.
The engine flags are the fast CPU start of ../shared/notes/cpu-vllm.md (~15 s to healthy).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "scripts" / "start.sh"

CPU_ENV = {
    "DEVICE": "cpu",
    "DTYPE": "float32",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "ENGINE_EXTRA_ARGS": "--enforce-eager --distributed-executor-backend uni",
    "LOG_FORMAT": "json",
    "HF_HUB_OFFLINE": "1",
    # No router polls a test's stack: SIGTERM refuses new requests at once and stop() is not slowed
    # down (the grace is tested on the fleet, tests/integration/test_fleet.py).
    "DRAIN_GRACE_SECONDS": "0",
}


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "",
    interval: float = 0.01,
) -> Any:
    """Poll `predicate` until it returns something true, and return that; after `timeout` seconds
    fail with `what` (a callable is asked only then, e.g. for a log's tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"not within {timeout:g} s: {detail or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a stack's log (lines that are not JSON, vLLM's own, are skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


class Stack:
    def __init__(self, log_dir: Path, name: str, **env: str) -> None:
        self.port = free_port()
        self.engine_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine_url = f"http://127.0.0.1:{self.engine_port}"
        self.log_path = log_dir / f"{name}.log"
        self.env = {
            **os.environ,
            **CPU_ENV,
            "VLLM_CACHE_ROOT": str(log_dir / "vllm-cache"),
            "METRICS_DB_PATH": str(log_dir / f"{name}-metrics.db"),  # not the checkout's data/
            "USAGE_DB_PATH": str(log_dir / f"{name}-usage.db"),
            "PORT": str(self.port),
            "ENGINE_PORT": str(self.engine_port),
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 180) -> Stack:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(START)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:  # a fixture that fails here never reaches its teardown
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"stack exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"stack not ready in {timeout}s:\n{self.tail()}")

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        groups = [self.proc.pid] if self.proc is not None else []
        try:  # the engine runs in its own process group: a test must never leave it running
            groups += [r["pid"] for r in self.records() if r.get("event") == "engine started"]
        except FileNotFoundError:
            pass
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if hasattr(self, "_log"):
            self._log.close()

    # --- reading what it wrote ----------------------------------------------------------------

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.log_path)

    def request_log(self, request_id: str, timeout: float = 5) -> dict[str, Any]:
        """The canonical log line of one request (written when the response ends)."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.records():
                if rec.get("event") == "request" and rec.get("request_id") == request_id:
                    return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line for request {request_id}:\n{self.tail(20)}")
            time.sleep(0.05)

    def engine_metric(self, name: str, **labels: str) -> float:
        """A sample of the engine's own metrics, read from the engine directly."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.engine_url + "/metrics", timeout=5).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total
