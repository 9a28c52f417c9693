"""`python -m app.profiles list`: what a model gets on a set of GPUs, before running anything.

    python -m app.profiles list --model meta-llama/Llama-3.1-8B-Instruct --gpus 1xL4-24GB
    python -m app.profiles list --model /models/my-finetune --gpus 8xH100-80GB --json
    python -m app.profiles list --gpus auto             # every profile, on the GPUs NVML finds

No GPU and no network needed for a local model directory or a model already in the Hugging Face
cache (declare the GPUs with --gpus). A Hub id not in the cache is looked up on the Hub (its
metadata and config.json only) unless HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from app.profiles import manifest
from app.profiles.hardware import GpuSet, GpuSpecError, from_report, parse_gpus
from app.profiles.model_facts import ModelFacts, ModelFactsError, read_local
from app.profiles.select import INCOMPATIBLE, LOW_MEMORY, RUNNABLE, Candidate, candidates
from app.profiles.sizing import kv_bytes_per_token, serve_dtype, weights_bytes

TITLES = {
    RUNNABLE: "Compatible and runnable",
    LOW_MEMORY: "Compatible, short on memory",
    INCOMPATIBLE: "Incompatible",
}


def _gpus(spec: str) -> GpuSet:
    if spec == "auto":
        from app import gpu

        return from_report(gpu.probe())
    return parse_gpus(spec)


def _facts(model: str, revision: str | None) -> tuple[ModelFacts | None, str | None]:
    """The model's facts, and a note when they could not be had (then only profiles' own
    declarations are checked)."""
    if Path(model).expanduser().is_dir():
        try:
            return read_local(Path(model).expanduser()), None
        except ModelFactsError as exc:
            return None, str(exc)
    from app import preflight

    try:
        pre = preflight.model_facts(
            model,
            revision=revision,
            token=os.environ.get("HF_TOKEN") or None,
            offline=os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except preflight.PreflightError as exc:
        return None, str(exc)
    note = "; ".join(pre.notes) or None
    if pre.facts is None and note is None:
        note = "the model's config.json could not be had"
    return pre.facts, note


def _model_line(model: str, facts: ModelFacts) -> str:
    size = weights_bytes(facts)
    weights = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    kv = kv_bytes_per_token(facts) / 1024
    arch = ", ".join(facts.architectures) or facts.model_type
    quant = f" {facts.quant_method}" if facts.quant_method else f" {serve_dtype(facts, None)}"
    return (
        f"Model: {model} ({arch}; {weights} of{quant} weights, {kv:.4g} KiB of KV cache per token, "
        f"context up to {facts.max_model_len})"
    )


def _row(c: Candidate, first: bool) -> str:
    name = c.profile or "(computed defaults)"
    mark = "*" if first else " "
    tp = f"tp={c.tensor_parallel_size or '-'}" + (
        f" pp={c.pipeline_parallel_size}" if c.pipeline_parallel_size > 1 else ""
    )
    ctx = f"ctx {c.max_model_len}" if c.max_model_len else "ctx -"
    gb = f"{c.gb_per_gpu:.1f} GB/GPU" if c.gb_per_gpu is not None else "? GB/GPU"
    line = f"  {mark} {name:<34} {tp:<10} {ctx:<12} {gb:<13}"
    if c.group == LOW_MEMORY and c.fits_max_model_len:
        line += f" would fit with ctx {c.fits_max_model_len}"
    if c.group != RUNNABLE:
        line += f"\n      {c.reason}"
    return line


def list_command(args: argparse.Namespace) -> int:
    try:
        gpus = _gpus(args.gpus)
        entries = manifest.load(Path(args.profiles_file) if args.profiles_file else None)
    except (GpuSpecError, manifest.ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    facts, note = _facts(args.model, args.revision) if args.model else (None, None)
    if args.model:
        local = Path(args.model).expanduser().is_dir()
        profiles = manifest.profiles_for(
            entries, None if local else args.model, facts.architectures if facts else None
        )
    else:  # every profile of the manifest, judged by what it declares
        profiles = [manifest.as_profile(raw, "id", e.source) for e in entries for raw in e.profiles]
    cands = candidates(profiles, facts, gpus, args.engine)
    if args.json:
        out: list[dict[str, Any]] = [c.as_dict() for c in cands]
        print(json.dumps(out, indent=2))
        return 0
    if args.model and facts is not None:
        print(_model_line(args.model, facts))
    elif args.model:
        print(f"Model: {args.model} (no memory arithmetic: {note})")
    print(f"GPUs: {gpus.label}" + (" (declared)" if gpus.declared else " (found)"))
    if note and facts is not None:
        print(f"Note: {note}")
    for group in (RUNNABLE, LOW_MEMORY, INCOMPATIBLE):
        rows = [c for c in cands if c.group == group]
        if rows:
            print(f"\n{TITLES[group]}")
            for c in rows:
                print(_row(c, c is cands[0] and group == RUNNABLE))
    if cands and cands[0].group == RUNNABLE:
        print("\n* what MODEL_PROFILE=auto picks")
    elif args.model:
        print("\nNothing runs here: MODEL_PROFILE=auto would start the engine with its own defaults.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.profiles", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="the profiles (and computed defaults) for a model on some GPUs")
    ls.add_argument("--model", help="Hugging Face id or local directory (default: every profile)")
    ls.add_argument("--revision", help="branch, tag or commit of the Hub repo")
    ls.add_argument(
        "--gpus",
        default="auto",
        help="`auto` (NVML: the GPUs of this machine) or <count>x<board>[-<GB>GB]: 8xH100-80GB, 1xL4-24GB, 2xRTX4090",
    )
    ls.add_argument("--engine", default="vllm", choices=["vllm", "trtllm"])
    ls.add_argument(
        "--profiles-file",
        default=os.environ.get("PROFILES_FILE") or None,
        help="a manifest of your own, read before the built-in one (default: PROFILES_FILE)",
    )
    ls.add_argument("--json", action="store_true", help="a JSON list, the one MODEL_PROFILE=auto takes first")
    args = parser.parse_args(argv)
    return list_command(args)


if __name__ == "__main__":
    sys.exit(main())
