"""`python -m app.loadtest`: parse the options, run, print, save, and exit by the error rate.

Exit status: 0 when the run's error rate (every side's) is at most `--max-error-rate`, 1 when it is
above, 2 for bad options or a server that cannot be asked for its models.
"""

from __future__ import annotations

import asyncio
import os
import sys

from app.loadtest.options import OptionsError, parse
from app.loadtest.report import render, save
from app.loadtest.runner import execute


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse(argv, dict(os.environ))
    except OptionsError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(execute(opts))
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    if opts.console_output:
        print(render(report))
    if opts.save:
        print(f"Results saved to {save(report, opts.save)}")
    status = 0
    for side in [report, report.get("compare")]:
        if side is None:
            continue
        rate = side["summary"]["error_rate"]
        if rate > opts.max_error_rate:
            print(
                f"loadtest: error rate {rate * 100:.2f} % at {side['url']} is above --max-error-rate "
                f"{opts.max_error_rate * 100:.2f} %",
                file=sys.stderr,
            )
            status = 1
    return status
