"""What one relayed token costs: a stand-in engine streaming like vLLM (one event per write, every
stream one event per step, 1 ms steps), 32 streams at once, relayed by each contender in turn.

    .venv/bin/python bench/token_relay.py                    # ~4 min: every contender, 3 rounds
    .venv/bin/python bench/token_relay.py --only this-proxy,nginx-proxy --rounds 2
    .venv/bin/python bench/token_relay.py --base HEAD~1      # adds this-proxy at a git ref (A/B)

Contenders, measured in turns within each round (so the machine's drift falls on all of them):

- `direct`: wrk straight to the engine (its CPU is the engine's own, for scale);
- `nginx-proxy`: nginx, one worker, keepalive pool, `proxy_buffering off`;
- `vllm-router`: the Rust router (`bench/proxy_overhead.py` installs it into /tmp/bench-vr);
- `this-proxy`: `scripts/start.sh`, ENGINE=external, as shipped (JSON request log, metrics and the
  dashboard's collector on), one worker (`PROXY_WORKERS=1`);
- `this-proxy-2w`: the same with `PROXY_WORKERS=2`;
- `this-proxy@REF` (`--base REF`): the proxy as committed at REF, one worker.

Pinning: single-process contenders and `this-proxy@REF` run on core 0, the engine and wrk on core 1.
`this-proxy-2w` runs on both cores: its second worker shares core 1 with the load.

Figures per contender (medians over the rounds):

- `events/s`: streams completed by wrk × events per stream ÷ the run's seconds: what was relayed.
  Below saturation this is the offered load (streams × 1000 / interval_ms); a contender that cannot
  keep up relays less.
- `CPU µs / event`: CPU time (utime + stime, /proc) of the contender's processes during the run ÷
  events relayed. `× nginx` divides by nginx-proxy's in the same round.
- `busiest process`: the CPU share (of one core) of the contender's busiest process (a worker).
- `ceiling`: events/s ÷ the busiest process's share: what the contender would relay with its busiest
  process saturated, the load spread as measured (for 2 workers also capped at 2 cores by the
  total share). For one process it is the inverse of its CPU per event; for two workers it is
  2× that only if both cost the same per event and share the load evenly: `balance` is the
  workers' CPU shares. A ceiling measured by saturating the proxy needs a load generator that is
  not itself saturated first: on a 2-core machine, with the proxy on both cores, there is none.
- `p50`: wrk's median stream duration (events × interval is the floor).

Before measuring, each contender must relay one stream byte for byte. Writes bench/results/
token_relay.json and .md. Ports 19230-19240.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    HOST,
    LOAD_CORE,
    PROXY_CORE,
    REPO,
    SSE_REQUEST_BODY,
    BenchError,
    Processes,
    base_tree,
    chat_stream_events,
    cpu_seconds,
    fetch,
    fmt_int,
    log,
    machine,
    machine_line,
    markdown_table,
    nginx_argv,
    process_tree,
    proxy_nginx_config,
    run_main,
    run_wrk,
    session,
    wrk_script,
)
from proxy_overhead import router_executable, router_version, this_proxy_env  # noqa: E402

ENGINE_PORT, NGINX_PORT, ROUTER_PORT, ROUTER_METRICS_PORT = 19230, 19231, 19232, 19233
PROXY_PORT, PROXY2_PORT, BASE_PORT = 19234, 19235, 19236
PATH = "/v1/chat/completions"
CONTENDERS = ("direct", "nginx-proxy", "vllm-router", "this-proxy", "this-proxy-2w")
RESULTS = REPO / "bench" / "results"


@dataclass
class Contender:
    name: str
    port: int
    proc: subprocess.Popen
    cores: int = 1
    """The cores its processes may use: its ceiling is capped at that many busy."""
    runs: list[dict] = field(default_factory=list)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} died during the run (exit {self.proc.returncode})")


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds([pid]) for pid in pids}


def measured_run(contender: Contender, script: Path, args: argparse.Namespace) -> dict:
    pids = contender.pids()
    before = _cpu_by_pid(pids)
    started = time.monotonic()
    result = run_wrk(contender.port, PATH, script, args.duration, args.streams)
    wall = time.monotonic() - started
    after = _cpu_by_pid(pids)
    contender.alive()
    per_pid = {pid: after[pid] - before[pid] for pid in pids if pid in after}
    events = result["requests"] * args.events_total
    cpu = sum(per_pid.values())
    shares = sorted((v / wall for v in per_pid.values()), reverse=True)
    res = {
        "events_per_s": events / result["seconds"],
        "cpu_us_per_event": cpu / events * 1e6 if events else None,
        "cpu_share": cpu / wall,
        "shares": [round(s, 3) for s in shares if s >= 0.01],
        "p50_ms": result["p50_ms"],
        "errors": result["errors"],
    }
    busiest = shares[0] if shares else 0.0
    bound = max(busiest, res["cpu_share"] / contender.cores)
    res["ceiling"] = res["events_per_s"] / bound if bound > 0 else None
    return res


def check_relay(contender: Contender, expected: bytes) -> None:
    got = fetch(contender.port, PATH, SSE_REQUEST_BODY)
    if got.status != 200 or got.body != expected:
        raise BenchError(
            f"{contender.name}: the stream was relayed as status {got.status}, {len(got.body)} bytes "
            f"(expected 200, {len(expected)}): {got.body[:200]!r}"
        )


def start(args: argparse.Namespace, procs: Processes, tmp: Path) -> list[Contender]:
    engine_argv = ["taskset", "-c", LOAD_CORE, sys.executable, str(REPO / "bench" / "paced_engine.py"),
                   "--port", str(ENGINE_PORT), "--events", str(args.events),
                   "--interval-ms", f"{args.interval_ms:g}"]  # fmt: skip
    engine = procs.start("paced-engine", engine_argv, ENGINE_PORT, ready_path="/health")
    out: list[Contender] = []
    wanted = args.only.split(",") if args.only else list(CONTENDERS)
    python = {"PYTHON": str(REPO / ".venv" / "bin" / "python")}
    for name in wanted:
        if name == "direct":
            out.append(Contender(name, ENGINE_PORT, engine))
        elif name == "nginx-proxy":
            argv = nginx_argv(proxy_nginx_config(tmp, NGINX_PORT, ENGINE_PORT), PROXY_CORE)
            out.append(Contender(name, NGINX_PORT, procs.start(name, argv, NGINX_PORT)))
        elif name == "vllm-router":
            router = router_executable(args.vllm_router)
            args.router_version = router_version(router)
            argv = ["taskset", "-c", PROXY_CORE, str(router), "--host", HOST, "--port", str(ROUTER_PORT),
                    "--worker-urls", f"http://{HOST}:{ENGINE_PORT}", "--policy", "round_robin",
                    "--log-level", "warning", "--prometheus-port", str(ROUTER_METRICS_PORT)]  # fmt: skip
            out.append(
                Contender(
                    name, ROUTER_PORT, procs.start(name, argv, ROUTER_PORT, ready_path="/health", timeout=120)
                )
            )
        elif name in ("this-proxy", "this-proxy-2w"):
            workers, port = (1, PROXY_PORT) if name == "this-proxy" else (2, PROXY2_PORT)
            cores = PROXY_CORE if workers == 1 else f"{PROXY_CORE},{LOAD_CORE}"
            env = {**this_proxy_env(tmp, name, port, ENGINE_PORT), **python, "PROXY_WORKERS": str(workers)}
            argv = ["taskset", "-c", cores, str(REPO / "scripts" / "start.sh")]
            proc = procs.start(name, argv, port, env, ready_path="/health", timeout=60)
            out.append(Contender(name, port, proc, cores=workers))
        else:
            raise BenchError(f"unknown contender {name!r} (one of {', '.join(CONTENDERS)})")
    if args.base:
        rev, tree = base_tree(args.base, tmp, args.cleanup)
        env = {**this_proxy_env(tmp, "base", BASE_PORT, ENGINE_PORT), **python}
        argv = ["taskset", "-c", PROXY_CORE, str(tree / "scripts" / "start.sh")]
        name = f"this-proxy@{rev}"
        out.append(
            Contender(
                name, BASE_PORT, procs.start(name, argv, BASE_PORT, env, ready_path="/health", timeout=60)
            )
        )
    return out


def summarize(contenders: list[Contender]) -> dict[str, dict]:
    summary = {}
    for c in contenders:

        def med(key: str, runs: list[dict] = c.runs) -> float | None:
            values = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(values) if values else None

        summary[c.name] = {
            "events_per_s": med("events_per_s"),
            "cpu_us_per_event": med("cpu_us_per_event"),
            "cpu_share": med("cpu_share"),
            "busiest": statistics.median(r["shares"][0] if r["shares"] else 0.0 for r in c.runs),
            "ceiling": med("ceiling"),
            "p50_ms": med("p50_ms"),
            "shares": c.runs[len(c.runs) // 2]["shares"] if c.runs else [],
            "errors": sum(sum(r["errors"].values()) for r in c.runs),
        }
    return summary


def report(summary: dict[str, dict], contenders: list[Contender], args: argparse.Namespace) -> str:
    nginx = summary.get("nginx-proxy", {}).get("cpu_us_per_event")
    one = summary.get("this-proxy", {}).get("ceiling")
    rows = []
    for name, s in summary.items():
        rows.append([
            name, fmt_int(s["events_per_s"]),
            "—" if s["cpu_us_per_event"] is None else f"{s['cpu_us_per_event']:.1f}",
            "—" if not nginx or s["cpu_us_per_event"] is None or name == "direct" else f"{s['cpu_us_per_event'] / nginx:.2f}×",
            f"{s['busiest']:.0%}", " / ".join(f"{v:.0%}" for v in s["shares"][:3]) or "—",
            "—" if name == "direct" else fmt_int(s["ceiling"]),
            "—" if not one or name == "direct" or s["ceiling"] is None else f"{s['ceiling'] / one:.2f}×",
            "—" if s["p50_ms"] is None else f"{s['p50_ms']:.0f} ms", str(s["errors"]),
        ])  # fmt: skip
    table = markdown_table(
        ["contender", "events/s", "CPU µs / event", "× nginx", "busiest process", "CPU shares",
         "ceiling events/s", "× this-proxy", "p50 stream", "errors"], rows)  # fmt: skip
    per_round = []
    for c in contenders:
        per_round.append([c.name, *(
            f"{r['events_per_s']:,.0f} ev/s, {r['cpu_us_per_event']:.1f} µs" for r in c.runs)])  # fmt: skip
    rounds = markdown_table(["contender", *(f"round {i}" for i in range(args.rounds))], per_round)
    offered = args.streams * 1000 / args.interval_ms
    head = (
        f"{args.streams} streams of {args.events_total} events (one per write, {args.interval_ms:g} ms "
        f"apart; offered {offered:,.0f} events/s), wrk -t1 -c{args.streams} -d{args.duration:g}s, "
        f"{args.rounds} rounds, contenders in turns; medians"
    )
    return f"{head}\n\n{table}\n\nPer round:\n\n{rounds}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated contenders (default: {','.join(CONTENDERS)})")
    parser.add_argument(
        "--base", help="also run this proxy as committed at this git ref (one worker, core 0)"
    )
    parser.add_argument("--streams", type=int, default=32, help="streams at once: wrk connections (32)")
    parser.add_argument("--events", type=int, default=200, help="data events per stream (200)")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="between the engine's steps (1)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, every contender once each (3)")
    parser.add_argument("--vllm-router", help="vllm-router executable (default: /tmp/bench-vr's)")
    args = parser.parse_args(argv)
    args.events_total = args.events + 1  # [DONE]
    args.router_version = None
    expected = b"".join(chat_stream_events(args.events))
    with session("bench-tokens-") as (tmp, procs, args.cleanup):
        contenders = start(args, procs, tmp)
        script = wrk_script(tmp, "stream", SSE_REQUEST_BODY)
        info = machine(("uvicorn", "uvloop", "httptools"), {"vllm-router": args.router_version or "—"})
        log(machine_line(info))
        for c in contenders:
            check_relay(c, expected)
            run_wrk(c.port, PATH, script, 1.0, args.streams)  # warm-up
        for round_ in range(args.rounds):
            for c in contenders:
                res = measured_run(c, script, args)
                c.runs.append(res)
                log(f"  round {round_} {c.name:16} {res['events_per_s']:>9,.0f} events/s  "
                    f"{res['cpu_us_per_event'] or 0:6.1f} µs/event  shares {res['shares']}  errors {res['errors']}")  # fmt: skip
        summary = summarize(contenders)
        text = report(summary, contenders, args)
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "token_relay.md").write_text(f"- machine: {machine_line(info)}\n\n{text}")
    (RESULTS / "token_relay.json").write_text(json.dumps(
        {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "cleanup"},
         "summary": summary, "runs": {c.name: c.runs for c in contenders}}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    run_main(main)
