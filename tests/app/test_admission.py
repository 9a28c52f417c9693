"""Admission control's queue and a key's limits (app/admission.py), driven directly: which request
goes next, which is refused, and that every one ends exactly once. Through the proxy: tests/app/
test_admission_proxy.py; against real vLLM: tests/integration/test_admission_stack.py."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from app import metrics
from app.admission import (
    KEY_PARALLEL,
    KEY_RPM,
    KEY_TPM,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    Admission,
    Refused,
    fmt_duration,
)
from app.keys import KeyEntry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rec() -> SimpleNamespace:
    return SimpleNamespace(queued_s=None)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Run:
    """Requests through one Admission, each a task that records how it ended."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.tickets: dict[str, object] = {}
        self.ended: dict[str, str] = {}
        self.served: list[str] = []
        self.tasks: dict[str, asyncio.Task] = {}

    def send(self, name: str, key: str) -> asyncio.Task:
        async def one() -> None:
            try:
                ticket = await self.admission.enter(key, None, rec())
            except Refused as exc:
                self.ended[name] = exc.reason
                return
            except asyncio.CancelledError:
                self.ended[name] = "gone"
                raise
            self.tickets[name] = ticket
            self.served.append(name)

        task = self.tasks[name] = asyncio.ensure_future(one())
        # Cancelled before it first ran: it never reached enter(), and gave nothing back.
        task.add_done_callback(lambda t: t.cancelled() and self.ended.setdefault(name, "gone"))
        return task

    def finish(self, name: str) -> None:
        self.tickets.pop(name).release()  # type: ignore[attr-defined]
        self.ended[name] = "served"


def test_past_the_slots_requests_wait_and_a_key_is_served_first_come():
    async def main() -> None:
        run = Run(Admission(2, 4, 30))
        for name in ("a1", "a2", "a3", "a4", "a5"):
            run.send(name, "a")
            await settle()
        assert run.served == ["a1", "a2"] and run.admission._queued == 3
        for name in ("a1", "a2", "a3", "a4", "a5"):
            run.finish(name)
            await settle()
        assert run.served == ["a1", "a2", "a3", "a4", "a5"]
        assert run.admission._used == 0 and run.admission._queued == 0

    asyncio.run(main())


def test_waiting_keys_take_turns():
    async def main() -> None:
        run = Run(Admission(1, 10, 30))
        for name, key in [("x", "a"), ("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b")]:
            run.send(name, key)
            await settle()
        for name in ("x", "a1", "b1", "a2", "b2", "a3"):
            run.finish(name)
            await settle()
        assert run.served == ["x", "a1", "b1", "a2", "b2", "a3"]

    asyncio.run(main())


def test_a_full_queue_gives_a_quiet_key_a_place_and_refuses_the_bursting_keys_newest():
    async def main() -> None:
        before = metrics.REJECTIONS.labels(QUEUE_FULL).value
        run = Run(Admission(1, 3, 30))
        for name in ("x", "a1", "a2", "a3"):
            run.send(name, "a")
            await settle()
        run.send("a4", "a")  # its own key holds the most places: the newcomer is refused
        await settle()
        assert run.ended == {"a4": QUEUE_FULL}
        run.send("b1", "b")  # a key with nothing queued gets a place: a's newest gives it up
        await settle()
        assert run.ended == {"a4": QUEUE_FULL, "a3": QUEUE_FULL}
        run.send("b2", "b")  # b holds 1, a holds 2: b's newcomer would tie a, so it is refused
        await settle()
        assert run.ended["b2"] == QUEUE_FULL
        run.send("c1", "c")  # a holds the most places: its newest goes
        await settle()
        assert run.ended["a2"] == QUEUE_FULL
        for name in ("x", "a1", "b1", "c1"):
            run.finish(name)
            await settle()
        assert run.served == ["x", "a1", "b1", "c1"]
        assert metrics.REJECTIONS.labels(QUEUE_FULL).value - before == 4

    asyncio.run(main())


def test_a_newcomer_that_ties_the_largest_key_is_refused_but_a_smaller_one_evicts_the_newest():
    async def main() -> None:
        run = Run(Admission(1, 4, 30))
        for name, key in [("x", "z"), ("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")]:
            run.send(name, key)
            await settle()
        run.send("c1", "c")  # a and b both hold 2: the newest of them (b2) gives its place up
        await settle()
        assert run.ended == {"b2": QUEUE_FULL}
        assert run.admission._queued == 4

    asyncio.run(main())


def test_no_queue_refuses_at_once_past_the_slots():
    async def main() -> None:
        run = Run(Admission(1, 0, 30))
        run.send("x", "a")
        run.send("y", "b")
        await settle()
        assert run.served == ["x"] and run.ended == {"y": QUEUE_FULL}

    asyncio.run(main())


def test_a_request_waiting_past_the_queue_timeout_is_refused_with_retry_after():
    async def main() -> None:
        admission = Admission(1, 2, 0.2)
        first = await admission.enter("a", None, rec())
        r = rec()
        with pytest.raises(Refused) as refused:
            await admission.enter("a", None, r)
        assert refused.value.reason == QUEUE_TIMEOUT and refused.value.status == 429
        assert 0.2 <= r.queued_s < 2
        retry = dict(refused.value.headers)[b"retry-after"]
        assert 1 <= int(retry) <= 60
        assert admission._queued == 0
        first.release()
        assert admission._used == 0

    asyncio.run(main())


def test_a_waiter_whose_client_hangs_up_leaves_the_queue_at_once():
    async def main() -> None:
        run = Run(Admission(1, 5, 30))
        for name in ("x", "a1", "a2", "a3"):
            run.send(name, "a")
            await settle()
        run.tasks["a2"].cancel()  # what the handler's hang-up hook does
        await settle()
        assert run.admission._queued == 2 and run.ended["a2"] == "gone"
        run.finish("x")
        await settle()
        run.finish("a1")
        await settle()
        assert run.served == ["x", "a1", "a3"]

    asyncio.run(main())


def test_a_slot_granted_to_a_waiter_that_hung_up_meanwhile_goes_to_the_next():
    async def main() -> None:
        run = Run(Admission(1, 5, 30))
        for name in ("x", "a1", "a2"):
            run.send(name, "a")
            await settle()
        run.finish("x")  # a1 is granted the slot...
        run.tasks["a1"].cancel()  # ...and hangs up before its task runs again
        await settle()
        assert run.ended["a1"] == "gone" and run.served == ["x", "a2"]
        run.finish("a2")
        assert run.admission._used == 0 and run.admission._queued == 0

    asyncio.run(main())


def test_every_request_ends_exactly_once_under_random_arrivals_hangups_and_completions():
    async def main() -> None:
        rng = random.Random(18)
        admission = Admission(3, 5, 0.02)
        run = Run(admission)
        names = [f"r{i}" for i in range(400)]
        for name in names:
            run.send(name, rng.choice("abcd"))
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            if rng.random() < 0.1:
                waiting = [n for n, t in run.tasks.items() if not t.done()]
                if waiting:
                    run.tasks[rng.choice(waiting)].cancel()
            if run.tickets and rng.random() < 0.5:
                run.finish(rng.choice(list(run.tickets)))
            if rng.random() < 0.03:  # long enough for waiters to time out
                await asyncio.sleep(0.03)
        while run.tickets or not all(t.done() for t in run.tasks.values()):
            for name in list(run.tickets):
                run.finish(name)
            await asyncio.sleep(0.01)
        assert sorted(run.ended) == sorted(names)
        assert set(run.ended.values()) == {"served", "gone", QUEUE_FULL, QUEUE_TIMEOUT}
        assert len(run.served) == list(run.ended.values()).count("served")
        assert admission._used == 0 and admission._queued == 0 and not admission._queues
        assert admission.max_concurrent == 3

    asyncio.run(main())


def test_retry_after_is_the_queue_position_over_the_recent_completion_rate():
    clock = Clock()
    admission = Admission(4, 8, 30, clock=clock)
    assert admission.retry_after(5) == 60  # nothing completed yet: the most
    clock.now += 10
    for _ in range(20):  # 20 completions over the last 10 s: 2 a second
        admission._completed(clock.now)
    assert admission.completion_rate() == 2.0
    assert admission.retry_after(7) == 4
    assert admission.retry_after(1) == 1
    assert admission.retry_after(10_000) == 60
    clock.now += 60  # all older than the window
    assert admission.retry_after(3) == 60


def test_a_keys_parallel_limit_counts_its_requests_in_flight():
    async def main() -> None:
        admission = Admission()
        key = KeyEntry("team", b"s", max_parallel_requests=2)
        t1 = await admission.enter("team", key, rec())
        await admission.enter("team", key, rec())
        with pytest.raises(Refused) as refused:
            await admission.enter("team", key, rec())
        assert refused.value.reason == KEY_PARALLEL and dict(refused.value.headers)[b"retry-after"] == b"1"
        t1.release()
        t1.release()  # idempotent
        await admission.enter("team", key, rec())
        with pytest.raises(Refused):
            await admission.enter("team", key, rec())

    asyncio.run(main())


def test_rpm_is_a_bucket_refilled_over_a_minute_with_openai_headers():
    async def main() -> None:
        clock = Clock()
        admission = Admission(clock=clock)
        key = KeyEntry("team", b"s", rpm=3)
        headers = []
        for _ in range(3):
            ticket = await admission.enter("team", key, rec())
            ticket.release()
            headers.append(dict(ticket.headers))
        assert [h[b"x-ratelimit-remaining-requests"] for h in headers] == [b"2", b"1", b"0"]
        assert headers[0][b"x-ratelimit-limit-requests"] == b"3"
        assert headers[2][b"x-ratelimit-reset-requests"] == b"1m0s"  # 3 used, refilled at 3 a minute
        with pytest.raises(Refused) as refused:
            await admission.enter("team", key, rec())
        got = dict(refused.value.headers)
        assert refused.value.reason == KEY_RPM
        assert got[b"retry-after"] == b"20"  # one request's worth: 20 s at 3 a minute
        assert got[b"x-ratelimit-remaining-requests"] == b"0"
        clock.now += 20
        (await admission.enter("team", key, rec())).release()
        with pytest.raises(Refused):
            await admission.enter("team", key, rec())

    asyncio.run(main())


def test_tpm_is_charged_after_the_fact_and_refuses_while_the_bucket_is_empty():
    async def main() -> None:
        clock = Clock()
        admission = Admission(clock=clock)
        key = KeyEntry("team", b"s", tpm=600)  # 10 tokens a second
        ticket = await admission.enter("team", key, rec())
        assert dict(ticket.headers)[b"x-ratelimit-remaining-tokens"] == b"600"
        admission.charge("team", 900)  # the request used more than the minute's worth
        ticket.release()
        with pytest.raises(Refused) as refused:
            await admission.enter("team", key, rec())
        got = dict(refused.value.headers)
        assert refused.value.reason == KEY_TPM
        assert got[b"x-ratelimit-remaining-tokens"] == b"0"
        assert got[b"retry-after"] == b"31"  # 300 tokens owed plus one, at 10 a second
        assert got[b"x-ratelimit-reset-tokens"] == b"1m30s"
        clock.now += 31
        (await admission.enter("team", key, rec())).release()

    asyncio.run(main())


def test_a_refusal_by_the_queue_gives_the_request_back_to_the_keys_rpm():
    async def main() -> None:
        admission = Admission(1, 0, 30)
        key = KeyEntry("team", b"s", rpm=2)
        held = await admission.enter("team", key, rec())
        with pytest.raises(Refused) as refused:
            await admission.enter("team", key, rec())
        assert refused.value.reason == QUEUE_FULL
        held.release()
        (await admission.enter("team", key, rec())).release()  # the second of two

    asyncio.run(main())


def test_share_divides_the_limits_between_processes():
    admission = Admission(10, 5, 30, share=4)
    assert (admission.max_concurrent, admission.max_queued) == (3, 2)
    assert Admission(8, None, 30).max_queued == 8
    assert not Admission().gated and Admission(1).gated


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.012, "12ms"),
        (0, "0ms"),
        (1, "1s"),
        (7.66, "7.66s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert fmt_duration(seconds) == text
