#!/usr/bin/env python3
"""Download a model into the image at build time (`BAKE_MODEL`), with the launcher's own download
code (app/model.py: the best weight format only, revision, token), so the container starts without
a download. The Hugging Face token comes from a BuildKit secret file, never from ARG or ENV:

    docker build --secret id=hf_token,env=HF_TOKEN --build-arg BAKE_MODEL=Qwen/Qwen2-VL-7B-Instruct .

    python scripts/bake_model.py MODEL_ID [--revision REV] [--token-file /run/secrets/hf_token]
                                 [--cache-dir /models/hub]

The image bakes into /models/hub, outside its /data volume, and the launcher looks there first
(BAKED_MODELS_CACHE), so a volume mounted on /data cannot hide the baked model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--token-file", type=Path, default=Path("/run/secrets/hf_token"))
    parser.add_argument("--cache-dir", default=None, help="HF cache (hub folder); default: HF_HOME's")
    args = parser.parse_args(argv)

    from app.logs import configure_logging
    from app.model import ModelError, resolve_model

    configure_logging("INFO", "console")
    token = args.token_file.read_text().strip() if args.token_file.is_file() else None
    try:
        model = resolve_model(
            args.model, revision=args.revision or None, token=token or None, cache_dir=args.cache_dir
        )
    except ModelError as exc:
        print(f"bake_model.py: {exc}", file=sys.stderr)
        return 1
    print(f"baked {args.model} into {model.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
