"""Which HTTP client should the proxy use to reach the engine? Measures the candidates side by side.

The proxy relays every request to the engine through one pooled client (`app/proxy/upstream.py`). On a
lean server side that client is most of the proxy's CPU cost, so this benchmark runs one minimal proxy
per client, all of the same shape (`bench/proxies/<client>.py`: a raw ASGI app under uvicorn with
httptools and uvloop, one worker, no access log; it reads the request body, forwards it with the
headers, and relays status, headers and body chunks back as they arrive), in front of the same upstream:

- upstream: nginx on loopback (`harness.upstream_nginx_config`) answering `POST /v1/chat/completions`
  with a canned chat completion (~700 bytes of JSON) and `POST /sse` with a canned vLLM-shaped stream
  (64 events + `data: [DONE]`, `text/event-stream`), and relaying `/sse-slow` from
  `bench/slow_upstream.py`, which sends the first event of the same stream at once and the rest only
  after a pause (`--slow-pause-ms`, 50 ms);
- load: wrk, `-t1 -c32 -d5s --latency` by default, POSTing a chat request; nginx and wrk are pinned to
  core 1, the proxy under test to core 0, so the proxy gets one whole core;
- contenders: `direct` (wrk straight to nginx, no proxy: the ceiling, though a low one, as nginx
  shares core 1 with wrk there), `own` (the proxy's own client, `app/proxy/upstream.py`), `aiohttp`,
  `httpx`, `httpx2`, `pyreqwest` (with a 1-byte streamed read buffer) and `pyreqwest-readahead` (the
  same with pyreqwest's default 64 KiB read-ahead, kept as the control that the TTFB column must
  catch).

How to read the table:

- `json req/s`, `sse req/s`: throughput at the given concurrency; the proxy's core is saturated, so
  this is the inverse of the CPU cost per relayed request. `× aiohttp` divides by aiohttp's figure for
  the same body kind (aiohttp: the client the proxy used before its own, `app/proxy/upstream.py`).
- `p50`, `p99`: wrk's latency percentiles under that load (queueing included).
- `TTFB`: median, over `--ttfb-requests` sequential requests with no other load, of the time from
  sending `POST /sse-slow` to receiving the first byte of the response *body* (the first event). A
  proxy that streams shows ~1 ms; one that reads ahead before relaying shows the upstream's pause (50
  ms) or more. Throughput alone cannot see that defect, which is why this column exists.
- `nginx conns`: connections nginx accepted during the wrk runs (warm-up, json, sse). `direct` opens
  one per wrk connection per run (3 × `--connections`); a proxy that pools well opens about
  `--connections` once and reuses them, far more means its pool closes and reopens connections.
- `errors`: wrk's socket errors and non-2xx responses. Anything but 0 makes the row's req/s suspect.

Each proxy's relayed bodies are checked byte for byte against nginx's before it is measured.

    .venv/bin/python bench/upstream_clients.py [--duration 5] [--connections 32] [--only aiohttp,httpx]

Prints the machine and the table (Markdown) to stdout, progress to stderr, and writes the same data to
`bench/results/upstream_clients.json`. Uses ports 19000-19010. Shares its upstream, wrk runner and
process handling with `proxy_overhead.py` (`bench/harness.py`). Needs nginx, wrk and taskset
(`apt-get install -y nginx wrk`) and at least 2 CPUs. Every process it starts is stopped on exit,
on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    HOST,
    JSON_BODY,
    LOAD_CORE,
    REPO,
    REQUEST_BODY,
    SSE_BODY,
    SSE_EVENTS,
    SSE_REQUEST_BODY,
    BenchError,
    Processes,
    fetch,
    fmt_int,
    fmt_ms,
    fmt_ratio,
    log,
    machine,
    machine_line,
    nginx_accepts,
    nginx_argv,
    require_tools,
    run_main,
    run_wrk,
    slow_upstream_argv,
    upstream_nginx_config,
    uvicorn_argv,
    wrk_script,
)

NGINX_PORT = 19000
SLOW_PORT = 19001
PROXY_PORTS = range(19002, 19011)


@dataclass(frozen=True)
class Contender:
    name: str
    module: str | None  # bench.proxies.<module>; None for `direct`
    package: str | None  # what must be importable
    env: dict[str, str] = field(default_factory=dict)


CONTENDERS = [
    Contender("direct", None, None),
    Contender("own", "own", "httptools"),
    Contender("aiohttp", "aiohttp", "aiohttp"),
    Contender("httpx", "httpx", "httpx"),
    Contender("httpx2", "httpx2", "httpx2"),
    Contender("pyreqwest", "pyreqwest", "pyreqwest"),
    Contender(
        "pyreqwest-readahead",
        "pyreqwest",
        "pyreqwest",
        {"BENCH_PYREQWEST_READ_BUFFER_LIMIT": str(64 * 1024)},
    ),
]
BASELINE = "aiohttp"
VERSIONED_PACKAGES = ("aiohttp", "httpx", "httpx2", "pyreqwest", "uvicorn", "uvloop", "httptools")


# --- body checks and time to first body byte ----------------------------------------------------


def check_bodies(name: str, port: int) -> None:
    """The proxy must relay nginx's answers byte for byte, with their content type."""
    for path, request, expected, ctype in (
        ("/v1/chat/completions", REQUEST_BODY, JSON_BODY, "application/json"),
        ("/sse", SSE_REQUEST_BODY, SSE_BODY, "text/event-stream"),
        ("/sse-slow", SSE_REQUEST_BODY, SSE_BODY, "text/event-stream"),
    ):
        got = fetch(port, path, request)
        if (
            got.status != 200
            or got.body != expected
            or not got.headers.get("content-type", "").startswith(ctype)
        ):
            raise BenchError(
                f"{name}: POST {path} relayed status {got.status}, content-type "
                f"{got.headers.get('content-type')!r}, {len(got.body)} body bytes (expected 200, {ctype}, "
                f"{len(expected)} bytes): {got.body[:200]!r}"
            )


def measure_ttfb(port: int, requests: int) -> dict:
    ttfbs, totals = [], []
    for _ in range(requests):
        got = fetch(port, "/sse-slow", SSE_REQUEST_BODY)
        totals.append(got.total_s)
        if got.body != SSE_BODY:
            raise BenchError(f"/sse-slow on port {port}: truncated or altered stream ({len(got.body)} bytes)")
        ttfbs.append(got.ttfb_s)
    return {
        "ttfb_median_ms": statistics.median(ttfbs) * 1000,
        "ttfb_max_ms": max(ttfbs) * 1000,
        "total_median_ms": statistics.median(totals) * 1000,
        "requests": requests,
    }


# --- the run ------------------------------------------------------------------------------------


def bench_one(contender: Contender, port: int, procs: Processes, scripts: dict, args) -> dict:
    proc = None
    if contender.module is not None:
        env = {"BENCH_UPSTREAM": f"http://{HOST}:{NGINX_PORT}", **contender.env}
        proc = procs.start(contender.name, uvicorn_argv(contender.module, port), port, env)
    try:
        check_bodies(contender.name, port)
        accepted = nginx_accepts(NGINX_PORT)
        if args.warmup > 0:
            run_wrk(port, "/v1/chat/completions", scripts["json"], args.warmup, args.connections)
        result = {
            "json": run_wrk(port, "/v1/chat/completions", scripts["json"], args.duration, args.connections),
            "sse": run_wrk(port, "/sse", scripts["sse"], args.duration, args.connections),
        }
        # Connections nginx accepted during the wrk runs, the stub_status request itself excluded.
        result["upstream_connections"] = nginx_accepts(NGINX_PORT) - accepted - 1
        result["ttfb"] = measure_ttfb(port, args.ttfb_requests)
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{contender.name} died during the run (exit {proc.returncode})")
        return result
    finally:
        if proc is not None:
            procs.stop(proc)


def _fmt_errors(result: dict) -> str:
    parts = [
        f"{kind} {name} {count}" for kind in ("json", "sse") for name, count in result[kind]["errors"].items()
    ]
    return ", ".join(parts) or "0"


def table(results: dict[str, dict]) -> str:
    base = results.get(BASELINE)
    base_json = base["json"]["requests_per_s"] if base and "json" in base else None
    base_sse = base["sse"]["requests_per_s"] if base and "sse" in base else None
    rows = [
        "| contender | json req/s | × aiohttp | json p50 | json p99 | sse req/s | × aiohttp | sse p50 | sse p99 "
        "| TTFB median | nginx conns | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, res in results.items():
        if "skipped" in res:
            rows.append(f"| {name} | {res['skipped']} |" + " |" * 10)
            continue
        j, s = res["json"], res["sse"]
        rows.append(
            f"| {name} | {fmt_int(j['requests_per_s'])} | {fmt_ratio(j['requests_per_s'], base_json)} "
            f"| {fmt_ms(j['p50_ms'])} | {fmt_ms(j['p99_ms'])} "
            f"| {fmt_int(s['requests_per_s'])} | {fmt_ratio(s['requests_per_s'], base_sse)} "
            f"| {fmt_ms(s['p50_ms'])} | {fmt_ms(s['p99_ms'])} "
            f"| {fmt_ms(res['ttfb']['ttfb_median_ms'])} | {res['upstream_connections']} | {_fmt_errors(res)} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [c.name for c in CONTENDERS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load per body kind (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of wrk load before measuring (1; 0: none)"
    )
    parser.add_argument("--ttfb-requests", type=int, default=50, help="sequential /sse-slow requests (50)")
    parser.add_argument(
        "--slow-pause-ms", type=float, default=50.0, help="pause after the first slow event (50)"
    )
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(names)}")
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "results" / "upstream_clients.json",
        help="JSON results",
    )
    args = parser.parse_args(argv)
    args.contenders = CONTENDERS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        if unknown := sorted(set(wanted) - set(names)):
            parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        args.contenders = [c for c in CONTENDERS if c.name in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools()
    info = machine(VERSIONED_PACKAGES)
    print("## Upstream HTTP clients: one proxy core, wrk and nginx on the other\n")
    print(f"- machine: {machine_line(info)}")
    print("- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(
        f"- load: wrk -t1 -c{args.connections} -d{args.duration:g}s (+{args.warmup:g} s warm-up), POST; "
        f"TTFB: median of {args.ttfb_requests} sequential /sse-slow requests "
        f"(upstream pauses {args.slow_pause_ms:g} ms after the first event)\n",
        flush=True,
    )

    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-upstream-")))
        procs = stack.enter_context(Processes(tmp))
        slow = slow_upstream_argv(SLOW_PORT, len(SSE_EVENTS) - 1, args.slow_pause_ms, 0)
        procs.start("slow-upstream", slow, SLOW_PORT)
        procs.start(
            "nginx", nginx_argv(upstream_nginx_config(tmp, NGINX_PORT, SLOW_PORT), LOAD_CORE), NGINX_PORT
        )
        scripts = {
            "json": wrk_script(tmp, "json", REQUEST_BODY),
            "sse": wrk_script(tmp, "sse", SSE_REQUEST_BODY),
        }

        ports = iter(PROXY_PORTS)
        for contender in args.contenders:
            port = NGINX_PORT if contender.module is None else next(ports)
            if contender.package and importlib.util.find_spec(contender.package) is None:
                log(f"{contender.name}: skipped, {contender.package} is not installed")
                results[contender.name] = {"skipped": f"{contender.package} not installed (pip install it)"}
                continue
            log(f"{contender.name}: measuring ...")
            results[contender.name] = bench_one(contender, port, procs, scripts, args)
            res = results[contender.name]
            log(
                f"{contender.name}: json {res['json']['requests_per_s']:,.0f} req/s, "
                f"sse {res['sse']['requests_per_s']:,.0f} req/s, TTFB {res['ttfb']['ttfb_median_ms']:.2f} ms"
            )

    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("contenders", "output", "only")}
    settings["contenders"] = [asdict(c) for c in args.contenders]
    payload = {"machine": info, "settings": settings, "results": results}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
