"""Builds the proxy's one C extension (`app/proxy/_passthrough.c`) in place, next to its source.

    python scripts/build_ext.py            # make: a failed build fails
    python scripts/build_ext.py --optional # the images: a failed build leaves the Python stand-in

Nothing but the C compiler and Python's headers: the flags are the interpreter's own (sysconfig),
as setuptools would use them, without needing setuptools.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "app" / "proxy" / "_passthrough.c"


def target() -> Path:
    return SOURCE.with_name("_passthrough" + sysconfig.get_config_var("EXT_SUFFIX"))


def command(out: Path, strict: bool = True) -> list[str]:
    """`strict`: warnings are errors (make); an image's compiler may warn where this one does not."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    cflags = shlex.split(sysconfig.get_config_var("CCSHARED") or "-fPIC")
    include = sysconfig.get_paths()["include"]
    warnings = ["-Wall", "-Werror"] if strict else ["-Wall"]
    return [*cc, *cflags, "-shared", "-O2", *warnings, "-I", include, str(SOURCE), "-o", str(out)]


def build(strict: bool = True) -> Path:
    out = target()
    # Written beside it, then renamed: a process importing it never sees half a file.
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so.tmp", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run(command(partial, strict), check=True)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optional", action="store_true", help="a failed build is a warning, not an error")
    args = parser.parse_args()
    try:
        out = build(strict=not args.optional)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(
            f"build_ext: {SOURCE.name} not built ({exc}); the proxy uses its Python stand-in", file=sys.stderr
        )
        return 0 if args.optional else 1
    print(f"build_ext: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
