"""A/B: this proxy as committed at a git ref against the working tree, side by side in one run.

    .venv/bin/python bench/ab.py                       # HEAD vs the working tree, json and sse at c=32
    .venv/bin/python bench/ab.py --base HEAD~3 --rounds 8 --kinds sse

Run-to-run noise on this machine (a shared VM) is larger than most single changes: two quick runs
of `proxy_overhead.py` minutes apart differ by 20%. Here both versions run at once, in the shipped
configuration (`scripts/start.sh`, ENGINE=external, JSON request log, metrics on), each pinned to
core 0 in turn against the same nginx upstream (core 1, with wrk), alternating A B B A per round so
drift falls on both. Printed: each round's req/s and the proxy's CPU µs per request (its processes'
utime + stime over wrk's requests: not tied to the share of the core other jobs leave it), the
medians, and B/A per round and overall (for CPU, lower is better).
Uses ports 19210-19212.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    BODY_HEADER,
    LOAD_CORE,
    PROXY_CORE,
    REPO,
    REQUEST_BODY,
    SSE_REQUEST_BODY,
    base_tree,
    cpu_seconds,
    log,
    nginx_argv,
    process_tree,
    run_main,
    run_wrk,
    session,
    upstream_nginx_config,
    wrk_script,
)
from proxy_overhead import LONG_BODY, PATH, SLOW_PORT, this_proxy_env  # noqa: E402

UPSTREAM_PORT, A_PORT, B_PORT = 19210, 19211, 19212


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git ref for A (HEAD); B is the working tree")
    parser.add_argument("--kinds", default="json,sse", help="comma-separated: json, sse, long (json,sse)")
    parser.add_argument("--rounds", type=int, default=5, help="A B B A rounds per kind (5)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    return parser.parse_args(argv)


def per_round(series: dict[str, list[float]]) -> list[float]:
    """B/A of each round (A B B A: two figures of each side a round)."""
    a, b = series["a"], series["b"]
    return [statistics.fmean(b[i : i + 2]) / statistics.fmean(a[i : i + 2]) for i in range(0, len(a), 2)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with session("bench-ab-") as (tmp, procs, cleanup):
        rev, tree = base_tree(args.base, tmp, cleanup)
        conf = upstream_nginx_config(tmp, UPSTREAM_PORT, SLOW_PORT, LONG_BODY)
        procs.start("upstream", nginx_argv(conf, LOAD_CORE), UPSTREAM_PORT, ready_path="/health")
        python = {"PYTHON": str(REPO / ".venv" / "bin" / "python")}
        started = {}
        for name, root, port in (("a", tree, A_PORT), ("b", REPO, B_PORT)):
            env = {**this_proxy_env(tmp, name, port, UPSTREAM_PORT), **python}
            argv_ = ["taskset", "-c", PROXY_CORE, str(root / "scripts" / "start.sh")]
            started[name] = procs.start(name, argv_, port, env, ready_path="/health", timeout=60)
        pids = {name: process_tree(proc.pid) for name, proc in started.items()}
        bodies = {"json": (REQUEST_BODY, {}), "sse": (SSE_REQUEST_BODY, {BODY_HEADER: "sse"}),
                  "long": (SSE_REQUEST_BODY, {BODY_HEADER: "long"})}  # fmt: skip
        log(f"A = {args.base} ({rev}), B = working tree; c={args.connections}, {args.duration:g} s runs")
        for kind in args.kinds.split(","):
            body, headers = bodies[kind]
            script = wrk_script(tmp, kind, body, headers)
            for port in (A_PORT, B_PORT):  # warm-up
                run_wrk(port, PATH, script, 1.0, args.connections)
            got: dict[str, list[float]] = {"a": [], "b": []}
            cpu: dict[str, list[float]] = {"a": [], "b": []}  # CPU µs per request
            for round_ in range(args.rounds):
                for name in ("a", "b", "b", "a"):
                    port = A_PORT if name == "a" else B_PORT
                    before = cpu_seconds(pids[name])
                    run = run_wrk(port, PATH, script, args.duration, args.connections)
                    used = cpu_seconds(pids[name]) - before
                    got[name].append(run["requests_per_s"])
                    cpu[name].append(used / max(run["requests"], 1) * 1e6)
                a, b = got["a"][-2:], got["b"][-2:]
                ca, cb = statistics.fmean(cpu["a"][-2:]), statistics.fmean(cpu["b"][-2:])
                log(f"  {kind} round {round_}: A {statistics.fmean(a):8,.0f}  B {statistics.fmean(b):8,.0f} "
                    f"req/s  B/A {statistics.fmean(b) / statistics.fmean(a):.3f}; "
                    f"CPU µs/req A {ca:6.1f}  B {cb:6.1f}  B/A {cb / ca:.3f}")  # fmt: skip
            pairs, cpu_pairs = per_round(got), per_round(cpu)
            a_med, b_med = statistics.median(got["a"]), statistics.median(got["b"])
            ca_med, cb_med = statistics.median(cpu["a"]), statistics.median(cpu["b"])
            print(
                f"{kind:5} c={args.connections}: A {a_med:,.0f} req/s, B {b_med:,.0f} req/s (medians); "
                f"B/A {b_med / a_med:.3f}, per round {min(pairs):.3f}-{max(pairs):.3f}; "
                f"CPU µs/req A {ca_med:.1f}, B {cb_med:.1f}: B/A {cb_med / ca_med:.3f}, "
                f"per round {min(cpu_pairs):.3f}-{max(cpu_pairs):.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    run_main(main)
