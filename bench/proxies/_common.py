"""What every contender proxy shares, so that only the upstream client differs between them.

Each `bench/proxies/<client>.py` is a raw ASGI app (no framework) that reads the request body, forwards
method, path, body and headers through one pooled client made at start-up, and relays status, headers
and body chunks back as they arrive. Header handling mirrors `app/proxy/handler.py`: hop-by-hop headers,
`host` and `content-length` are dropped both ways (the client sets its own request length, the server
re-frames the response as chunked).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:19000").rstrip("/")

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-length"}
_REQUEST_DROP_BYTES = frozenset(name.encode() for name in _REQUEST_DROP)
_RESPONSE_DROP_BYTES = frozenset(name.encode() for name in _RESPONSE_DROP)


def request_headers(scope: dict) -> list[tuple[str, str]]:
    """The incoming request's headers to forward, as str pairs (every client takes those)."""
    return [
        (name, value.decode("latin-1"))
        for raw, value in scope["headers"]
        if (name := raw.decode("latin-1")) not in _REQUEST_DROP
    ]


def request_header_pairs(scope: dict) -> list[tuple[bytes, bytes]]:
    """The same, as the bytes pairs ASGI gives (the proxy's own client takes those)."""
    return [(name, value) for name, value in scope["headers"] if name not in _REQUEST_DROP_BYTES]


def response_headers(pairs) -> list[tuple[bytes, bytes]]:
    """The upstream response's headers (str or bytes pairs) to relay, as the bytes pairs ASGI wants."""
    out = []
    for name, value in pairs:
        if isinstance(name, str):
            name, value = name.encode("latin-1"), value.encode("latin-1")
        if name.lower().decode("latin-1") not in _RESPONSE_DROP:
            out.append((name, value))
    return out


async def read_body(receive: Callable[[], Awaitable[dict]]) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def lifespan(receive, send, startup, shutdown) -> None:
    """ASGI lifespan: `startup()` makes the client, `shutdown()` closes it."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def start_lifespan(app) -> asyncio.Task:
    """The server's side of `app`'s ASGI lifespan, for a server of the bench's own: startup sent
    and completed. The task goes on running the lifespan; the caller holds it (a task nobody holds
    is collected while pending)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    started = loop.create_future()
    await inbox.put({"type": "lifespan.startup"})

    async def send(message: dict) -> None:
        if message["type"].startswith("lifespan.startup") and not started.done():
            started.set_result(message["type"])

    task = loop.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
    )
    if await started != "lifespan.startup.complete":
        raise RuntimeError("the app did not start")
    return task
