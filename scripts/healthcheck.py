#!/usr/bin/env python3
"""The images' Docker HEALTHCHECK: exit 0 when the API's `/health` answers 200 on 127.0.0.1:$PORT,
1 otherwise (starting, draining, engine unhealthy, nothing listening). Standard library only, so any
`python3` in any of the images can run it."""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:  # refused, timed out, or an HTTP error status (503 while starting)
        return 1


if __name__ == "__main__":
    sys.exit(main())
