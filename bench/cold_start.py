"""What a second start saves: the stack (scripts/start.sh, vLLM on the CPU, tiny text model) started
with an empty DATA_DIR (cold: no compile cache), then again on the same DATA_DIR (warm), alternated
over rounds; the launcher's own phase timings (`/info` startup_s) are compared phase by phase.

    .venv/bin/python bench/cold_start.py                      # eager and compiled, 3 rounds each
    .venv/bin/python bench/cold_start.py --modes compiled --rounds 2

Cold really is cold: DATA_DIR holds vLLM's cache root and torch's own inductor cache
(TORCHINDUCTOR_CACHE_DIR), and a fresh DATA_DIR is made for each cold start. Results go to
bench/results/cold_start.json; each start's log is kept in a temporary folder named at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "eager": "--enforce-eager --distributed-executor-backend uni",
    "compiled": "--distributed-executor-backend uni",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# vLLM's own timing (at debug) of the step its model-info cache skips: a subprocess that imports the
# model's module to inspect its class.
INSPECT = re.compile(r"Registry inspect model class: Elapsed time ([\d.]+) secs")


def start_once(data_dir: Path, extra_args: str, model: Path, log: Path) -> dict[str, float]:
    port = free_port()  # fresh ports: an engine still exiting must not hold the next start's
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("HF_HOME", "VLLM_CACHE_ROOT")},
        "MODEL_NAME": str(model),
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "MAX_MODEL_LEN": "2048",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "ENGINE_EXTRA_ARGS": extra_args,
        "HF_HUB_OFFLINE": "1",
        "LOG_FORMAT": "json",
        "DATA_DIR": str(data_dir),
        "TORCHINDUCTOR_CACHE_DIR": str(data_dir / "torchinductor"),
        "METRICS_DB_PATH": str(data_dir / "metrics.db"),
        "SCRAPE_INTERVAL": "0",
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "LOG_LEVEL": "DEBUG",
        "PORT": str(port),
        "ENGINE_PORT": str(free_port()),
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "start.sh")], env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the stack exited with {proc.returncode}; see {log}")
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=2).json()
                if info.get("status") == "ready":
                    inspect = [float(m[1]) for m in INSPECT.finditer(log.read_text(errors="replace"))]
                    log.rename(log.with_name(f"{data_dir.name}-{time.time():.0f}.log"))
                    return {**info["startup_s"], "model_inspection": max(inspect, default=0.0)}
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"not ready in 900 s; see {log}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # the launcher and the engine's own group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=str(ROOT / ".cache" / "models" / "tiny-text"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cold_start.json"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    results: dict = {"load_average_at_start": load, "cpus": os.cpu_count(), "modes": {}}
    tmp = tempfile.mkdtemp(prefix="cold-start-")
    log = Path(tmp) / "stack.log"
    try:
        for mode in args.modes.split(","):
            runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
            warmed: Path | None = None
            for r in range(args.rounds):
                fresh = Path(tmp) / f"{mode}-{r}"
                fresh.mkdir()
                # Alternate the order (cold, warm / warm, cold) so a drift in the machine's load
                # does not favour one side; a warm start uses the volume an earlier cold one filled.
                order = (
                    [("cold", fresh), ("warm", fresh)]
                    if warmed is None or r % 2 == 0
                    else [("warm", warmed), ("cold", fresh)]
                )
                for kind, data in order:
                    phases = start_once(data, MODES[mode], Path(args.model), log)
                    phases["load_average"] = round(os.getloadavg()[0], 1)
                    runs[kind].append(phases)
                    print(f"{mode} round {r + 1} {kind}: " + json.dumps(phases), flush=True)
                warmed = fresh
            results["modes"][mode] = runs
    finally:
        print(f"logs: {tmp} (data folders too: remove it when done)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\nload average at start {load:.1f} on {os.cpu_count()} CPUs; medians in seconds")
    for mode, runs in results["modes"].items():
        phases = [
            p
            for p in ("model_inspection", "engine_load", "compile", "warmup", "ready", "total")
            if any(p in r for r in runs["cold"])
        ]
        print(f"\n{mode}\n| phase | cold | warm | saved |\n|---|--:|--:|--:|")
        for phase in phases:
            cold = statistics.median(r.get(phase, 0.0) for r in runs["cold"])
            warm = statistics.median(r.get(phase, 0.0) for r in runs["warm"])
            print(f"| {phase} | {cold:.1f} | {warm:.1f} | {cold - warm:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
