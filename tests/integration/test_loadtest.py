"""`python -m app.loadtest` against the real stack (proxy + vLLM on the CPU, tiny text model), run as
users run it: a subprocess, its JSON result file read back.

The in-process faulty server for cut, hung and error-event streams is tests/app/loadtest/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stack import ROOT

pytestmark = pytest.mark.integration

MODEL = "tiny-text"


def loadtest(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, Any] | None]:
    proc = subprocess.run(
        [sys.executable, "-m", "app.loadtest", *args, "--save", str(out), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    saved = sorted(out.glob("loadtest-*.json"))
    return proc, json.loads(saved[-1].read_text()) if saved else None


def test_numbers_are_consistent_and_the_tokens_are_the_engines(text_stack, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nTell me a story about a cat\nWhat is two plus two?\n")
    generated_before = text_stack.engine_metric("vllm:generation_tokens_total")
    proc, report = loadtest(
        tmp_path / "out",
        *("--server-url", text_stack.url, "--prompts-file", str(prompts), "--num-requests", "8"),
        *("--concurrency", "4", "--max-tokens", "6", "--ignore-eos"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Load test results" in proc.stdout and "TTFT" in proc.stdout
    summary, requests = report["summary"], report["requests"]
    assert report["model"] == MODEL  # the first of /v1/models
    assert (summary["requests"], summary["ok"], summary["failed"], len(requests)) == (8, 8, 0, 8)
    for r in requests:
        assert r["ok"] and r["status"] == 200 and r["tokens_from_usage"]
        assert r["completion_tokens"] == 6
        # TTFT at the first event that reports a generated token, whether or not its text is empty
        # (random weights' tokens may all decode to ""): the proxy's rule (app/proxy/sse.py).
        assert r["ttft_s"] is not None and 0 < r["ttft_s"] <= r["latency_s"] and r["tpot_s"] > 0
        # The proxy measured the same request from the inside: the same usage, and less time.
        line = text_stack.request_log(r["request_id"])
        assert (line["prompt_tokens"], line["completion_tokens"]) == (
            r["prompt_tokens"],
            r["completion_tokens"],
        )
        # The proxy's clock starts after the client's and stops after its own bookkeeping (the log
        # line, the accounting), which can end after the client read [DONE]: a few ms of slack.
        assert line["duration_ms"] / 1000 <= r["latency_s"] + 0.01
        assert (line["ttft_ms"] is None) == (r["ttft_s"] is None)  # the same definition of TTFT
        if r["ttft_s"] is not None:
            assert line["ttft_ms"] / 1000 <= r["ttft_s"]
    # Request i asked prompt i % 3 (the blank line is no prompt): the same prompt, the same count.
    by_prompt = {int(r["id"]) % 3: set() for r in requests}
    for r in requests:
        by_prompt[int(r["id"]) % 3].add(r["prompt_tokens"])
    assert all(len(counts) == 1 for counts in by_prompt.values()) and len(by_prompt) == 3
    assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in requests) == 48
    assert summary["prompt_tokens"] == sum(r["prompt_tokens"] for r in requests)
    # What the engine counted, through the proxy's /metrics (the tool) and directly (this test).
    assert summary["engine"]["generation_tokens"] == 48
    assert summary["engine"]["prompt_tokens"] == summary["prompt_tokens"]
    assert text_stack.engine_metric("vllm:generation_tokens_total") - generated_before == 48
    with_text = sum(1 for r in requests if r["ttft_s"] is not None)
    assert with_text >= 1
    for key, count in (("ttft_s", with_text), ("tpot_s", with_text), ("latency_s", 8)):
        stats = summary[key]
        assert stats["count"] == count
        assert stats["min"] <= stats["median"] <= stats["p95"] <= stats["p99"] <= stats["max"]
        assert stats["min"] <= stats["mean"] <= stats["max"]
    assert summary["output_throughput"] == pytest.approx(48 / summary["duration_s"])


def test_yaml_config_with_prompts_and_flags_over_it(text_stack, tmp_path):
    out = tmp_path / "results"
    config = tmp_path / "perf.yaml"
    config.write_text(
        f"""
server:
  url: "{text_stack.url}"
  model: "{MODEL}"
test_params:
  max_tokens: 4
  temperature: 0.7
  concurrent_requests: 2
  stream: false
  num_requests: 6
prompts:
  - "What is artificial intelligence?"
  - "Explain machine learning."
output:
  log_dir: "{out}"
  save_individual_metrics: false
  console_output: true
"""
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.loadtest",
            "--config",
            str(config),
            "--num-requests",
            "3",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Results saved to" in proc.stdout
    (saved,) = out.glob("loadtest-*.json")
    report = json.loads(saved.read_text())
    assert "requests" not in report  # save_individual_metrics: false
    assert report["options"]["num_requests"] == 3 and report["concurrency"] == 2  # the flag won
    summary = report["summary"]
    assert (summary["requests"], summary["ok"]) == (3, 3)
    assert summary["ttft_s"]["count"] == 0 and summary["latency_s"]["count"] == 3  # no stream: no TTFT
    assert 0 < summary["completion_tokens"] <= 12


def test_multi_round_hit_rate_rises_from_round_two(text_stack, tmp_path):
    """The CPU backend caches in blocks of 128 tokens: the shared system prompt is a little over one
    block, each question longer, so round 1 can hit at most the system prompt of the other user, and
    round 2 on at least round 1's whole prompt."""
    proc, report = loadtest(
        tmp_path / "out",
        *("--server-url", text_stack.url, "--users", "2", "--rounds", "3", "--system-prompt-tokens", "150"),
        *("--question-len", "200", "--answer-len", "4", "--ignore-eos"),
    )
    assert proc.returncode == 0, proc.stderr
    rounds = report["rounds"]
    assert [(r["round"], r["requests"], r["ok"]) for r in rounds] == [(1, 2, 2), (2, 2, 2), (3, 2, 2)]
    rates = [r["prefix_cache_hit_rate"] for r in rounds]
    assert all(rate is not None for rate in rates), rates
    assert rates[1] > rates[0] and rates[2] > rates[0], rates
    assert rates[2] >= 0.5, rates  # most of round 3's prompt is rounds 1 and 2
    # The history grows: each user's prompt is longer every round.
    for user in (0, 1):
        counts = [r["prompt_tokens"] for r in report["requests"] if r["user"] == user]
        assert len(counts) == 3 and counts[0] < counts[1] < counts[2], counts
    for r in rounds:  # a TTFT for every answer: each streamed tokens, text or not
        assert r["ttft_s"]["count"] == r["ok"] == 2
    assert "Per round" in proc.stdout
    whole = report["summary"]["engine"]
    assert whole["prefix_cache_queries"] == sum(r["engine"]["prefix_cache_queries"] for r in rounds)


def test_compare_runs_the_same_schedule_on_both_sides(text_stack, tmp_path):
    proc, report = loadtest(
        tmp_path / "out",
        *("--server-url", text_stack.url, "--compare", text_stack.engine_url, "--num-prompts", "4"),
        *("--concurrency", "2", "--compare-block", "2", "--max-tokens", "3", "--ignore-eos"),
    )
    assert proc.returncode == 0, proc.stderr
    a, b = report["summary"], report["compare"]["summary"]
    assert report["compare"]["url"] == text_stack.engine_url
    assert (a["ok"], b["ok"]) == (4, 4)
    assert a["completion_tokens"] == b["completion_tokens"] == 12
    assert a["engine"]["generation_tokens"] == b["engine"]["generation_tokens"] == 12  # each side's own delta
    ratios = report["compare"]["ratios"]
    assert ratios["ttft_s"]["median"] == pytest.approx(b["ttft_s"]["median"] / a["ttft_s"]["median"])
    assert "Side by side" in proc.stdout
    requests = report["requests"]
    # Blocks of two requests, A B then B A: the sides' order in time is a a b b b b a a.
    assert [r["side"] for r in sorted(requests, key=lambda r: r["start_s"])] == list("aabbbbaa")
    # A went through the proxy (its log has the request), B straight to the engine.
    for r in requests:
        if r["side"] == "a":
            assert text_stack.request_log(r["request_id"])["completion_tokens"] == 3
    logged = {rec.get("request_id") for rec in text_stack.records() if rec.get("event") == "request"}
    assert not logged & {r["request_id"] for r in requests if r["side"] == "b"}


def test_errors_from_the_engine_make_the_exit_code_nonzero(text_stack, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n" + "word " * 6000 + "\n")  # longer than MAX_MODEL_LEN=4096
    proc, report = loadtest(
        tmp_path / "out",
        *("--server-url", text_stack.url, "--prompts-file", str(prompts), "--max-tokens", "3"),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error rate 50.00 %" in proc.stderr and "above --max-error-rate" in proc.stderr
    summary = report["summary"]
    assert (summary["requests"], summary["ok"], summary["failed"]) == (2, 1, 1)
    (error,) = summary["errors"]
    assert error["status"] == 400 and "4096" in error["error"], error  # the engine's own message
    assert summary["ttft_s"]["count"] == 1 and summary["failed_latency_s"]["count"] == 1
    assert error["error"] in proc.stdout  # listed in the table too
