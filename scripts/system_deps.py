#!/usr/bin/env python3
"""What `make test` needs from the system besides the venv, installed when it can be, or named.

The observability tests run a real Prometheus and promtool, the dashboard's test a real Chromium
(Debian's packages; Playwright drives /usr/bin/chromium, never a browser of its own); `make` compiles
the proxy's one C extension with gcc (scripts/build_ext.py). On a fresh
machine `make test` runs this first: as root with apt-get it installs what is missing; otherwise it
stops at once with one sentence saying what to install, instead of failing tests minutes later.

    python scripts/system_deps.py            # check, install if root
    python scripts/system_deps.py --check    # check only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

# Debian package -> the executables the tests run from it.
NEEDED: dict[str, tuple[str, ...]] = {
    "prometheus": ("prometheus", "promtool"),
    "chromium": ("chromium",),
    "gcc": ("gcc",),
}


def missing(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The packages of NEEDED whose executables are not all on PATH."""
    return [pkg for pkg, tools in NEEDED.items() if not all(which(tool) for tool in tools)]


def advice(packages: list[str]) -> str:
    names = " ".join(packages)
    return (
        f"make test needs {', '.join(packages)} (Debian packages {names}): run it as root, which "
        f"installs them, or first: sudo apt-get install -y {names}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; install nothing")
    args = parser.parse_args(argv)
    need = missing()
    if not need:
        return 0
    apt = shutil.which("apt-get")
    if args.check or os.geteuid() != 0 or apt is None:
        print(f"system_deps: {advice(need)}", file=sys.stderr)
        return 1
    print(f"system_deps: installing {' '.join(need)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", *need]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"system_deps: `{' '.join(cmd)}` failed; {advice(need)}", file=sys.stderr)
            return 1
    still = missing()
    if still:
        print(f"system_deps: still missing after apt-get: {advice(still)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
