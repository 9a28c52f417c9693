"""Is the load tester the bottleneck? `python -m app.loadtest` against canned upstreams, beside wrk.

    .venv/bin/python bench/loadtest_client.py                 # ~1 min
    .venv/bin/python bench/loadtest_client.py --duration 3

1. Ceiling. nginx (one worker, core 1) answers every chat completion with the canned 64-event vLLM
   stream (`harness.SSE_BODY`, 62 tokens) or the canned JSON body. wrk and the load tester, each on
   core 0 in turn, drive it at c=32. The load tester's req/s is its CPU cost per request inverted (it
   parses every event as JSON); `x wrk` is its ratio to wrk's in the same run.
2. Timing. `slow_upstream.py` (core 1) sends the first token at once, then one every 10 ms (its
   sleeps overshoot on a busy machine, so 10 ms is not the truth). At c=1 a bare reference client
   (`harness.HttpClient`: a socket and httptools, no JSON; first body byte = first token, last byte =
   end) and the load tester take turns, ref tool tool ref, on core 0: the load tester's TTFT and TPOT
   minus the reference's are its own error. At c=32 the load tester alone, for scale.

Writes `bench/results/loadtest_client.json`. Ports 19220-19222.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    LOAD_CORE,
    MODEL,
    PROXY_CORE,
    REPO,
    REQUEST_BODY,
    SSE_REQUEST_BODY,
    HttpClient,
    Processes,
    log,
    machine,
    machine_line,
    nginx_argv,
    parse_wrk,
    require_tools,
    run_main,
    slow_upstream_argv,
    upstream_nginx_config,
    wrk_argv,
    wrk_script,
)

SSE_PORT, JSON_PORT, SLOW_PORT = 19220, 19221, 19222
TOKEN_DELAY_MS = 10.0


def loadtest(port: int, tmp: Path, *args: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"lt-{port}-", dir=tmp))
    argv = ["taskset", "-c", PROXY_CORE, sys.executable, "-m", "app.loadtest", "--server-url",
            f"http://127.0.0.1:{port}", "--model", MODEL, "--metrics-url", "off", "--save", str(out),
            "--no-console-output", "--no-progress", *args]  # fmt: skip
    subprocess.run(argv, cwd=REPO, check=True, timeout=600)
    (saved,) = out.glob("loadtest-*.json")
    return json.loads(saved.read_text())["summary"]


def wrk(port: int, tmp: Path, duration: float, connections: int) -> dict:
    argv = wrk_argv(
        port, "/v1/chat/completions", wrk_script(tmp, f"wrk-{port}", REQUEST_BODY), duration, connections
    )
    argv[2] = PROXY_CORE  # wrk where the load tester runs
    return parse_wrk(
        subprocess.run(argv, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    )


def reference(port: int, n: int) -> dict:
    """TTFT and TPOT medians of `n` sequential streams read by the bare client (tokens: 62)."""
    ttft, tpot = [], []
    with HttpClient(port) as client:
        for _ in range(n):
            got = client.request("POST", "/v1/chat/completions", SSE_REQUEST_BODY)
            ttft.append(got.ttfb_s)
            tpot.append((got.total_s - got.ttfb_s) / 61)
    return {"ttft_median": statistics.median(ttft), "tpot_median": statistics.median(tpot)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run (5)")
    parser.add_argument(
        "--connections", type=int, default=32, help="wrk connections and load tester concurrency"
    )
    parser.add_argument("--timing-requests", type=int, default=40, help="requests per timing run (40)")
    args = parser.parse_args()
    require_tools()
    os.sched_setaffinity(0, {int(PROXY_CORE)})  # the reference client runs here, where the tool does
    info = machine(["aiohttp", "orjson"])
    log(machine_line(info))
    results: dict = {"machine": info, "settings": vars(args), "ceiling": {}, "timing": {}}
    with tempfile.TemporaryDirectory(prefix="bench-lt-") as name, Processes(Path(name)) as procs:
        tmp = Path(name)
        tmp.chmod(0o755)  # nginx's worker may run as `nobody`
        for kind, port in (("sse", SSE_PORT), ("json", JSON_PORT)):
            conf = upstream_nginx_config(tmp / kind, port, SLOW_PORT)
            conf.write_text(conf.read_text().replace("default /canned/json;", f"default /canned/{kind};"))
            procs.start(f"nginx-{kind}", nginx_argv(conf, LOAD_CORE), port, ready_path="/health")
        procs.start("slow", slow_upstream_argv(SLOW_PORT, 64, TOKEN_DELAY_MS, TOKEN_DELAY_MS), SLOW_PORT)
        c = str(args.connections)
        for kind, port in (("sse", SSE_PORT), ("json", JSON_PORT)):
            ref = wrk(port, tmp, args.duration, args.connections)
            mode = ["--stream"] if kind == "sse" else ["--no-stream"]
            tool = loadtest(port, tmp, *mode, "--concurrency", c, "--duration", f"{args.duration:g}")
            results["ceiling"][kind] = {"wrk": ref, "loadtest": tool}
            log(f"{kind}: wrk {ref['requests_per_s']:,.0f} req/s, load tester {tool['request_throughput']:,.0f} "
                f"req/s ({tool['output_throughput']:,.0f} tokens/s), failed {tool['failed']}")  # fmt: skip
        n = str(args.timing_requests)
        turns = []
        for who in ("ref", "tool", "tool", "ref"):
            if who == "ref":
                turns.append(("ref", reference(SLOW_PORT, args.timing_requests)))
            else:
                tool = loadtest(SLOW_PORT, tmp, "--concurrency", "1", "--num-requests", n)
                turns.append(
                    (
                        "tool",
                        {"ttft_median": tool["ttft_s"]["median"], "tpot_median": tool["tpot_s"]["median"]},
                    )
                )
        for key in ("ttft_median", "tpot_median"):
            ref = statistics.mean(t[key] for w, t in turns if w == "ref")
            tool = statistics.mean(t[key] for w, t in turns if w == "tool")
            results["timing"][key] = {"reference": ref, "loadtest": tool, "added": tool - ref}
            log(f"c=1 {key}: reference {ref * 1e3:.3f} ms, load tester {tool * 1e3:.3f} ms")
        results["timing"]["turns"] = turns
        results["timing"]["c32"] = loadtest(SLOW_PORT, tmp, "--concurrency", c, "--num-requests", n)
    lines = [
        f"| body (c={c}) | wrk req/s | load tester req/s | x wrk | load tester tokens/s |",
        "|---|--:|--:|--:|--:|",
    ]
    for kind, r in results["ceiling"].items():
        w, t = r["wrk"]["requests_per_s"], r["loadtest"]["request_throughput"]
        lines.append(
            f"| {kind} | {w:,.0f} | {t:,.0f} | {t / w:.3f} | {r['loadtest']['output_throughput']:,.0f} |"
        )
    lines += [
        "",
        "| c=1, median | reference client | load tester | added by the load tester |",
        "|---|--:|--:|--:|",
    ]
    for key, label in (("ttft_median", "TTFT"), ("tpot_median", "TPOT")):
        r = results["timing"][key]
        lines.append(f"| {label} | {r['reference'] * 1e3:.3f} ms | {r['loadtest'] * 1e3:.3f} ms | "
                     f"{r['added'] * 1e3:+.3f} ms |")  # fmt: skip
    c32 = results["timing"]["c32"]
    lines.append(f"\nc={c}, load tester: TTFT p50 {c32['ttft_s']['median'] * 1e3:.2f} ms, p99 "
                 f"{c32['ttft_s']['p99'] * 1e3:.2f} ms; TPOT p50 {c32['tpot_s']['median'] * 1e3:.3f} ms, p99 "
                 f"{c32['tpot_s']['p99'] * 1e3:.3f} ms (upstream schedule: {TOKEN_DELAY_MS:g} ms)")  # fmt: skip
    print("\n".join(lines))
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "loadtest_client.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
