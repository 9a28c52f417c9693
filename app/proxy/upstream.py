"""The one pooled HTTP client to the engine, and the one place its failures are classified.

aiohttp is the client because it was measured: on one core, a Starlette proxy on aiohttp relayed
~3,700 req/s against ~530 on httpx (`bench/upstream_clients.py` reruns the comparison). Responses
are relayed as raw bytes: no decompression, no cookie jar, no default headers added.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Literal

import aiohttp

from app.proxy.headers import Headers

ErrorKind = Literal["connect", "timeout", "protocol"]


class UpstreamError(Exception):
    """The engine could not be reached (`connect`), went silent (`timeout`) or broke the HTTP
    exchange (`protocol`, e.g. it died mid-response)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


def classify(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamError("timeout", "the engine did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("connect", f"cannot connect to the engine: {exc.os_error or exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamError("protocol", "the engine closed the connection")
    return UpstreamError("protocol", f"engine response broken: {exc.__class__.__name__}: {exc}")


class UpstreamResponse:
    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status: int = resp.status
        self.headers: Headers = [(k.lower(), v) for k, v in resp.raw_headers]

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises UpstreamError when the engine fails mid-body."""
        content = self._resp.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise classify(exc) from exc

    def close(self) -> None:
        """Drop the connection (the engine sees the disconnect and aborts the request)."""
        self._resp.close()

    def release(self) -> None:
        """Return a fully read connection to the pool."""
        self._resp.release()


class Upstream:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # Idle connections are dropped before the engine's own keep-alive (uvicorn: 5 s) ends them.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
        *,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send a request; returns once the response headers arrived."""
        assert self._session is not None, "Upstream.open() was not awaited"
        kwargs = {}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        # A pooled connection the engine closed a moment ago fails before any response byte: the
        # engine never saw the request, so a body we hold whole is sent once more on a new one.
        attempts = 2 if body is None or isinstance(body, bytes) else 1
        for attempt in range(attempts):
            try:
                resp = await self._session.request(
                    method,
                    self.base_url + target,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                    data=body,
                    allow_redirects=False,
                    compress=None,
                    **kwargs,
                )
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt + 1 == attempts or isinstance(exc, aiohttp.ClientConnectorError):
                    raise classify(exc) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise classify(exc) from exc
        return UpstreamResponse(resp)

    async def get(self, path: str, timeout: float) -> tuple[int, bytes]:
        """A small GET for the proxy's own use (health, version, metrics)."""
        resp = await self.request("GET", path, [], None, timeout=timeout)
        try:
            body = await resp._resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise classify(exc) from exc
        finally:
            resp.release()
        return resp.status, body
