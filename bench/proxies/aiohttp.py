"""Contender: aiohttp `ClientSession` (the client the proxy used before its own), configured as it was."""

from __future__ import annotations

import aiohttp

from bench.proxies._common import UPSTREAM, lifespan, read_body, request_headers, response_headers

client: aiohttp.ClientSession | None = None


async def startup() -> None:
    global client
    client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )


async def shutdown() -> None:
    await client.close()


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send, startup, shutdown)
    body = await read_body(receive)
    async with client.request(
        scope["method"],
        UPSTREAM + scope["raw_path"].decode("latin-1"),
        headers=request_headers(scope),
        data=body,
        allow_redirects=False,
        compress=None,
    ) as resp:
        await send(
            {
                "type": "http.response.start",
                "status": resp.status,
                "headers": response_headers(resp.raw_headers),
            }
        )
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
