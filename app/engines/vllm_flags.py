"""The flags the launcher passes vLLM, checked against the vLLM the image ships.

vLLM renames and removes flags between releases; a flag it no longer has stops it at start
("unrecognized arguments"). The image writes the installed vLLM's option strings once, at build
time, from vLLM's own argument parser (building it imports vLLM and torch: seconds, not for every
start):

    python -m app.engines.vllm_flags /app/vllm-flags.json

At start the launcher leaves out every flag of its own making that this list lacks and names them in
one warning, as RunPod's worker-vllm keeps only the settings its vLLM's AsyncEngineArgs has. The
flags the proxy cannot serve without (model, address, served name, media-domain allow-list) are never
dropped: without them the start fails with one line. ENGINE_EXTRA_ARGS are the user's own words and
go to vLLM as given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Without these the stack would serve something else than what was asked, or less safely.
ESSENTIAL = frozenset({"--model", "--host", "--port", "--served-model-name", "--allowed-media-domains"})


def installed_options() -> dict:
    """The installed vLLM's version and option strings, from its own `serve` argument parser (the
    module that holds `make_arg_parser` moved in 0.32; both places are tried)."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before 0.11
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]
    import vllm

    parser = make_arg_parser(FlexibleArgumentParser())
    return {"vllm": getattr(vllm, "__version__", None), "options": sorted(parser._option_string_actions)}


def load_known(path: Path | str) -> set[str] | None:
    """The option strings of a file written by this module; None if there is none to read."""
    try:
        return set(json.loads(Path(path).read_text())["options"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def filter_flags(argv: list[str], known: set[str], keep_last: int = 0) -> tuple[list[str], list[str]]:
    """(argv without the flags `known` lacks and their values, the flags left out). argv is
    `python -m module --flag [value...] ...`; its last `keep_last` words (ENGINE_EXTRA_ARGS) are
    kept as given. A value never starts with `--` in what the launcher builds."""
    head, body = argv[:3], argv[3 : len(argv) - keep_last]
    tail = argv[len(argv) - keep_last :] if keep_last else []
    kept: list[str] = []
    dropped: list[str] = []
    skipping = False
    for word in body:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            skipping = flag not in known
            if skipping:
                dropped.append(flag)
                continue
        elif skipping:
            continue
        kept.append(word)
    return head + kept + tail, dropped


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m app.engines.vllm_flags OUT.json", file=sys.stderr)
        return 2
    found = installed_options()
    Path(args[0]).write_text(json.dumps(found) + "\n")
    print(
        f"vllm_flags: {len(found['options'])} options of vLLM {found['vllm']} in {args[0]}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
