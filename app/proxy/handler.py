"""The pass-through: every route the proxy does not answer itself goes to the engine unchanged.

Request bodies: JSON bodies are read whole (bounded by MAX_REQUEST_BYTES) because the proxy reads
`model`, `stream` and the content parts from them; any other body is streamed through, counted
against the same bound. Responses are streamed out as they arrive, SSE included, with status,
headers (less hop-by-hop ones) and bytes as the engine sent them.

A client that hangs up cancels the relay: the upstream connection is closed, so the engine sees
the disconnect and aborts the generation.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

import orjson

from app import metrics
from app.errors import error_message, send_error
from app.middleware import RECORD_KEY, RequestRecord
from app.proxy.headers import Headers, filter_headers, get_header
from app.proxy.request_body import inspect_json
from app.proxy.sse import StreamObserver, usage_counts
from app.proxy.upstream import Upstream, UpstreamError, UpstreamResponse
from app.runtime import Phase, Runtime

# Upstream failure -> (status, OpenAI error code); the one place this mapping lives.
UPSTREAM_STATUS = {"connect": (502, "engine_unreachable"), "timeout": (504, "engine_timeout")}

_REQUEST_DROP = frozenset({b"host", b"content-length", b"expect"})
_RESPONSE_DROP = frozenset({b"content-length"})
_SSE_HEADERS = [(b"x-accel-buffering", b"no")]
_MAX_ACCOUNTED_BODY = 4 * 1024 * 1024  # non-stream bodies larger than this are relayed unparsed


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class StreamedBody:
    """A request body streamed to the engine as the client sends it, bounded by the size limit.
    The upstream client wraps what the iterator raises, so why it stopped is kept here."""

    __slots__ = ("_receive", "_limit", "too_large", "client_gone")

    def __init__(self, receive: Any, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.too_large = False
        self.client_gone = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                self.too_large = True
                raise BodyTooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


class ProxyHandler:
    def __init__(self, *, runtime: Runtime, max_request_bytes: int, api_key: str | None) -> None:
        self.runtime = runtime
        self.max_request_bytes = max_request_bytes
        self._api_key = api_key.encode() if api_key else None
        self.upstream: Upstream | None = None  # set in the app's lifespan

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        rec: RequestRecord = scope[RECORD_KEY]
        headers: Headers = scope["headers"]

        if self._api_key is not None and scope["path"].startswith("/v1") and not self._authorized(headers):
            rec.error = "missing or invalid API key"
            await send_error(
                send,
                401,
                "Missing or invalid API key: send `Authorization: Bearer <API_KEY>`.",
                code="invalid_api_key",
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        if not self.runtime.accepting:
            await self._unavailable(rec, send)
            return

        length = get_header(headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            await self._too_large(rec, send)
            return

        ctype = get_header(headers, b"content-type") or b""
        body: bytes | StreamedBody | None
        strip_usage = False
        try:
            if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
                body = await self._read_body(receive) if length not in (None, b"0") else None
            elif ctype.startswith(b"application/json"):
                info = inspect_json(await self._read_body(receive), scope["path"])
                rec.model, rec.stream, rec.modalities = info.model, info.stream, info.modalities
                strip_usage = info.strip_usage
                body = info.body
            else:
                body = self._stream_body(receive)
        except BodyTooLarge:
            await self._too_large(rec, send)
            return
        except ClientGone:
            rec.disconnected = True
            return

        forward = filter_headers(headers, _REQUEST_DROP)
        if self._api_key is not None:  # the proxy consumed the key; the engine has none
            forward = [(k, v) for k, v in forward if k != b"authorization"]
        if isinstance(body, bytes):
            forward.append((b"content-length", str(len(body)).encode()))
        elif length is not None:
            forward.append((b"content-length", length))
        target = (
            scope["path"]
            if not scope.get("query_string")
            else (f"{scope['path']}?{scope['query_string'].decode('latin-1')}")
        )
        await self._exchange(scope, receive, send, rec, target, forward, body, strip_usage)

    # --- the exchange -------------------------------------------------------------------------

    async def _exchange(self, scope, receive, send, rec, target, headers, body, strip_usage) -> None:
        assert self.upstream is not None
        task = asyncio.current_task()
        assert task is not None
        state = {"done": False}
        watcher: asyncio.Future | None = None

        def on_client_message(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None or state["done"]:
                return
            if fut.result().get("type") == "http.disconnect":
                rec.disconnected = True
                task.cancel()

        if not isinstance(body, StreamedBody):  # the request body is consumed: watch for hang-up
            watcher = asyncio.ensure_future(receive())
            watcher.add_done_callback(on_client_message)
        resp: UpstreamResponse | None = None
        try:
            try:
                resp = await self.upstream.request(scope["method"], target, headers, body)
            except UpstreamError as exc:
                if isinstance(body, StreamedBody) and body.too_large:
                    await self._too_large(rec, send)
                elif isinstance(body, StreamedBody) and body.client_gone:
                    rec.disconnected = True
                else:
                    await self._upstream_failed(rec, send, exc)
                return
            if watcher is None:
                watcher = asyncio.ensure_future(receive())
                watcher.add_done_callback(on_client_message)
            await self._relay(resp, send, rec, state, strip_usage)
        except asyncio.CancelledError:
            if rec.disconnected and task.uncancel() == 0:
                rec.error = rec.error or "client disconnected"
                return
            raise
        finally:
            state["done"] = True
            if watcher is not None:
                watcher.cancel()
            if resp is not None:
                # After a 5xx the engine's server may drop the connection (uvicorn does once an
                # exception escaped): never hand such a connection to the next request.
                if state.get("complete") and resp.status < 500:
                    resp.release()
                else:
                    resp.close()

    async def _relay(
        self, resp: UpstreamResponse, send, rec: RequestRecord, state: dict, strip_usage: bool
    ) -> None:
        ctype = get_header(resp.headers, b"content-type") or b""
        is_sse = ctype.startswith(b"text/event-stream")
        out_headers = filter_headers(
            resp.headers, _RESPONSE_DROP if (is_sse and strip_usage) else frozenset()
        )
        if is_sse:
            out_headers += _SSE_HEADERS
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        if is_sse:
            await self._relay_sse(resp, send, rec, state, strip_usage)
        else:
            await self._relay_body(resp, send, rec, state)

    async def _relay_sse(self, resp, send, rec, state, strip_usage) -> None:
        observer = StreamObserver(rec.start, strip_usage=strip_usage)
        try:
            async for chunk in resp.chunks():
                out = observer.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamError as exc:
            metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
            rec.error = f"stream broken: {exc}"
            tail = observer.finish()
            event = (
                b"data: "
                + orjson.dumps(
                    {
                        "error": {
                            "message": f"The engine failed mid-stream: {exc}",
                            "type": "engine_error",
                            "param": None,
                            "code": exc.kind,
                        }
                    }
                )
                + b"\n\n"
            )
            await send({"type": "http.response.body", "body": tail + event, "more_body": False})
            return
        finally:
            rec.ttft_s = observer.ttft_s
            rec.prompt_tokens, rec.completion_tokens = observer.prompt_tokens, observer.completion_tokens
            rec.error = rec.error or observer.error
        state["done"] = True
        state["complete"] = True
        await send({"type": "http.response.body", "body": observer.finish(), "more_body": False})

    async def _relay_body(self, resp, send, rec, state) -> None:
        kept: list[bytes] = []
        size = 0
        try:
            async for chunk in resp.chunks():
                if size <= _MAX_ACCOUNTED_BODY:
                    kept.append(chunk)
                    size += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:  # headers are out: all that is left is to end the response
            metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
            rec.error = f"response broken: {exc}"
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        state["done"] = True
        state["complete"] = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if size <= _MAX_ACCOUNTED_BODY and kept:
            body = b"".join(kept)
            if resp.status >= 400:
                rec.error = error_message(body)
            elif b'"usage"' in body:
                try:
                    rec.prompt_tokens, rec.completion_tokens = usage_counts(orjson.loads(body))
                except orjson.JSONDecodeError:
                    pass

    # --- request body -------------------------------------------------------------------------

    async def _read_body(self, receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                raise BodyTooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _stream_body(self, receive) -> StreamedBody:
        return StreamedBody(receive, self.max_request_bytes)

    # --- refusals -----------------------------------------------------------------------------

    def _authorized(self, headers: Headers) -> bool:
        value = get_header(headers, b"authorization") or b""
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._api_key or b"")

    async def _unavailable(self, rec: RequestRecord, send) -> None:
        phase = self.runtime.phase
        if phase is Phase.STARTING:
            message, retry = f"The model is still loading ({self.runtime.detail}); retry shortly.", b"10"
        elif phase is Phase.DRAINING:
            message, retry = "The server is shutting down; retry on another replica.", b"5"
        else:
            message, retry = f"The engine is not running ({self.runtime.detail}).", b"30"
        rec.error = f"unavailable: {phase.value}"
        await send_error(send, 503, message, code="engine_unavailable", headers=[(b"retry-after", retry)])

    async def _too_large(self, rec: RequestRecord, send) -> None:
        rec.error = "request body too large"
        await send_error(
            send,
            413,
            f"Request body larger than MAX_REQUEST_BYTES ({self.max_request_bytes} bytes).",
            code="request_too_large",
            headers=[(b"connection", b"close")],
        )

    async def _upstream_failed(self, rec: RequestRecord, send, exc: UpstreamError) -> None:
        metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
        status, code = UPSTREAM_STATUS.get(exc.kind, (502, "engine_error"))
        rec.error = str(exc)
        await send_error(send, status, f"Upstream engine error: {exc}", code=code)
