"""A stand-in for `python -m vllm.entrypoints.openai.api_server`, for start-up failures real vLLM
cannot be made to hit on this CPU machine (CUDA out of memory) or that take it a minute to reach:
it takes vLLM's flags, prints the lines vLLM 0.32 prints (copied from a real run and from vLLM's
source), and then exits 1 or serves /health, /version and /metrics like vLLM.

    STANDIN_SCENARIO=kv       --max-model-len above 768: vLLM's KV cache shortfall, exit 1
    STANDIN_SCENARIO=oom      --max-model-len above 4096: CUDA OOM warming up the sampler, exit 1
    STANDIN_SCENARIO=oom_load CUDA OOM loading the weights, exit 1
    STANDIN_SCENARIO=arch     unsupported architecture, exit 1
    anything else             serve
Every start appends its argv to $STANDIN_LOG (one JSON line).
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

P = "(EngineCore pid=4242) "
KV = [
    f"{P}INFO 11-29 10:04:45 [default_loader.py:501] Loading weights took 0.01 seconds",
    f"{P}ERROR 11-29 10:04:47 [core.py:1510] EngineCore failed to start.",
    f"{P}ERROR 11-29 10:04:47 [core.py:1510] Traceback (most recent call last):",
    f"{P}ERROR 11-29 10:04:47 [core.py:1510] ValueError: To serve at least one request with the model's max seq "
    "len ({asked}), (0.01 GiB KV cache is needed, which is larger than the available KV cache memory (0.0 GiB). "
    "Based on the available memory, the estimated maximum model length is 768. Try increasing "
    "`gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing `max_model_len` "
    "when initializing the engine. See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more "
    "details.",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}",
]
OOM = [
    f"{P}INFO 11-29 10:04:45 [gpu_model_runner.py:5150] Model loading took 14.99 GiB memory and 9.1 seconds",
    f"{P}ERROR 11-29 10:04:47 [core.py:1510] RuntimeError: CUDA out of memory occurred when warming up sampler "
    "with 1024 dummy requests. Please try lowering `max_num_seqs` or `gpu_memory_utilization` when initializing "
    "the engine.",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}",
]
OOM_LOAD = [
    f"{P}ERROR 11-29 10:04:47 [gpu_model_runner.py:5147] Failed to load model - not enough GPU memory. Try "
    "lowering --gpu-memory-utilization to free memory for weights, increasing --tensor-parallel-size, or using "
    "--quantization. See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more tips. "
    "(original error: CUDA out of memory. Tried to allocate 896.00 MiB. GPU 0 has a total capacity of 22.05 GiB "
    "of which 512.00 MiB is free.)",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 896.00 MiB.",
]
ARCH = [
    "(APIServer pid=4241) ERROR 11-29 10:04:40 [registry.py:1206] ValueError: Model architectures "
    "['FooBarForCausalLM'] are not supported for now. Supported architectures: dict_keys(['LlamaForCausalLM'])",
]
SERVING = [
    f"{P}INFO 11-29 10:10:56 [default_loader.py:501] Loading weights took 0.01 seconds",
    f"{P}INFO 11-29 10:12:15 [monitor.py:62] torch.compile took 0.05 s in total",
    f"{P}INFO 11-29 10:12:19 [core.py:402] init engine (profile, create kv cache, warmup model) took 0.20 s",
]


def flag(name: str, default: str | None = None) -> str | None:
    argv = sys.argv[1:]
    return argv[argv.index(name) + 1] if name in argv else default


def say(lines: list[str], **values: object) -> None:
    for line in lines:
        print(line.format(**values), flush=True)
        time.sleep(0.05)


def main() -> int:
    if os.environ.get("STANDIN_LOG"):
        with open(os.environ["STANDIN_LOG"], "a") as fh:
            fh.write(json.dumps(sys.argv[1:]) + "\n")
    scenario = os.environ.get("STANDIN_SCENARIO", "serve")
    length = int(flag("--max-model-len", "8192"))
    if scenario == "kv" and length > 768:
        say(KV, asked=length)
        return 1
    if scenario == "oom" and length > 4096:
        say(OOM)
        return 1
    if scenario == "oom_load":
        say(OOM_LOAD)
        return 1
    if scenario == "arch":
        say(ARCH)
        return 1
    say(SERVING)
    port = int(flag("--port", "8001"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = {"/health": b"", "/version": b'{"version": "0.32.0"}', "/metrics": b""}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    print(
        f"(APIServer pid=4241) INFO 11-29 10:12:20 [entry.py:140] Starting vLLM server on http://127.0.0.1:{port}"
    )
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
