"""Contender: the proxy's own client behind a server of its own, with no ASGI in between.

`uvicorn-floor` (`own.py`) is the proxy's client under uvicorn: what a uvicorn-served proxy cannot go
below. This is the same client under an asyncio protocol that parses requests with httptools and
writes the answer itself (status line, the engine's headers, chunked body): one task per request and
nothing else. The gap between the two is what uvicorn's request cycle and the ASGI messages cost;
what is left here is the floor of any asyncio + httptools design in CPython.

    python -m bench.proxies.raw --port 19213         # BENCH_UPSTREAM names the upstream
    python -m bench.proxies.raw --port 19214 --asgi  # the same server running own.py's ASGI app

With `--asgi` the server hands each request to `own.py`'s app as uvicorn does (a scope, `receive`,
`send`), in the leanest form ASGI allows: the gap to the plain server is what the ASGI interface
itself costs, the gap to `uvicorn-floor` what uvicorn's implementation of it adds.
"""

from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop

from app.proxy.upstream import Upstream, UpstreamError
from bench.proxies import own
from bench.proxies._common import _REQUEST_DROP_BYTES, _RESPONSE_DROP_BYTES, UPSTREAM, start_lifespan

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 502: b"Bad Gateway"}

client: Upstream | None = None
asgi = False
asgi_app = own.app


class Server(asyncio.Protocol):
    __slots__ = ("_transport", "_parser", "_url", "_headers", "_body", "_scope")

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._scope: dict | None = None  # the request being answered (`--asgi`)

    def connection_lost(self, exc: Exception | None) -> None:
        if (scope := self._scope) is not None and (hook := scope.get("app.hangup_hook")) is not None:
            hook()
        self._scope = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii")
        url, headers, body = self._url.decode("latin-1"), self._headers, b"".join(self._body)
        self._url, self._headers, self._body = b"", [], []
        keep_alive = self._parser.should_keep_alive()
        if asgi:
            handle = self._asgi(method, url, headers, body, keep_alive)
        else:
            handle = self._handle(method, url, headers, body, keep_alive)
        asyncio.get_running_loop().create_task(handle)

    async def _asgi(self, method: str, url: str, headers, body: bytes, keep_alive: bool) -> None:
        path, _, query = url.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "path": path,
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": headers,
            "app.hangup_hook": None,  # as app/server.py offers it: no timer per request to watch
        }
        self._scope = scope
        write = self._transport.write
        head: list[bytes] = []
        chunked = True  # False once the app gives a content-length: the body goes as it is

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            nonlocal chunked
            if message["type"] == "http.response.start":
                status = message["status"]
                head.append(b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"OK")))
                for name, value in message["headers"]:
                    if name.lower() == b"content-length":
                        chunked = False
                    head.extend((name, b": ", value, b"\r\n"))
                head.append(b"transfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n")
                return
            chunk = message.get("body", b"")
            if not chunked:
                out = chunk
            else:
                out = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b""
                if not message.get("more_body", False):
                    out += b"0\r\n\r\n"
            if head:
                out = b"".join(head) + out
                head.clear()
            if out:
                write(out)

        await asgi_app(scope, receive, send)
        if not keep_alive:
            self._transport.close()

    async def _handle(self, method: str, url: str, headers, body: bytes, keep_alive: bool) -> None:
        forwarded = [(n, v) for n, v in headers if n not in _REQUEST_DROP_BYTES]
        try:
            resp = await client.request(method, url, forwarded, body)
        except UpstreamError:
            self._transport.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        head = [b"HTTP/1.1 %d %s\r\n" % (resp.status, _REASONS.get(resp.status, b"OK"))]
        for name, value in resp.headers:
            if name.lower() not in _RESPONSE_DROP_BYTES:
                head += [name, b": ", value, b"\r\n"]
        head.append(b"transfer-encoding: chunked\r\n\r\n")
        write = self._transport.write
        try:
            first = await resp.read()
            if resp.at_end:  # a whole answer: one write
                body_part = b"%x\r\n%s\r\n0\r\n\r\n" % (len(first), first) if first else b"0\r\n\r\n"
                write(b"".join(head) + body_part)
            else:
                write(b"".join(head) + (b"%x\r\n%s\r\n" % (len(first), first) if first else b""))
                while chunk := await resp.read():
                    write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                write(b"0\r\n\r\n")
        except UpstreamError:
            resp.close()
            self._transport.close()
            return
        resp.release()
        if not keep_alive:
            self._transport.close()


_lifespan: list[asyncio.Task] = []  # held: a task nobody holds is collected, pending


async def main(port: int, proxy_app: bool) -> None:
    global client, asgi_app
    if proxy_app:  # the proxy's own app, configured from the environment as the launcher does
        from app.logs import configure_from
        from app.main import create_app
        from app.settings import Settings

        settings = Settings()
        configure_from(settings)
        asgi_app = create_app(settings)
        _lifespan.append(await start_lifespan(asgi_app))
    else:
        client = Upstream(UPSTREAM, connect_timeout=5, first_byte_timeout=60, idle_timeout=60)
        await client.open()
        own.client = client
    server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--asgi", action="store_true", help="serve own.py's ASGI app")
    parser.add_argument("--proxy-app", action="store_true", help="serve the proxy's app (app.main)")
    args = parser.parse_args()
    asgi = args.asgi or args.proxy_app
    uvloop.run(main(args.port, args.proxy_app))
