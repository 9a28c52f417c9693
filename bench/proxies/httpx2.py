"""Contender: httpx2 `AsyncClient` (the httpx 2.x line that huggingface_hub 2.x depends on; import name `httpx2`).

The same proxy as `bench/proxies/httpx.py`, on the other library.
"""

from __future__ import annotations

import httpx2

from bench.proxies.httpx import build

app = build(httpx2)
