"""Contender: pyreqwest `Client` (Python bindings to Rust's reqwest/hyper, own Tokio runtime thread).

By default a streamed response reads ahead into a 64 KiB buffer before handing the first chunk to
Python (`RequestBuilder.default_streamed_read_buffer_limit()`), which holds back the first bytes of a
slow SSE stream until 64 KiB or the end of the body arrived. `READ_BUFFER_LIMIT` keeps it small; the
benchmark's TTFB column is there to catch a regression of exactly that.
"""

from __future__ import annotations

import os
from datetime import timedelta

from pyreqwest.client import Client, ClientBuilder

from bench.proxies._common import UPSTREAM, lifespan, read_body, request_headers, response_headers

READ_BUFFER_LIMIT = int(os.environ.get("BENCH_PYREQWEST_READ_BUFFER_LIMIT", "1"))

client: Client | None = None


async def startup() -> None:
    global client
    client = (
        ClientBuilder()
        .connect_timeout(timedelta(seconds=5))
        .read_timeout(timedelta(seconds=60))
        .pool_idle_timeout(timedelta(seconds=4))
        .http1_only()
        .build()
    )


async def shutdown() -> None:
    await client.close()


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send, startup, shutdown)
    body = await read_body(receive)
    request = (
        client.request(scope["method"], UPSTREAM + scope["raw_path"].decode("latin-1"))
        .headers(request_headers(scope))
        .body_bytes(body)
        .streamed_read_buffer_limit(READ_BUFFER_LIMIT)
        .build_streamed()
    )
    async with request as resp:
        await send(
            {
                "type": "http.response.start",
                "status": resp.status,
                "headers": response_headers(resp.headers.items()),
            }
        )
        reader = resp.body_reader
        while (chunk := await reader.read_chunk()) is not None:
            await send({"type": "http.response.body", "body": chunk.to_bytes(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})
