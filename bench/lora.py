"""LoRA on vLLM (CPU, tiny-text): what turning LoRA on costs, and how a LORA_DIR folder added at
run time gets served: the proxy's scan (app/lora/service.py) against vLLM's filesystem resolver
(`VLLM_PLUGINS=lora_filesystem_resolver`, `VLLM_LORA_RESOLVER_CACHE_DIR`).

    .venv/bin/python bench/lora.py [--requests 12] [--out bench/results/lora.json]

Three engine starts, one after the other:
1. vLLM, LoRA off, and 2. vLLM, LoRA on (two adapters) with the filesystem resolver, both up at
   once: their start times (the second while the first idles), then base-model and adapter latency (32 tokens,
   ignore_eos, greedy; median) with the requests alternated between them; then the resolver's pick-up:
   a folder whose adapter_config.json names the served model, then one naming the `--model` path
   (the resolver's rule), each: listed in /v1/models before a request? first and second request.
3. The whole stack (scripts/start.sh) with LORA_DIR and LORA_DYNAMIC, LORA_SCAN_INTERVAL=2: a
   folder copied in (time until /v1/models lists it), and one named by a request at once.
Plus the scan's own cost: one look at 100 adapter folders (app/lora/service.py folder_signature).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
sys.path.insert(0, str(ROOT))

from scripts.tiny_adapters import build_adapter  # noqa: E402

MODEL = Path(os.environ.get("TINY_MODELS_DIR", ROOT / ".cache" / "models")) / "tiny-text"
CPU = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
FAST = [
    "--dtype",
    "float32",
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--distributed-executor-backend",
    "uni",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the engine's own children, if any were left
    except ProcessLookupError:
        pass


def complete(url: str, model: str, tokens: int = 32) -> tuple[int, float]:
    start = time.perf_counter()
    r = httpx.post(
        url + "/v1/completions",
        json={
            "model": model,
            "prompt": "Hello world",
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=300,
    )
    return r.status_code, time.perf_counter() - start


def median_ms(url: str, model: str, n: int) -> float:
    complete(url, model)  # warm-up
    return round(statistics.median(complete(url, model)[1] for _ in range(n)) * 1000, 1)


def listed(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}


def vllm(work: Path, name: str, extra: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL)]
    argv += ["--served-model-name", "tiny-text", "--host", "127.0.0.1", "--port", str(port), *FAST, *extra]
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **CPU, "VLLM_CACHE_ROOT": str(work / "vcache"), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def first_two(url: str, model: str) -> dict:
    code1, t1 = complete(url, model, 8)
    code2, t2 = complete(url, model, 8)
    return {"status": [code1, code2], "first_ms": round(t1 * 1000, 1), "second_ms": round(t2 * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora.json")
    args = parser.parse_args()
    if not MODEL.is_dir():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "tiny_models.py"), str(MODEL.parent), "--only", "text"],
            check=True,
        )
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    spare = work / "spare"
    build_adapter(spare / "r8", 8, seed=8)
    build_adapter(spare / "r16", 16, seed=16)
    build_adapter(spare / "by-path", 8, seed=3, base_model=str(MODEL))
    results: dict = {"load_average": os.getloadavg()}
    procs: list[subprocess.Popen] = []
    try:
        # 1 and 2: both engines up (started one after the other), then their requests
        # alternated one by one, so drift on this machine falls on both alike.
        plain, plain_url = vllm(work, "plain", [], {})
        procs.append(plain)
        results["lora_off"] = {"start_s": round(wait_healthy(plain_url, plain), 1)}
        cache = work / "resolver"
        cache.mkdir()
        proc, url = vllm(
            work,
            "lora-resolver",
            [
                "--enable-lora",
                "--max-lora-rank",
                "16",
                "--lora-modules",
                f"a8={spare}/r8",
                f"a16={spare}/r16",
            ],
            {
                "VLLM_PLUGINS": "lora_filesystem_resolver",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
            },
        )
        procs.append(proc)
        results["lora_on"] = {"start_s": round(wait_healthy(url, proc), 1)}
        runs = [(plain_url, "tiny-text"), (url, "tiny-text"), (url, "a8")]
        for target in runs:
            complete(*target)  # warm-up
        times: list[list[float]] = [[], [], []]
        for _ in range(args.requests):
            for i, target in enumerate(runs):
                times[i].append(complete(*target)[1])
        off, on_base, on_adapter = (round(statistics.median(t) * 1000, 1) for t in times)
        results["lora_off"]["base_ms"] = off
        results["lora_on"].update(base_ms=on_base, adapter_ms=on_adapter, base_ratio=round(on_base / off, 2))
        stop(plain)
        shutil.copytree(spare / "r16", cache / "by-name")  # records base "tiny-text", the served name
        shutil.copytree(spare / "by-path", cache / "by-path")  # records the --model path
        results["resolver"] = {
            "by_name": {"listed_before_use": "by-name" in listed(url), **first_two(url, "by-name")},
            "by_path": {"listed_before_use": "by-path" in listed(url), **first_two(url, "by-path")},
        }
        results["resolver"]["by_path"]["listed_after_use"] = "by-path" in listed(url)
        stop(proc)

        # 3. The stack: the proxy's scan (LORA_DIR, LORA_DYNAMIC, a 2 s interval).
        folder = work / "dir"
        folder.mkdir()
        port, engine_port = free_port(), free_port()
        env = {
            **os.environ,
            **CPU,
            "DEVICE": "cpu",
            "MODEL_NAME": str(MODEL),
            "SERVED_MODEL_NAME": "tiny-text",
            "DTYPE": "float32",
            "MAX_MODEL_LEN": "512",
            "ENGINE_EXTRA_ARGS": "--enforce-eager --distributed-executor-backend uni",
            "PORT": str(port),
            "ENGINE_PORT": str(engine_port),
            "LORA_DIR": str(folder),
            "LORA_DYNAMIC": "true",
            "LORA_SCAN_INTERVAL": "2",
            "MAX_LORA_RANK": "16",
            "LOG_FORMAT": "json",
            "SCRAPE_INTERVAL": "0",
            "VLLM_CACHE_ROOT": str(work / "vcache"),
            "METRICS_DB_PATH": str(work / "metrics.db"),
        }
        log = open(work / "stack.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "start.sh")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        scan = {"start_s": round(wait_healthy(url, proc), 1)}
        copied = time.monotonic()
        shutil.copytree(spare / "r16", folder / "scanned")
        while "scanned" not in listed(url):
            time.sleep(0.05)
        scan["listed_after_s"] = round(time.monotonic() - copied, 2)
        scan["scanned"] = first_two(url, "scanned")
        shutil.copytree(spare / "r8", folder / "named")
        scan["named_at_once"] = first_two(url, "named")
        results["scan"] = scan
        stop(proc)

        # The scan's own cost: one look at 100 folders.
        from app.lora.service import folder_signature

        many = work / "many"
        for i in range(100):
            shutil.copytree(spare / "r8", many / f"a{i}")
        start = time.perf_counter()
        for _ in range(10):
            for p in many.iterdir():
                folder_signature(p)
        results["scan_100_folders_ms"] = round((time.perf_counter() - start) / 10 * 1000, 2)
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
