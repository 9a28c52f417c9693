"""Contender: httpx2 `AsyncClient` (the httpx 2.x line that huggingface_hub 2.x depends on; import name `httpx2`)."""

from __future__ import annotations

import httpx2

from bench.proxies._common import UPSTREAM, lifespan, read_body, request_headers, response_headers

client: httpx2.AsyncClient | None = None


async def startup() -> None:
    global client
    client = httpx2.AsyncClient(
        # The default keeps only 20 idle connections: more than that at c=32 would be reopened each time.
        limits=httpx2.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4),
        timeout=httpx2.Timeout(connect=5, read=60, write=60, pool=None),
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
