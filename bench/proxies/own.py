"""Contender: the proxy's own client (`app/proxy/upstream.py`: httptools on asyncio protocols), with
its timeouts as the proxy sets them. The same raw ASGI app as the others: with nothing else of the
proxy around it (no middleware, log line, metrics, keys), it is also the floor of a uvicorn-served
proxy's cost per request."""

from __future__ import annotations

from app.proxy.upstream import Upstream
from bench.proxies._common import UPSTREAM, lifespan, read_body, request_header_pairs, response_headers

client: Upstream | None = None


async def startup() -> None:
    global client
    client = Upstream(UPSTREAM, connect_timeout=5, first_byte_timeout=60, idle_timeout=60)
    await client.open()


async def shutdown() -> None:
    await client.close()


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send, startup, shutdown)
    body = await read_body(receive)
    target = scope["raw_path"].decode("latin-1")
    resp = await client.request(scope["method"], target, request_header_pairs(scope), body)
    try:
        await send(
            {"type": "http.response.start", "status": resp.status, "headers": response_headers(resp.headers)}
        )
        while chunk := await resp.read():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        resp.release()
    await send({"type": "http.response.body", "body": b""})
