"""The proxy's memory over many paced streams: RSS every chunk of load, this tree beside a base ref.

    .venv/bin/python bench/paced_soak.py --base 9ebfc61 --minutes 6

`bench/paced_engine.py` streams as vLLM does (one SSE event per write, 1 ms steps, 201 events a
stream) on core 1 with wrk (`-c32`); `this-proxy` (this tree) and `this-proxy@REF` run as shipped
(`scripts/start.sh`, ENGINE=external, one worker unless `--workers`, JSON request log, metrics,
dashboard history) on core 0. They take turns: a chunk of load (`--chunk` seconds) on one, then on the other, until each
had `--minutes` of load, and after each chunk the RSS of its process tree is read. Streams that
come in one read (`proxy_overhead.py`'s soak) miss what long paced streams do to the heap.

- `RSS`: after the first chunk (warm-up), then at the end; `growth`: between those, per 10,000
  streams and per minute of load.

Writes bench/results/paced_soak.json and .md. Ports 19250-19252.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    REPO,
    SSE_REQUEST_BODY,
    Processes,
    base_tree,
    log,
    machine,
    machine_line,
    markdown_table,
    process_tree,
    rss_bytes,
    run_main,
    run_wrk,
    session,
    wrk_script,
)
from proxy_overhead import this_proxy_env  # noqa: E402

ENGINE_PORT, PROXY_PORT, BASE_PORT = 19250, 19251, 19252
PATH = "/v1/chat/completions"
RESULTS = REPO / "bench" / "results"
MIB = 1024 * 1024


@dataclass
class Contender:
    name: str
    port: int
    proc: subprocess.Popen
    points: list[dict] = field(default_factory=list)
    """After each chunk: streams so far, seconds of load so far, RSS (bytes), errors."""

    @property
    def streams(self) -> int:
        return self.points[-1]["streams"] if self.points else 0


def start(args: argparse.Namespace, procs: Processes, tmp: Path) -> list[Contender]:
    engine_argv = ["taskset", "-c", LOAD_CORE, sys.executable, str(REPO / "bench" / "paced_engine.py"),
                   "--port", str(ENGINE_PORT), "--events", str(args.events), "--interval-ms", "1"]  # fmt: skip
    procs.start("paced-engine", engine_argv, ENGINE_PORT, ready_path="/health")
    python = {"PYTHON": str(REPO / ".venv" / "bin" / "python"), "PROXY_WORKERS": str(args.workers)}
    trees = [("this-proxy", REPO, PROXY_PORT)]
    if args.base:
        rev, tree = base_tree(args.base, tmp, args.cleanup)
        trees.append((f"this-proxy@{rev}", tree, BASE_PORT))
    out = []
    for name, tree, port in trees:
        env = {**this_proxy_env(tmp, name, port, ENGINE_PORT), **python}
        argv = ["taskset", "-c", PROXY_CORE, str(tree / "scripts" / "start.sh")]
        out.append(
            Contender(name, port, procs.start(name, argv, port, env, ready_path="/health", timeout=60))
        )
    return out


def chunk(c: Contender, script: Path, args: argparse.Namespace) -> None:
    res = run_wrk(c.port, PATH, script, args.chunk, args.streams)
    before = c.points[-1] if c.points else {"streams": 0, "seconds": 0.0, "errors": 0}
    errors = sum(res["errors"].values())
    c.points.append({
        "streams": before["streams"] + res["requests"],
        "seconds": before["seconds"] + res["seconds"],
        "rss": rss_bytes(process_tree(c.proc.pid)),
        "errors": before["errors"] + errors,
    })  # fmt: skip


def summarize(c: Contender) -> dict:
    warm, end = c.points[0], c.points[-1]
    streams = end["streams"] - warm["streams"]
    minutes = (end["seconds"] - warm["seconds"]) / 60
    grown = end["rss"] - warm["rss"]
    return {
        "streams": end["streams"],
        "rss_warm_mib": warm["rss"] / MIB,
        "rss_end_mib": end["rss"] / MIB,
        "rss_peak_mib": max(p["rss"] for p in c.points) / MIB,
        "growth_mib_per_10k_streams": grown / MIB / streams * 10_000 if streams else None,
        "growth_mib_per_min": grown / MIB / minutes if minutes else None,
        "errors": end["errors"],
    }


def report(contenders: list[Contender], args: argparse.Namespace) -> str:
    rows = []
    for c in contenders:
        s = summarize(c)
        rows.append([c.name, f"{s['streams']:,}", f"{s['rss_warm_mib']:.1f}", f"{s['rss_end_mib']:.1f}",
                     f"{s['rss_peak_mib']:.1f}", f"{s['growth_mib_per_10k_streams']:+.2f}",
                     f"{s['growth_mib_per_min']:+.2f}", str(s["errors"])])  # fmt: skip
    head = ["contender", "streams", "RSS after warm-up (MiB)", "RSS at end", "peak", "MiB per 10k streams",
            "MiB per min", "errors"]  # fmt: skip
    text = [
        f"{args.events + 1}-event streams (one event per write, 1 ms apart), wrk -c{args.streams}, "
        f"{args.workers} proxy worker{'s' if args.workers > 1 else ''}, "
        f"{args.chunk:g} s chunks{' in turns' if len(contenders) > 1 else ''}, {args.minutes:g} min of load"
        f"{' each' if len(contenders) > 1 else ''}",
        "",
        markdown_table(head, rows, "lrrrrrrr"),
        "",
        "RSS after each chunk (MiB):",
        "",
    ]
    width = max(len(c.points) for c in contenders)
    step_rows = []
    for i in range(width):
        row = [str(i + 1)]
        for c in contenders:
            p = c.points[i] if i < len(c.points) else None
            row.append(f"{p['streams']:,} streams, {p['rss'] / MIB:.1f}" if p else "")
        step_rows.append(row)
    text.append(
        markdown_table(["chunk", *(c.name for c in contenders)], step_rows, "r" + "l" * len(contenders))
    )
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="also run the proxy as committed at this git ref, in turns")
    parser.add_argument("--minutes", type=float, default=6.0, help="minutes of load per contender (6)")
    parser.add_argument("--chunk", type=float, default=30.0, help="seconds of load between RSS readings (30)")
    parser.add_argument("--streams", type=int, default=32, help="streams at once: wrk connections (32)")
    parser.add_argument("--events", type=int, default=200, help="data events per stream (200)")
    parser.add_argument(
        "--workers", type=int, default=1, help="PROXY_WORKERS: RSS is their tree's, summed (1)"
    )
    args = parser.parse_args(argv)
    chunks = max(2, round(args.minutes * 60 / args.chunk))
    with session("bench-soak-") as (tmp, procs, args.cleanup):
        contenders = start(args, procs, tmp)
        script = wrk_script(tmp, "stream", SSE_REQUEST_BODY)
        info = machine(("uvicorn", "uvloop", "httptools"))
        log(machine_line(info))
        for i in range(chunks):
            for c in contenders:
                chunk(c, script, args)
                p = c.points[-1]
                log(f"  chunk {i + 1}/{chunks} {c.name:18} {p['streams']:>9,} streams  "
                    f"RSS {p['rss'] / MIB:6.1f} MiB  errors {p['errors']}")  # fmt: skip
        text = report(contenders, args)
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "paced_soak.md").write_text(f"- machine: {machine_line(info)}\n\n{text}\n")
    (RESULTS / "paced_soak.json").write_text(json.dumps(
        {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "cleanup"},
         "summary": {c.name: summarize(c) for c in contenders},
         "points": {c.name: c.points for c in contenders}}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    run_main(main)
