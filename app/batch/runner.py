"""Runs batches: each line through the proxy's own ASGI app, in this process, as a live request.

Why in-process and not over loopback HTTP: the line passes the same middleware (request id, the
canonical log line with `batch_id`, metrics, in-flight count), the same key check, body limit, media
guard and upstream pool as a live request, with no socket, no key to hand around, and a log field no
client can forge (the batch id travels in the ASGI scope, which only this module builds).

Live traffic first:
- At most BATCH_CONCURRENCY lines are in flight.
- While BATCH_YIELD_THRESHOLD or more live (non-batch) requests are in flight, a line starts only
  when no other line of any batch is in flight: batches keep moving, one line at a time, and the
  engine's capacity goes to live requests. Lines already running are let finish.
- No line starts unless the engine is ready (not while loading or draining).

Resume: a batch is a row whose status says where it is; the runner (re)starts every unfinished
batch when the store opens, rebuilds the list of lines from the input file, and runs the lines that
have no recorded result. A line that was in flight when the process died was not recorded: it runs
again (the engine may see a line twice; the output never holds it twice).

Engine trouble is not the line's fault: an answer that the engine is unavailable (503 from the
proxy while the engine loads or drains) or unreachable (502) puts the line back in the queue (up to
MAX_ATTEMPTS, then it is recorded with that answer).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import time
from typing import Any

import orjson

from app import metrics
from app.batch.store import TERMINAL, AsyncStore, Result, Store, now
from app.batch.validate import Line, LineError, Parsed, parse_input, read_body
from app.logs import get_logger
from app.middleware import BATCH_KEY, BATCH_OWNER_KEY
from app.runtime import Phase, Runtime

log = get_logger("app.batch")

MAX_ATTEMPTS = 5
RETRY_DELAY = 1.0
GATE_POLL = 0.05
PROGRESS_INTERVAL = 10.0
_RETRY_CODES = frozenset({"engine_unavailable", "engine_unreachable", "engine_error"})


def request_id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def error_line(err: LineError) -> Result:
    data = orjson.dumps(
        {"id": request_id(), "custom_id": err.custom_id, "response": None, "error": err.as_error()}
    )
    return Result(err.line, False, data)


def answer_line(line: Line, rid: str, status: int, payload: bytes) -> Result:
    """The output (2xx) or error line of an answered request, in OpenAI's batch output shape."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        text = payload[:1000].decode("utf-8", "replace")
        body = {"error": {"message": text, "type": "api_error", "param": None, "code": None}}
    ok = 200 <= status < 300
    tokens_in = tokens_out = 0
    usage = body.get("usage") if ok and isinstance(body, dict) else None
    if isinstance(usage, dict):
        tokens_in = int(usage.get("prompt_tokens") or 0)
        tokens_out = int(usage.get("completion_tokens") or 0)
    data = orjson.dumps(
        {
            "id": rid,
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": rid, "body": body},
            "error": None,
        }
    )
    return Result(line.line, ok, data, tokens_in, tokens_out)


def _retryable(status: int, payload: bytes) -> bool:
    """The proxy's own answer that the engine is not there (not an answer of the engine's)."""
    if status not in (502, 503):
        return False
    try:
        err = orjson.loads(payload).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return False
    return isinstance(err, dict) and err.get("code") in _RETRY_CODES


class Runner:
    def __init__(
        self,
        store: AsyncStore,
        runtime: Runtime,
        *,
        concurrency: int,
        yield_threshold: int,
        auth: bytes | None = None,
        not_live: Any = lambda: 0,
    ) -> None:
        self.store = store
        self.not_live = not_live  # requests in flight that are not live traffic (Batch API calls)
        self.runtime = runtime
        self.concurrency = concurrency
        self.yield_threshold = yield_threshold
        self.auth = auth
        self.pipeline: Any = None  # the app's ASGI entry point, set by create_app
        self.jobs: dict[str, Job] = {}
        self.inflight = 0  # lines holding a slot
        self.active = 0  # lines inside the pipeline now (counted in runtime.inflight too)
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self.poll_s: float | None = None
        """Look at the store at least this often, woken or not (None: only when woken)."""

    # --- the loop -------------------------------------------------------------------------------

    def wake(self) -> None:
        """A batch was created or cancelled: look at the store again."""
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                for doc, owner in await self.store.run(Store.unfinished):
                    job = self.jobs.get(doc["id"])
                    if job is None:
                        job = self.jobs[doc["id"]] = Job(self, doc, owner)
                        job.task = asyncio.ensure_future(job.run())
                        job.task.add_done_callback(lambda _t, i=doc["id"]: self.jobs.pop(i, None))
                    elif doc["status"] == "cancelling":
                        job.stop.set()
                if self.poll_s is None:
                    await self._wake.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every job: lines in flight hang up (so the engine aborts them) and stay unrecorded."""
        jobs = list(self.jobs.values())
        for job in jobs:
            job.halt()
        tasks = [j.task for j in jobs if j.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()

    # --- slots ----------------------------------------------------------------------------------

    def live(self) -> int:
        """Live requests in flight: all the proxy counts, less batch lines and Batch API calls."""
        return self.runtime.inflight - self.active - self.not_live()

    def _may_start(self) -> bool:
        if self.runtime.phase is not Phase.READY or self.inflight >= self.concurrency:
            return False
        return self.yield_threshold == 0 or self.inflight == 0 or self.live() < self.yield_threshold

    async def slot(self, stop: asyncio.Event) -> bool:
        """Wait for room for one more line; False if `stop` was set first."""
        while not stop.is_set():
            if self._may_start():
                self.inflight += 1
                metrics.BATCH_IN_FLIGHT.inc()
                return True
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                # Live requests finishing are not signalled: poll for them.
                await asyncio.wait_for(self._changed.wait(), GATE_POLL)
        return False

    def release(self) -> None:
        self.inflight -= 1
        metrics.BATCH_IN_FLIGHT.dec()
        self._changed.set()

    # --- one request ----------------------------------------------------------------------------

    async def send(
        self, batch_id: str, path: str, body: bytes, rid: str, gone: asyncio.Event, owner: str = ""
    ) -> tuple[int, bytes] | None:
        """(status, body) of the app's answer, or None if the line hung up before it was complete.
        `owner`: the batch's key, whose usage the line is."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        if self.auth is not None:
            headers.append((b"authorization", b"Bearer " + self.auth))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": None,
            "server": None,
            "state": {},
            BATCH_KEY: batch_id,
            BATCH_OWNER_KEY: owner,
        }
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # like a client that keeps its connection open until it leaves
            return {"type": "http.disconnect"}

        status = 0
        chunks: list[bytes] = []
        complete = False

        async def send(message: dict) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                complete = not message.get("more_body", False)

        self.active += 1
        try:
            await self.pipeline(scope, receive, send)
        finally:
            self.active -= 1
            self._changed.set()
        if gone.is_set() or not complete:
            return None
        return status, b"".join(chunks)


class Job:
    """One batch, from validation to its output files."""

    def __init__(self, runner: Runner, doc: dict, owner: str = "") -> None:
        self.runner = runner
        self.store = runner.store
        self.id: str = doc["id"]
        self.doc = doc
        self.owner = owner
        self.task: asyncio.Task | None = None
        self.stop = asyncio.Event()  # cancel, expiry or shutdown: start no more lines
        self.halted = False  # shutdown: end without finalizing
        self.expired = False
        self.attempts: dict[int, int] = {}
        self.hangups: set[asyncio.Event] = set()
        self._last_progress = time.monotonic()

    def halt(self) -> None:
        self.halted = True
        self.stop.set()

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch runner error", batch_id=self.id)

    async def _run(self) -> None:
        path = self.store.root / "files" / self.doc["input_file_id"]
        try:
            parsed = await asyncio.to_thread(parse_input, path, self.doc["endpoint"])
        except OSError as exc:
            await self._fail("invalid_file", f"The input file cannot be read: {exc.strerror or exc}.")
            return
        if self.doc["status"] == "validating" and not await self._start(parsed):
            return
        recorded = await self.store.run(Store.recorded_lines, self.id)
        pending = collections.deque(line for line in parsed.lines if line.line not in recorded)
        if pending and self.doc["status"] == "in_progress":
            log.info(
                "batch running",
                batch_id=self.id,
                total=parsed.total,
                to_run=len(pending),
                recorded=len(recorded),
            )
        if self.doc["status"] != "cancelling":
            await self._dispatch(path, pending)
        if self.halted:
            return
        await self._finish(parsed.lines)

    async def _fail(self, code: str, message: str) -> None:
        def extra(doc: dict) -> None:
            doc["errors"] = {
                "object": "list",
                "data": [{"code": code, "message": message, "param": None, "line": None}],
            }

        self.doc = await self.store.run(Store.finalize, self.id, "failed", extra)
        log.warning("batch failed", batch_id=self.id, code=code, error=message)

    async def _start(self, parsed: Parsed) -> bool:
        """validating -> in_progress, with the invalid lines recorded; False if the batch ended."""
        if parsed.total == 0:
            await self._fail("empty_file", "The batch input file is empty.")
            return False
        if parsed.errors:
            await self.store.run(Store.record, self.id, [error_line(e) for e in parsed.errors])
            metrics.BATCH_LINES.labels("invalid").inc(len(parsed.errors))

        def start(doc: dict) -> dict | None:
            if doc["status"] != "validating":  # cancelled meanwhile
                return None
            doc.update(status="in_progress", in_progress_at=now(), model=parsed.model)
            doc["request_counts"]["total"] = parsed.total
            return doc

        def total(doc: dict) -> dict:
            doc["request_counts"]["total"] = parsed.total
            return doc

        doc = await self.store.run(Store.update_batch, self.id, start)
        if doc is not None and doc["status"] == "cancelling":
            doc = await self.store.run(Store.update_batch, self.id, total)
        assert doc is not None
        self.doc = doc
        if parsed.errors:
            log.info("batch lines refused", batch_id=self.id, invalid=len(parsed.errors))
        return True

    async def _dispatch(self, path: Any, pending: collections.deque[Line]) -> None:
        runner = self.runner
        fd = os.open(path, os.O_RDONLY)
        tasks: set[asyncio.Task] = set()
        stopped = asyncio.ensure_future(self.stop.wait())
        expires = self.doc.get("expires_at")
        timer = (
            asyncio.get_running_loop().call_later(max(0.0, expires - time.time()), self._expire)
            if expires is not None
            else None
        )
        try:
            while pending or tasks:
                if self._expired():
                    self.expired = True
                    self.stop.set()
                if self.stop.is_set():
                    break
                if not pending:  # lines in flight may come back for a retry
                    await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if not await runner.slot(self.stop):
                    break
                line = pending.popleft()
                task = asyncio.ensure_future(self._line(fd, line, pending))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            for gone in list(self.hangups):  # cancel, expiry, shutdown: hang up on what is running
                gone.set()
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            if timer is not None:
                timer.cancel()
            stopped.cancel()
            os.close(fd)

    def _expire(self) -> None:
        """The completion window is over: start no more lines, hang up on those running."""
        self.expired = True
        self.stop.set()

    def _expired(self) -> bool:
        expires = self.doc.get("expires_at")
        return expires is not None and time.time() >= expires

    async def _line(self, fd: int, line: Line, pending: collections.deque[Line]) -> None:
        runner = self.runner
        gone = asyncio.Event()
        self.hangups.add(gone)
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, read_body, fd, line)
            rid = request_id()
            answer = await runner.send(self.id, self.doc["endpoint"], body, rid, gone, self.owner)
            if answer is None:  # hung up: cancel, expiry or shutdown; not recorded
                return
            status, payload = answer
            attempt = self.attempts[line.line] = self.attempts.get(line.line, 0) + 1
            if _retryable(status, payload) and attempt < MAX_ATTEMPTS:
                await asyncio.sleep(RETRY_DELAY)
                pending.append(line)
                return
            result = answer_line(line, rid, status, payload)
            await self.store.record(self.id, result)
            metrics.BATCH_LINES.labels("completed" if result.ok else "failed").inc()
        finally:
            self.hangups.discard(gone)
            runner.release()
        if time.monotonic() - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = time.monotonic()
            await self._log_progress()

    async def _log_progress(self) -> None:
        doc = await self.store.run(Store.get_batch, self.id)
        if doc is not None:
            counts = doc["request_counts"]
            log.info("batch progress", batch_id=self.id, **counts, in_flight=self.runner.inflight)

    async def _finish(self, lines: list[Line]) -> None:
        doc = await self.store.run(Store.get_batch, self.id)
        assert doc is not None
        if doc["status"] in TERMINAL:
            return
        if doc["status"] == "cancelling":
            status = "cancelled"
        elif self.expired:
            status = "expired"
            recorded = await self.store.run(Store.recorded_lines, self.id)
            late = [
                LineError(
                    line.line,
                    line.custom_id,
                    "batch_expired",
                    "This request could not be executed before the completion window expired.",
                )
                for line in lines  # not run, or hung up on at the expiry
                if line.line not in recorded
            ]
            if late:
                await self.store.run(Store.record, self.id, [error_line(e) for e in late])
                metrics.BATCH_LINES.labels("expired").inc(len(late))
        else:
            status = "completed"

            def finalizing(d: dict) -> dict | None:
                if d["status"] != "in_progress":
                    return None
                d.update(status="finalizing", finalizing_at=now())
                return d

            await self.store.run(Store.update_batch, self.id, finalizing)
        self.doc = await self.store.run(Store.finalize, self.id, status)
        log.info(
            "batch " + status,
            batch_id=self.id,
            **self.doc["request_counts"],
            output_file_id=self.doc["output_file_id"],
            error_file_id=self.doc["error_file_id"],
        )
