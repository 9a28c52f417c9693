"""Admission control: how many requests go to the engine at once, who waits, and who is refused.

- **The proxy's queue** (`MAX_CONCURRENT_REQUESTS`, `MAX_QUEUED_REQUESTS`, `QUEUE_TIMEOUT`): at
  most N requests are in flight to the engine; past them up to Q wait here, and past that (or after
  QUEUE_TIMEOUT in the queue) a request gets `429` with a `Retry-After` computed from the recent
  completion rate. The queue is fair across keys: round-robin across the keys that wait, first-come
  within a key. When it is full, a key with nothing queued still gets a place, and the request
  refused is the newest of the key holding the most places (the newcomer itself when its key holds
  as many as any other). A waiter whose client hangs up leaves at once (the handler's hang-up hook
  cancels its task). Every waiter ends exactly one way: granted a slot, evicted, timed out, or gone.
- **A key's limits** (app/keys.py): `max_parallel_requests` (its requests in flight, queued ones
  included), `rpm` and `tpm` as token buckets that refill continuously (a minute's worth of capacity,
  refilled over a minute, as OpenAI's limits behave): `429` with OpenAI's `x-ratelimit-*` headers.
  Tokens are counted after the fact, from the engine's usage (`charge`): a request is let in while
  the key has tokens left, and the tokens it used are taken when it ends, so a key can go past its
  tpm by the requests it had in flight; then it waits until the bucket refills.

All of this is per process: with several proxy processes each would enforce its own, so `share`
divides every limit by their number (rounded up); connections spread evenly enough across
processes for the sum to stay close to the limit. The queue and windows start empty at a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from app import metrics
from app.keys import KeyEntry

QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
KEY_PARALLEL = "key_parallel"
KEY_RPM = "key_rpm"
KEY_TPM = "key_tpm"
MODEL_NOT_ALLOWED = "model_not_allowed"

RATE_WINDOW_S = 30.0
"""Completions counted for Retry-After: those of the last this many seconds."""
RETRY_MIN_S, RETRY_MAX_S = 1, 60

_GRANTED, _EVICTED, _TIMED_OUT = "granted", "evicted", "timed_out"


class Refused(Exception):
    """A request the proxy answers itself with `status` (429), before the engine sees it."""

    def __init__(self, reason: str, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = 429
        self.message = message
        self.headers = headers


def fmt_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it: `20ms`, `1s`, `7.66s`, `6m0s`, `1h2m3s`."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{_trim(seconds)}s"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{_trim(rest)}s"


def _trim(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


class Bucket:
    """A token bucket of `capacity` per minute, refilled continuously; may go below zero (tokens
    counted after the fact)."""

    __slots__ = ("capacity", "per_s", "level", "stamp")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.per_s = capacity / 60.0
        self.level = float(capacity)
        self.stamp = now

    def refill(self, capacity: int, now: float) -> None:
        if capacity != self.capacity:  # the key file changed its limit
            self.capacity, self.per_s = capacity, capacity / 60.0
        self.level = min(float(self.capacity), self.level + (now - self.stamp) * self.per_s)
        self.stamp = now

    def until(self, level: float) -> float:
        """Seconds until the bucket holds `level`."""
        return max(0.0, (level - self.level) / self.per_s)


class _KeyState:
    __slots__ = ("in_flight", "rpm", "tpm")

    def __init__(self) -> None:
        self.in_flight = 0
        self.rpm: Bucket | None = None
        self.tpm: Bucket | None = None


class _Waiter:
    __slots__ = ("key", "fut", "timer", "seq", "queued")

    def __init__(self, key: str, fut: asyncio.Future, seq: int) -> None:
        self.key = key
        self.fut = fut
        self.seq = seq
        self.timer: asyncio.TimerHandle | None = None
        self.queued = True


class Ticket:
    """What a request holds while it is in flight: one of the engine slots and/or a place in its
    key's count. `release()` is idempotent."""

    __slots__ = ("_admission", "_key", "_state", "_slot", "headers")

    def __init__(self, admission: Admission, key: str, state: _KeyState | None) -> None:
        self._admission = admission
        self._key = key
        self._state = state
        self._slot = False
        self.headers: list[tuple[bytes, bytes]] = []
        """x-ratelimit-* for a key with rpm or tpm, for the response."""

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= 1
            self._state = None
        if self._slot:
            self._slot = False
            self._admission._release_slot()


class Admission:
    def __init__(
        self,
        max_concurrent: int | None = None,
        max_queued: int | None = None,
        queue_timeout: float = 30.0,
        *,
        share: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.share = max(1, share)
        self.max_concurrent = self._part(max_concurrent)
        if self.max_concurrent is None:
            self.max_queued = 0
        else:  # unset: as many places as slots
            self.max_queued = self._part(max_queued if max_queued is not None else max_concurrent) or 0
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._used = 0
        self._queued = 0
        self._queues: dict[str, deque[_Waiter]] = {}
        self._rotation: deque[str] = deque()
        self._seq = itertools.count()
        self._keys: dict[str, _KeyState] = {}
        self._done: deque[list[int]] = deque()  # [second, completions in it]
        self._since = clock()

    def _part(self, limit: int | None) -> int | None:
        return None if limit is None else math.ceil(limit / self.share)

    @property
    def gated(self) -> bool:
        """MAX_CONCURRENT_REQUESTS is set."""
        return self.max_concurrent is not None

    def needed(self, entry: KeyEntry | None) -> bool:
        return self.max_concurrent is not None or (entry is not None and entry.limited)

    # --- a request --------------------------------------------------------------------------

    async def enter(self, key: str, entry: KeyEntry | None, rec: Any) -> Ticket:
        """A ticket once the request may go to the engine; raises Refused (the request is then
        answered 429), or CancelledError when its client hung up while it waited."""
        now = self._clock()
        state = self._check_key(entry, now) if entry is not None and entry.limited else None
        ticket = Ticket(self, key, state)
        if entry is not None and (entry.rpm is not None or entry.tpm is not None):
            ticket.headers = self._ratelimit_headers(entry, self._keys[entry.name])
        if self.max_concurrent is None:
            return ticket
        try:
            await self._take_slot(key, rec, now)
        except Refused:
            if state is not None and state.rpm is not None:
                state.rpm.level += 1  # refused here: not a request the key made to the engine
            ticket.release()
            raise
        except BaseException:
            ticket.release()
            raise
        ticket._slot = True
        return ticket

    def charge(self, name: str | None, tokens: int) -> None:
        """The tokens a request of key `name` used, once the engine reported them."""
        state = self._keys.get(name) if name is not None else None
        if state is not None and state.tpm is not None and tokens > 0:
            state.tpm.refill(state.tpm.capacity, self._clock())
            state.tpm.level -= tokens

    # --- a key's limits ---------------------------------------------------------------------

    def _check_key(self, entry: KeyEntry, now: float) -> _KeyState:
        state = self._keys.get(entry.name)
        if state is None:
            state = self._keys[entry.name] = _KeyState()
        state.rpm = self._bucket(state.rpm, entry.rpm, now)
        state.tpm = self._bucket(state.tpm, entry.tpm, now)
        parallel = self._part(entry.max_parallel_requests)
        if parallel is not None and state.in_flight >= parallel:
            self._refuse_key(
                KEY_PARALLEL,
                f"API key {entry.name!r} has {parallel} requests in flight, its max_parallel_requests.",
                entry,
                state,
                1.0,
            )
        if state.rpm is not None and state.rpm.level < 1:
            self._refuse_key(
                KEY_RPM,
                f"Rate limit reached for API key {entry.name!r}: {state.rpm.capacity} requests per minute.",
                entry,
                state,
                state.rpm.until(1),
            )
        if state.tpm is not None and state.tpm.level <= 0:
            self._refuse_key(
                KEY_TPM,
                f"Rate limit reached for API key {entry.name!r}: {state.tpm.capacity} tokens per minute.",
                entry,
                state,
                state.tpm.until(min(1.0, state.tpm.capacity)),
            )
        if state.rpm is not None:
            state.rpm.level -= 1
        state.in_flight += 1
        return state

    def _bucket(self, bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
        capacity = self._part(limit)
        if capacity is None:
            return None
        if bucket is None:
            return Bucket(capacity, now)
        bucket.refill(capacity, now)
        return bucket

    def _refuse_key(self, reason: str, message: str, entry: KeyEntry, state: _KeyState, wait: float) -> None:
        retry = min(RETRY_MAX_S, max(RETRY_MIN_S, math.ceil(wait)))
        headers = [(b"retry-after", str(retry).encode()), *self._ratelimit_headers(entry, state)]
        metrics.REJECTIONS.labels(reason).inc()
        raise Refused(reason, message, headers)

    @staticmethod
    def _ratelimit_headers(entry: KeyEntry, state: _KeyState) -> list[tuple[bytes, bytes]]:
        """OpenAI's: limit, remaining, and time until the bucket is full again."""
        out = []
        for kind, bucket in (("requests", state.rpm), ("tokens", state.tpm)):
            if bucket is None:
                continue
            out += [
                (b"x-ratelimit-limit-" + kind.encode(), str(bucket.capacity).encode()),
                (b"x-ratelimit-remaining-" + kind.encode(), str(max(0, math.floor(bucket.level))).encode()),
                (b"x-ratelimit-reset-" + kind.encode(), fmt_duration(bucket.until(bucket.capacity)).encode()),
            ]
        return out

    # --- the engine's slots and the queue ----------------------------------------------------

    async def _take_slot(self, key: str, rec: Any, now: float) -> None:
        assert self.max_concurrent is not None
        if self._used < self.max_concurrent:
            self._used += 1
            metrics.ADMISSION_IN_FLIGHT.set(self._used)
            metrics.ADMISSION_WAIT.observe(0.0)
            rec.queued_s = 0.0
            return
        if self._queued >= self.max_queued:
            victim = self._victim(key) if self.max_queued else None
            if victim is None:
                raise self._queue_refusal(QUEUE_FULL)
            self._evict(victim)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(key, loop.create_future(), next(self._seq))
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._rotation.append(key)
        queue.append(waiter)
        self._queued += 1
        metrics.ADMISSION_QUEUE_DEPTH.set(self._queued)
        waiter.timer = loop.call_later(self.queue_timeout, self._expire, waiter)
        try:
            outcome = await waiter.fut
        except asyncio.CancelledError:  # the client hung up (or the server is stopping)
            fut = waiter.fut
            if fut.done() and not fut.cancelled() and fut.result() == _GRANTED:
                self._release_slot()  # granted as it left: hand the slot on
            else:
                self._dequeue(waiter)
            raise
        finally:
            rec.queued_s = self._clock() - now
        if outcome == _GRANTED:
            metrics.ADMISSION_WAIT.observe(rec.queued_s)
            return
        raise self._queue_refusal(QUEUE_FULL if outcome == _EVICTED else QUEUE_TIMEOUT)

    def _victim(self, key: str) -> str | None:
        """The key whose newest waiter gives its place up to a newcomer of `key`, or None when the
        newcomer is refused itself."""
        mine = len(self._queues.get(key, ()))
        others = [(len(q), q[-1].seq, k) for k, q in self._queues.items() if k != key and q]
        if not others:
            return None
        most, _, victim = max(others)
        if mine and mine + 1 >= most:
            return None
        return victim

    def _evict(self, key: str) -> None:
        queue = self._queues[key]
        waiter = queue.pop()
        if not queue:
            del self._queues[key]
            self._rotation.remove(key)
        self._unqueued(waiter)
        if not waiter.fut.done():
            waiter.fut.set_result(_EVICTED)

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.queued:
            self._dequeue(waiter)
            if not waiter.fut.done():
                waiter.fut.set_result(_TIMED_OUT)

    def _dequeue(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        queue = self._queues[waiter.key]
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.key]
            self._rotation.remove(waiter.key)
        self._unqueued(waiter)

    def _unqueued(self, waiter: _Waiter) -> None:
        waiter.queued = False
        if waiter.timer is not None:
            waiter.timer.cancel()
        self._queued -= 1
        metrics.ADMISSION_QUEUE_DEPTH.set(self._queued)

    def _release_slot(self) -> None:
        """A request left the engine: its slot goes to the next key in turn, or is freed."""
        self._completed(self._clock())
        while self._rotation:
            key = self._rotation.popleft()
            queue = self._queues[key]
            waiter = queue.popleft()
            if queue:
                self._rotation.append(key)
            else:
                del self._queues[key]
            self._unqueued(waiter)
            if not waiter.fut.done():  # else cancelled by a hang-up its task has not seen yet
                waiter.fut.set_result(_GRANTED)
                return
        self._used -= 1
        metrics.ADMISSION_IN_FLIGHT.set(self._used)

    # --- Retry-After ------------------------------------------------------------------------

    def _completed(self, now: float) -> None:
        second = int(now)
        if self._done and self._done[-1][0] == second:
            self._done[-1][1] += 1
        else:
            self._done.append([second, 1])
            while self._done[0][0] < now - RATE_WINDOW_S:
                self._done.popleft()

    def completion_rate(self, now: float | None = None) -> float:
        """Requests that left the engine per second, over the last RATE_WINDOW_S (or since start)."""
        now = self._clock() if now is None else now
        while self._done and self._done[0][0] < now - RATE_WINDOW_S:
            self._done.popleft()
        span = max(1.0, min(RATE_WINDOW_S, now - self._since))
        return sum(n for _, n in self._done) / span

    def retry_after(self, position: int) -> int:
        """Seconds until `position` more requests have left the engine at the recent rate."""
        rate = self.completion_rate()
        if rate <= 0:
            return RETRY_MAX_S
        return min(RETRY_MAX_S, max(RETRY_MIN_S, math.ceil(position / rate)))

    def _queue_refusal(self, reason: str) -> Refused:
        metrics.REJECTIONS.labels(reason).inc()
        retry = self.retry_after(self._queued + 1)
        if reason == QUEUE_TIMEOUT:
            message = f"The server is busy: the request waited {self.queue_timeout:g} s for the engine."
        else:
            message = "The server is busy: too many requests are waiting for the engine."
        return Refused(reason, message + f" Retry after {retry} s.", [(b"retry-after", str(retry).encode())])

    # --- for the dashboard ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "max_concurrent": self.max_concurrent,
            "max_queued": self.max_queued if self.gated else None,
            "in_flight": self._used,
            "queued": self._queued,
            "queued_by_key": {k: len(q) for k, q in self._queues.items()},
            "completions_per_s": round(self.completion_rate(), 3),
        }
