"""The summary table printed at the end of a run, and the JSON result file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from app.loadtest.stats import STAT_KEYS

WIDTH = 78


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _stats_rows(summary: dict[str, Any], failed: bool = True) -> list[str]:
    rows = [f"{'(ms)':<22}" + "".join(f"{k:>9}" for k in STAT_KEYS) + f"{'n':>8}"]
    names = [("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("End-to-end latency", "latency_s")]
    if failed and summary["failed"]:
        names.append(("Latency of failed", "failed_latency_s"))
    for label, key in names:
        stats = summary[key]
        rows.append(
            f"{label:<22}" + "".join(f"{_ms(stats[k]):>9}" for k in STAT_KEYS) + f"{stats['count']:>8}"
        )
    return rows


def _totals_rows(summary: dict[str, Any]) -> list[str]:
    def line(label: str, value: str) -> str:
        return f"{label:<28}{value}"

    return [
        line(
            "Requests",
            f"{summary['requests']} ({summary['ok']} ok, {summary['failed']} failed, "
            f"error rate {summary['error_rate'] * 100:.2f} %)",
        ),  # fmt: skip
        line("Duration", f"{summary['duration_s']:.2f} s"),
        line("Prompt tokens", f"{summary['prompt_tokens']:,}"),
        line("Completion tokens", f"{summary['completion_tokens']:,}"),
        line("Request throughput", f"{_num(summary['request_throughput'])} req/s"),
        line("Output token throughput", f"{_num(summary['output_throughput'])} tok/s"),
        line("Total token throughput", f"{_num(summary['total_token_throughput'])} tok/s"),
        line("Prefix cache hit rate", _rate(summary["prefix_cache_hit_rate"])),
    ]


def _errors_rows(summary: dict[str, Any]) -> list[str]:
    if not summary["errors"]:
        return []
    rows = ["Errors (count, message):"]
    for err in summary["errors"][:10]:
        rows.append(f"  {err['count']:>6}  {err['error']}")
    if len(summary["errors"]) > 10:
        rows.append(f"  ... and {len(summary['errors']) - 10} other messages (see the JSON file)")
    return rows


def _rounds_rows(rounds: list[dict[str, Any]]) -> list[str]:
    head = f"{'Round':>5}{'requests':>10}{'failed':>8}{'TTFT mean':>11}{'median':>9}{'p95':>9}"
    head += f"{'latency mean':>14}{'prompt tok':>12}{'prefix hit':>12}"
    rows = [head]
    for r in rounds:
        ttft = r["ttft_s"]
        rows.append(
            f"{r['round']:>5}{r['requests']:>10}{r['failed']:>8}{_ms(ttft['mean']):>11}{_ms(ttft['median']):>9}"
            f"{_ms(ttft['p95']):>9}{_ms(r['latency_s']['mean']):>14}{r['prompt_tokens']:>12,}"
            f"{_rate(r['prefix_cache_hit_rate']):>12}"
        )
    return rows


def _compare_rows(a: dict[str, Any], b: dict[str, Any], ratios: dict[str, Any]) -> list[str]:
    rows = [f"{'':<28}{'A':>14}{'B':>14}{'B/A':>10}"]

    def line(label: str, x: str, y: str, ratio: float | None) -> None:
        rows.append(f"{label:<28}{x:>14}{y:>14}{_ratio(ratio):>10}")

    line("Requests ok", str(a["ok"]), str(b["ok"]), None)
    line("Requests failed", str(a["failed"]), str(b["failed"]), None)
    line("Request throughput (req/s)", _num(a["request_throughput"]), _num(b["request_throughput"]),
         ratios["request_throughput"])  # fmt: skip
    line("Output throughput (tok/s)", _num(a["output_throughput"]), _num(b["output_throughput"]),
         ratios["output_throughput"])  # fmt: skip
    for label, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("Latency", "latency_s")):
        for stat in ("mean", "median", "p95", "p99"):
            line(f"{label} {stat} (ms)", _ms(a[key][stat]), _ms(b[key][stat]), ratios[key][stat])
    line("Prefix cache hit rate", _rate(a["prefix_cache_hit_rate"]), _rate(b["prefix_cache_hit_rate"]), None)
    return rows


def render(report: dict[str, Any]) -> str:
    """The console summary of a report (Run.report)."""
    bar, thin = "=" * WIDTH, "-" * WIDTH
    opts = report["options"]
    how = f"{'stream' if opts['stream'] else 'no stream'}, concurrency {report['concurrency']}"
    how += f", qps {opts['qps']:g} (Poisson)" if opts["qps"] else ", no arrival rate limit"
    if report["mode"] == "multi-round":
        how += f"; {report['users']} users x {report['rounds_run']} rounds"
        how += ", history" if opts["history"] else ", no history"
    lines = [bar, " Load test results ".center(WIDTH, "="), bar]
    lines.append(f"{'Server (A)' if 'compare' in report else 'Server':<28}{report['url']}")
    if "compare" in report:
        lines.append(f"{'Server (B)':<28}{report['compare']['url']}")
    lines += [f"{'Model':<28}{report['model']}", f"{'Mode':<28}{report['mode']}: {how}"]
    lines += [f"{'Note':<28}{note}" for note in report["notes"]]
    sides = [("A: " if "compare" in report else "", report)]
    if "compare" in report:
        sides.append(("B: ", report["compare"]))
    for prefix, side in sides:
        lines += [thin, f"{prefix}{side['url']}"] if prefix else [thin]
        lines += _totals_rows(side["summary"])
        lines += [thin, *_stats_rows(side["summary"])]
        if "rounds" in side:
            lines += [thin, "Per round (TTFT and latency in ms):", *_rounds_rows(side["rounds"])]
        if err := _errors_rows(side["summary"]):
            lines += [thin, *err]
    if "compare" in report:
        lines += [thin, "Side by side (ratios B/A):"]
        lines += _compare_rows(report["summary"], report["compare"]["summary"], report["compare"]["ratios"])
    lines.append(bar)
    lines.append("Percentiles are over successful requests; failed ones are counted above and listed.")
    return "\n".join(lines)


def save(report: dict[str, Any], directory: str | Path) -> Path:
    """Write the report as `loadtest-<UTC time>-<run id>.json` into `directory` (created)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = out / f"loadtest-{stamp}-{report['run_id']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path
