"""The pass-through: every route the proxy does not answer itself goes to the engine unchanged.

Request bodies: JSON bodies are read whole (bounded by MAX_REQUEST_BYTES) because the proxy reads
`model`, `stream` and the content parts from them; any other body is streamed through, counted
against the same bound. Responses are streamed out as they arrive, SSE included, with status,
headers (less hop-by-hop ones) and bytes as the engine sent them.

A client that hangs up cancels the relay: the upstream connection is dropped, so the engine sees the
disconnect and aborts the generation. An engine that breaks off a response the client is already
receiving (it closes or resets mid-body, breaks its chunking, or goes silent past the idle timeout)
ends the client's connection without the response's end: no last chunk, fewer bytes than the
Content-Length, so no HTTP client takes it for a whole answer. A stream gets an SSE error event
first (the OpenAI SDK raises it as an APIError); clients that only watch the transport (`vllm bench
serve`, curl, fetch) see the connection end before the body did and fail the request instead of
counting a cut answer as complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from app import keys, metrics
from app.admission import MODEL_NOT_ALLOWED, Admission, Refused, Ticket
from app.errors import error_message, send_error
from app.keys import KeyEntry, KeyRing
from app.middleware import BATCH_OWNER_KEY, RECORD_KEY, RequestRecord
from app.proxy.headers import HOP_BY_HOP, Headers, filter_headers, get_header
from app.proxy.request_body import BodyRefused, inspect_json, is_json_type
from app.proxy.response_body import UsageFinder
from app.proxy.sse import StreamObserver, is_final
from app.proxy.upstream import Upstream, UpstreamError, UpstreamResponse
from app.routes import ADMIN, ENGINE
from app.runtime import Phase, Runtime
from app.security import SEVERAL_AUTHORIZATION, MediaGuard, MediaRefused, bearer, matches
from app.server import ABORT_HOOK, HANGUP_HOOK, RELAY_HOOK

# Upstream failure -> (status, OpenAI error code); the one place this mapping lives.
UPSTREAM_STATUS = {"connect": (502, "engine_unreachable"), "timeout": (504, "engine_timeout")}

# Request headers the proxy does not forward: its own framing and host, a consumed `expect`, and the
# client's request id (the engine gets the proxy's, which is the client's when it was accepted).
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-request-id"}
_SSE_HEADERS = [(b"x-accel-buffering", b"no")]
# CORS is the proxy's to decide (CORS_ALLOW_ORIGINS): the engine's own answer is never passed on;
# nor is the engine's request id (vLLM's --enable-request-id-headers): the client gets the proxy's.
_RESPONSE_DROP = frozenset(
    {
        b"x-request-id",
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
    }
)
_MAX_ACCOUNTED_BODY = 4 * 1024 * 1024  # error bodies (and model lists) larger than this are not parsed
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_JSON = b"application/json"
# Under a server without the hang-up hook, `receive` is watched from this age on: quicker
# requests never pay for it.
WATCH_AFTER_S = 0.05


def _whole_events(data: bytes) -> bytes:
    """`data` up to its last event boundary: an event the engine broke off is not relayed (a
    client would parse it glued to what follows)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
    return data[: max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)]


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class StreamedBody:
    """A request body streamed to the engine as the client sends it, bounded by the size limit."""

    __slots__ = ("_receive", "_limit")

    def __init__(self, receive: Any, limit: int) -> None:
        self._receive = receive
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                raise BodyTooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


class _Hangup:
    """Cancels the request's task when the client's connection is lost. An ASGI server's `send`
    ignores a gone client silently; the proxy's server (app/server.py) calls the hook this sets in
    the scope from `connection_lost`, at once and with no timer or task per request. Under a server
    without that hook (plain uvicorn), `receive` is watched instead, from WATCH_AFTER_S on."""

    __slots__ = ("_scope", "_task", "_rec", "_receive", "_timer", "_watcher", "relay_hook")

    def __init__(self, scope: dict, receive: Any, rec: RequestRecord) -> None:
        self._scope = scope
        self.relay_hook = scope.get(RELAY_HOOK)
        self._task = asyncio.current_task()
        self._rec = rec
        self._receive = receive
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None
        if HANGUP_HOOK in scope:
            scope[HANGUP_HOOK] = self._hung_up
        else:
            self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._arm)

    def _hung_up(self) -> None:
        task = self._task
        self.stop()  # once
        if task is not None:
            self._rec.disconnected = True
            task.cancel()

    def _arm(self) -> None:
        self._timer = None
        self._watcher = asyncio.get_running_loop().create_task(self._receive())
        self._watcher.add_done_callback(self._on_message)

    def _on_message(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result().get("type") == "http.disconnect":
            self._hung_up()

    @property
    def scope(self) -> dict:
        return self._scope

    def abort(self) -> None:
        """The response cannot be completed: end the client's connection without its end. Under a
        server without the hook, returning without completing the response does it (uvicorn closes
        the connection, and logs that the response was not completed)."""
        self.stop()
        if (hook := self._scope.get(ABORT_HOOK)) is not None:
            hook(self._scope)

    def stop(self) -> None:
        """No more cancelling: the response is complete, or being completed. Idempotent."""
        self._task = None
        if HANGUP_HOOK in self._scope:
            self._scope[HANGUP_HOOK] = None  # and no reference cycle left through the scope
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


class _Keepalive:
    """Sends a blank line (`\\n\\n`) when a stream has been silent for a whole sweep interval, e.g.
    while a long prompt is prefilled, so idle-timeout proxies between the client and us keep the
    connection. SSE clients read a blank line with no field as no event at all, and vLLM's own
    benchmark client (which strips every network read, then splits on a blank line) drops it too;
    an SSE comment (`: keep-alive`) glued that client's next events together and lost them
    (tests/app/proxy/test_sse_clients.py). The relay only bumps `sent` per message;
    `_KeepaliveSweep` does the rest."""

    __slots__ = ("_send", "_loop", "_task", "_seen", "sent", "relayed")

    PING = {"type": "http.response.body", "body": b"\n\n", "more_body": True}

    def __init__(self, send: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._send = send
        self._loop = loop
        self._task: asyncio.Task | None = None
        self._seen = -1  # the first sweep only looks: silence is counted from there
        self.sent = 0
        self.relayed: UpstreamResponse | None = None  # its `passed`: events that bypassed `sent`

    def sweep(self) -> None:
        sent = self.sent + (self.relayed.passed if self.relayed is not None else 0)
        if sent == self._seen and (self._task is None or self._task.done()):
            self._task = self._loop.create_task(self._send(self.PING))
        self._seen = sent

    async def close(self) -> None:
        """A ping being sent is let through first, so it cannot follow the last message."""
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)


class _KeepaliveSweep:
    """One timer for every open stream, not one each: every `interval` seconds, each stream that
    sent nothing since the previous sweep gets a ping (after 1 to 2 intervals of silence)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._streams: set[_Keepalive] = set()
        self._timer: asyncio.TimerHandle | None = None

    def open(self, send: Any) -> _Keepalive:
        loop = asyncio.get_running_loop()
        stream = _Keepalive(send, loop)
        self._streams.add(stream)
        if self._timer is None:
            self._timer = loop.call_later(self.interval, self._sweep, loop)
        return stream

    async def close(self, stream: _Keepalive) -> None:
        self._streams.discard(stream)
        await stream.close()

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        for stream in self._streams:
            stream.sweep()
        self._timer = loop.call_later(self.interval, self._sweep, loop) if self._streams else None


def _observed(observer: StreamObserver, rec: RequestRecord) -> bytes:
    """What the observer still holds, with the stream's TTFT put on the record; its usage and
    error are read in the request's accounting (`rec.tail`), once the response is out."""
    rest = observer.end()
    rec.ttft_s = observer.ttft_s
    observer.error_before = rec.error
    rec.tail = observer
    return rest


async def _end_stream(send, watch: _Hangup, complete: bool, last: bytes, rest: bytes, tail: bytes) -> bool:
    """A relayed stream's last send. Complete: its last bytes, with the response's end. Broken: the
    whole events, the error event, then the connection ends without the stream's end."""
    if complete:
        watch.stop()
        await send({"type": "http.response.body", "body": last + rest})
    else:
        await send(
            {"type": "http.response.body", "body": last + _whole_events(rest) + tail, "more_body": True}
        )
        watch.abort()
    return complete


class _Sink:
    """Called from the engine connection's read callback with each read's body bytes (relay mode,
    `UpstreamResponse.relay`): measured, then written straight to the client. Returns whether the
    stream is under way (first token seen, nothing buffered or held, the headers sent): then the
    connection passes whole `data:` events on without it (`passthrough`, app/proxy/passthrough.py)
    until one needs it (the stream's end, a partial event, the usage chunk it must remove)."""

    __slots__ = ("_feed", "_observer", "_watch", "_write", "writer", "keepalive", "passthrough")

    def __init__(self, observer: StreamObserver, watch: _Hangup, writer: Any) -> None:
        self._feed = observer.feed
        self._observer = observer
        self._watch = watch
        self.writer = writer
        self._write = writer.write
        self.keepalive: _Keepalive | None = None
        self.passthrough = (writer.write_chunks, observer.record, writer, observer.strip_usage)

    def __call__(self, chunk: bytes) -> bool:
        out = self._feed(chunk)
        if out:
            self._write(out)
            if self.keepalive is not None:
                self.keepalive.sent += 1
            # is_final's own first checks, inline: this runs once per token
            if out.endswith(b"[DONE]\n\n") or (out.startswith(b"event: ") and is_final(out)):
                self._watch.stop()  # the client has the whole answer: closing now is no hang-up
                return False
        return self._observer.steady and self.writer.started and not self.writer.closed


class ProxyHandler:
    def __init__(
        self,
        *,
        runtime: Runtime,
        max_request_bytes: int,
        keyring: KeyRing | None = None,
        admission: Admission | None = None,
        default_model: str | None = None,
        admin_key: bytes | None = None,
        media: MediaGuard | None = None,
        sse_keepalive: float = 0,
        log_prompts: bool = False,
    ) -> None:
        self.runtime = runtime
        self._keepalive = _KeepaliveSweep(sse_keepalive) if sse_keepalive > 0 else None
        self.max_request_bytes = max_request_bytes
        self.keyring = keyring or KeyRing(None, None)
        self.admission = admission or Admission()
        self._default_model = default_model
        self._admin_key = admin_key
        self._media = media or MediaGuard((), allow_private=False)
        self._log_prompts = log_prompts
        self.upstream: Upstream | None = None  # set in the app's lifespan
        self.models: Any = None
        """LoRA adapters (app/lora/service.py): a request naming a model other than the base one
        is handed to its `prepare` (adapter loaded on first use, `<base>:<adapter>` names)."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        rec: RequestRecord = scope[RECORD_KEY]
        path: str = scope["path"]
        method: str = scope["method"]

        # One pass over the request headers: what to forward, and what the proxy needs to know.
        forward: Headers = []
        length = ctype = auth = connection = None
        several_auth = False
        for name, value in scope["headers"]:
            if name in _REQUEST_DROP:
                if name == b"content-length":
                    length = value
                elif name == b"connection":
                    connection = value
                continue
            if name == b"content-type":
                if ctype is None:  # the first, as Starlette (the engine) reads it
                    ctype = value
            elif name == b"authorization":
                several_auth = auth is not None
                auth = auth or value
                if self.keyring.active or self._admin_key is not None:
                    continue  # the proxy consumed the key; the engine has none
            forward.append((name, value))
        if connection is not None:  # headers named in Connection are hop-by-hop too (rare)
            forward = filter_headers([(b"connection", connection), *forward])
        forward.append(rec.id_header)
        if several_auth:
            rec.error = "several Authorization headers"
            await self._error(rec, send, 400, SEVERAL_AUTHORIZATION, code="invalid_authorization")
            return
        token = bearer(auth)
        entry: KeyEntry | None = None  # the caller's key, with its limits
        assert rec.route is not None  # the dispatcher sends only engine and admin routes here
        if rec.route.kind == ADMIN:
            if self._admin_key is None or not matches(token, (self._admin_key,)):
                rec.error = "admin route refused"
                await self._error(
                    rec,
                    send,
                    403,
                    f"{rec.route.path} is an admin route: it needs `Authorization: Bearer <ADMIN_API_KEY>`"
                    + ("." if self._admin_key else ", and ADMIN_API_KEY is not set on this server."),
                    code="admin_route",
                )
                return
            rec.key = keys.ADMIN
        elif rec.batch_id is not None:  # the proxy's own batch runner: the batch's creator had a key
            owner = scope.get(BATCH_OWNER_KEY) or ""
            rec.key = owner or keys.BATCH  # usage of the key that made it
            if self.keyring.active and owner not in ("", keys.ANONYMOUS):
                # Its lines run while the key does: one revoked or expired stops them, and its
                # `models` list holds for them as for its live requests.
                entry = self.keyring.named(owner)
                if entry is None or entry.expired():
                    rec.error = "batch key revoked" if entry is None else "API key expired"
                    await self._error(
                        rec,
                        send,
                        401,
                        f"The API key {owner!r} that made this batch is no longer valid"
                        + (" (removed from the key file)." if entry is None else " (expired)."),
                        code="invalid_api_key" if entry is None else "expired_api_key",
                    )
                    return
        elif self.keyring.active:
            entry = self.keyring.identify(token)
            if entry is None or entry.expired():
                rec.error = "missing or invalid API key" if entry is None else "API key expired"
                message = (
                    "Missing or invalid API key: send `Authorization: Bearer <API_KEY>`."
                    if entry is None
                    else f"The API key {entry.name!r} has expired."
                )
                await self._error(
                    rec,
                    send,
                    401,
                    message,
                    code="invalid_api_key" if entry is None else "expired_api_key",
                    headers=[(b"www-authenticate", b"Bearer")],
                )
                return
            rec.key = entry.name
        else:
            rec.key = keys.ANONYMOUS
        if not self.runtime.accepting:
            await self._unavailable(rec, send)
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            await self._too_large(rec, send)
            return

        body: bytes | StreamedBody | None
        strip_usage = False
        is_json = False
        try:
            if ctype is not None and (ctype == _JSON or is_json_type(ctype)):
                is_json = True
                # A body the engine parses as JSON (whatever the method): read whole, parsed exactly
                # as the engine will parse it, and every URL the engine could fetch checked.
                info = inspect_json(await self._read_body(receive), path, self._log_prompts)
                rec.model, rec.stream, rec.modalities = info.model, info.stream, info.modalities
                rec.prompt = info.prompt
                strip_usage = info.strip_usage
                body = info.body
                if info.media_urls:
                    await self._media.check(info.media_urls)
                models = self.models
                if models is not None and info.model is not None and info.model != models.base:
                    body = await models.prepare(info, rec) or body
            elif method in _NO_BODY_METHODS:
                body = await self._read_body(receive) if length not in (None, b"0") else None
            else:
                body = StreamedBody(receive, self.max_request_bytes)
        except (BodyTooLarge, ClientGone) as exc:
            await self._body_failed(exc, rec, send)
            return
        except BodyRefused as exc:
            rec.error = f"body refused: {exc}"
            await self._error(rec, send, 400, f"{exc}.", code="invalid_json")
            return
        except MediaRefused as exc:
            rec.error = f"media URL refused: {exc}"
            await self._error(
                rec, send, 400, f"Media URL refused: {exc}.", code="media_url_refused", param="messages"
            )
            return

        # Admission control (app/admission.py): requests that make the engine work (POSTs to its API
        # routes, not the proxy's own batch lines: BATCH_CONCURRENCY bounds those) go through a key's
        # limits and the proxy's queue.
        gate = None
        if method == "POST" and rec.route.kind == ENGINE:
            if entry is not None and entry.models is not None:
                model = (rec.model or self._default_model) if is_json else None
                if model is None or not entry.may_use(model):
                    await self._model_refused(rec, send, entry, model)
                    return
            if rec.batch_id is None and self.admission.needed(entry):
                gate = (rec.key or keys.ANONYMOUS, entry)

        # The client's bytes, not the decoded path re-encoded: the engine routes on exactly what the
        # route table classified (the dispatcher refused anything that decodes to `?`, `#`, a
        # space or a control character).
        raw = scope.get("raw_path")
        target = raw.decode("latin-1") if raw else path
        query = scope.get("query_string")
        if query:
            target = f"{target}?{query.decode('latin-1')}"
        await self._exchange(
            scope,
            receive,
            send,
            rec,
            method,
            target,
            forward,
            body,
            int(length) if length is not None and not isinstance(body, bytes) else None,
            strip_usage,
            gate,
            # GET /v1/models for a key limited to some models: the list shows only those
            entry
            if method == "GET" and rec.route.path == "/v1/models" and entry and entry.models is not None
            else None,
        )

    # --- the exchange -------------------------------------------------------------------------

    async def _exchange(
        self,
        scope,
        receive,
        send,
        rec: RequestRecord,
        method,
        target,
        headers,
        body,
        length,
        strip_usage,
        gate,
        lister: KeyEntry | None = None,
    ) -> None:
        upstream = self.upstream
        assert upstream is not None
        # A streamed body is read through `receive` while it is sent: without the server's hook,
        # the hang-up watch (which also reads `receive`) waits for the response.
        watch = (
            _Hangup(scope, receive, rec)
            if HANGUP_HOOK in scope or not isinstance(body, StreamedBody)
            else None
        )
        resp: UpstreamResponse | None = None
        complete = False
        ticket: Ticket | None = None
        try:
            try:
                if gate is not None:  # may wait in the queue: a hang-up there cancels this task
                    ticket = await self.admission.enter(gate[0], gate[1], rec)
                    rec.response_headers = ticket.headers or None
                resp = await upstream.request(method, target, headers, body, length=length)
            except Refused as refused:
                rec.rejected = refused.reason
                rec.error = f"refused: {refused.reason}"
                await self._error(
                    rec, send, 429, refused.message, code=refused.reason, headers=refused.headers
                )
                return
            except UpstreamError as exc:
                await self._upstream_failed(rec, send, exc)
                return
            except (BodyTooLarge, ClientGone) as exc:  # raised by a streamed body as it was sent
                await self._body_failed(exc, rec, send)
                return
            if watch is None:
                watch = _Hangup(scope, receive, rec)
            if lister is not None and resp.status == 200:
                complete = await self._relay_models(resp, send, rec, watch, lister)
            else:
                complete = await self._relay(resp, send, rec, watch, strip_usage)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if rec.disconnected and task is not None and task.uncancel() == 0:
                rec.error = rec.error or "client disconnected"
                return
            raise
        finally:
            if ticket is not None:
                ticket.release()
            if watch is not None:
                watch.stop()
            if resp is not None:
                # After a 5xx the engine's server may drop the connection (uvicorn does once an
                # exception escaped): never hand such a connection to the next request.
                if complete and resp.status < 500:
                    resp.release()
                else:
                    resp.close()

    async def _relay(self, resp: UpstreamResponse, send, rec, watch: _Hangup, strip_usage: bool) -> bool:
        """Relay status, headers and body; True if the whole body came through."""
        ctype = get_header(resp.headers, b"content-type") or b""
        is_sse = ctype.startswith(b"text/event-stream")
        drop = _RESPONSE_DROP | {b"content-length"} if is_sse and strip_usage else _RESPONSE_DROP
        out_headers = filter_headers(resp.headers, drop)
        if is_sse:
            out_headers += _SSE_HEADERS
        rec.status = resp.status
        out_headers.append(rec.id_header)
        if rec.response_headers:
            out_headers += rec.response_headers
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        if is_sse:
            return await self._relay_sse(resp, send, rec, watch, strip_usage)
        return await self._relay_body(resp, send, rec, watch)

    async def _relay_models(self, resp: UpstreamResponse, send, rec, watch: _Hangup, entry: KeyEntry) -> bool:
        """The engine's model list less the models `entry` may not use (OpenAI lists a project's
        models only): the one answer the proxy changes, and only for a key with a `models` list."""
        kept: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await resp.read()
            except UpstreamError as exc:  # nothing sent yet: the client gets the 502/504
                await self._upstream_failed(rec, send, exc)
                return False
            kept.append(chunk)
            size += len(chunk)
            if size > _MAX_ACCOUNTED_BODY:
                await self._upstream_failed(
                    rec, send, UpstreamError("protocol", "the engine's model list is too large")
                )
                return False
            if not chunk or resp.at_end:
                break
        watch.stop()
        try:
            doc = orjson.loads(b"".join(kept))
            doc["data"] = [m for m in doc["data"] if isinstance(m, dict) and entry.may_use(m.get("id"))]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            await self._upstream_failed(
                rec, send, UpstreamError("protocol", f"the engine's model list is not one: {exc}")
            )
            return False
        body = orjson.dumps(doc)
        headers = filter_headers(resp.headers, _RESPONSE_DROP | {b"content-length"})
        headers += [(b"content-length", str(len(body)).encode()), rec.id_header]
        rec.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True

    def _stream_broken(self, exc: UpstreamError, resp: UpstreamResponse, rec, strip_usage: bool) -> bytes:
        """Count and note a stream the engine broke off; the SSE error event the client gets."""
        metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
        rec.error = f"stream broken: {exc}"
        # A stream whose length was announced (never vLLM's) cannot take an extra event.
        if not (strip_usage or get_header(resp.headers, b"content-length") is None):
            return b""
        event = orjson.dumps(
            {
                "error": {
                    "message": f"The engine failed mid-stream: {exc}",
                    "type": "engine_error",
                    "param": None,
                    "code": exc.kind,
                }
            }
        )
        return b"data: " + event + b"\n\n"

    async def _relay_sse(self, resp: UpstreamResponse, send, rec, watch, strip_usage: bool) -> bool:
        observer = StreamObserver(rec.start, strip_usage=strip_usage)
        hook = watch.relay_hook
        if hook is not None and not resp.complete:
            writer = hook(watch.scope, resp.pause_relay, resp.resume_relay)
            if writer is not None:
                sink = _Sink(observer, watch, writer)
                return await self._relay_sse_direct(resp, send, rec, watch, strip_usage, observer, sink)
        sweep = self._keepalive
        keepalive = sweep.open(send) if sweep is not None else None
        tail = b""
        complete = False
        read = resp.reader()
        last = b""
        try:
            while chunk := await read():
                out = observer.feed(chunk)
                if resp.at_end:  # the stream's last bytes: they leave with the end of the response
                    last = out
                    break
                if out:
                    if keepalive is not None:
                        keepalive.sent += 1
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    if is_final(out):  # the client has the whole answer: closing now is no hang-up
                        watch.stop()
            complete = True
        except UpstreamError as exc:
            tail = self._stream_broken(exc, resp, rec, strip_usage)
        finally:
            if sweep is not None and keepalive is not None:
                await sweep.close(keepalive)
            rest = _observed(observer, rec)
        return await _end_stream(send, watch, complete, last, rest, tail)

    async def _relay_sse_direct(
        self, resp: UpstreamResponse, send, rec, watch, strip_usage: bool, observer, sink: _Sink
    ) -> bool:
        """The stream's bytes go from the engine's connection to the client's inside the event
        loop's read callback (`_Sink`), with no task wake-up per event; this task waits for the
        end only. Back-pressure: a client whose transport buffer is full pauses the engine's."""
        sweep = self._keepalive
        keepalive = sweep.open(send) if sweep is not None else None
        sink.keepalive = keepalive
        if keepalive is not None:
            keepalive.relayed = resp
        tail = b""
        complete = False
        try:
            resp.relay(sink, sink.passthrough)
            await resp.wait_end()
            complete = True
        except UpstreamError as exc:
            tail = self._stream_broken(exc, resp, rec, strip_usage)
        finally:
            sink.writer.close()
            if sweep is not None and keepalive is not None:
                await sweep.close(keepalive)
            # The last bytes (complete), or those of the read that failed: through `send` now.
            last = observer.feed(resp.take_queued())
            rest = _observed(observer, rec)
        return await _end_stream(send, watch, complete, last, rest, tail)

    async def _relay_body(self, resp: UpstreamResponse, send, rec, watch) -> bool:
        # An error body is kept for its message (they are small); an answer is searched for its
        # usage as it passes, whatever its size (app/proxy/response_body.py).
        usage = UsageFinder() if resp.status < 400 else None
        kept: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await resp.read()
            except UpstreamError as exc:  # headers are out: the response must not look complete
                metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
                rec.error = f"response broken: {exc}"
                watch.abort()
                return False
            last = not chunk or resp.at_end
            if usage is not None:
                usage.feed(chunk)
            elif size <= _MAX_ACCOUNTED_BODY:
                kept.append(chunk)
                size += len(chunk)
            if last:  # usually the whole body arrived in one read: one send
                watch.stop()
                await send({"type": "http.response.body", "body": chunk})
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if usage is not None:
            rec.tail = usage  # its counts are read in the request's accounting
        elif size <= _MAX_ACCOUNTED_BODY:
            rec.error = error_message(kept[0] if len(kept) == 1 else b"".join(kept))
        return True

    # --- request body -------------------------------------------------------------------------

    async def _read_body(self, receive) -> bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > self.max_request_bytes:
                raise BodyTooLarge
            return body
        parts, size = [body], len(body)
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
                return b"".join(parts)

    # --- refusals -----------------------------------------------------------------------------

    async def _unavailable(self, rec: RequestRecord, send) -> None:
        phase = self.runtime.phase
        if phase is Phase.STARTING:
            message, retry = f"The model is still loading ({self.runtime.detail}); retry shortly.", b"10"
        elif phase is Phase.DRAINING:
            message, retry = "The server is shutting down; retry on another replica.", b"5"
        else:
            message, retry = f"The engine is not running ({self.runtime.detail}).", b"30"
        rec.error = f"unavailable: {phase.value}"
        await self._error(
            rec, send, 503, message, code="engine_unavailable", headers=[(b"retry-after", retry)]
        )

    async def _model_refused(self, rec: RequestRecord, send, entry: KeyEntry, model: str | None) -> None:
        rec.rejected = MODEL_NOT_ALLOWED
        rec.error = "model not allowed for the API key"
        metrics.REJECTIONS.labels(MODEL_NOT_ALLOWED).inc()
        allowed = ", ".join(sorted(entry.models or ()))
        what = (
            f"the model {model[:256]!r}"
            if model is not None
            else "a request whose model is not in a JSON body"
        )
        await self._error(
            rec,
            send,
            403,
            f"The API key {entry.name!r} may not use {what}; it may use: {allowed}.",
            code=MODEL_NOT_ALLOWED,
            param="model",
        )

    async def _too_large(self, rec: RequestRecord, send) -> None:
        rec.error = "request body too large"
        await self._error(
            rec,
            send,
            413,
            f"Request body larger than MAX_REQUEST_BYTES ({self.max_request_bytes} bytes).",
            code="request_too_large",
            headers=[(b"connection", b"close")],
        )

    async def _body_failed(self, exc: Exception, rec: RequestRecord, send) -> None:
        if isinstance(exc, BodyTooLarge):
            await self._too_large(rec, send)
        else:  # ClientGone: nobody to answer
            rec.disconnected = True

    async def _upstream_failed(self, rec: RequestRecord, send, exc: UpstreamError) -> None:
        metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
        status, code = UPSTREAM_STATUS.get(exc.kind, (502, "engine_error"))
        rec.error = str(exc)
        await self._error(rec, send, status, f"Upstream engine error: {exc}", code=code)

    @staticmethod
    async def _error(
        rec: RequestRecord,
        send,
        status: int,
        message: str,
        *,
        code: str,
        headers=(),
        param: str | None = None,
    ) -> None:
        rec.status = status
        await send_error(send, status, message, code=code, param=param, headers=[*headers, rec.id_header])
