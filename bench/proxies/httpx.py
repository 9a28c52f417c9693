"""Contender: httpx `AsyncClient` (httpcore connection pool).

`build(lib)` makes the same proxy on any module with httpx's API; `bench/proxies/httpx2.py` uses it.
"""

from __future__ import annotations

from types import ModuleType

import httpx

from bench.proxies._common import UPSTREAM, lifespan, read_body, request_headers, response_headers


def build(lib: ModuleType):
    """The raw ASGI proxy app on `lib.AsyncClient` (httpx or httpx2)."""
    client = None

    async def startup() -> None:
        nonlocal client
        client = lib.AsyncClient(
            # The default keeps only 20 idle connections: more than that at c=32 would be reopened each time.
            limits=lib.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4),
            timeout=lib.Timeout(connect=5, read=60, write=60, pool=None),
            trust_env=False,
        )

    async def shutdown() -> None:
        await client.aclose()

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send, startup, shutdown)
        body = await read_body(receive)
        async with client.stream(
            scope["method"],
            UPSTREAM + scope["raw_path"].decode("latin-1"),
            headers=request_headers(scope),
            content=body,
        ) as resp:
            await send(
                {
                    "type": "http.response.start",
                    "status": resp.status_code,
                    "headers": response_headers(resp.headers.raw),
                }
            )
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


app = build(httpx)
