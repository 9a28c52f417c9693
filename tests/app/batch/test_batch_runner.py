"""The batch runner's own logic: live traffic first, retries of the proxy's "engine not there"
answers, hang-ups on cancel, resume, expiry.

The pipeline here is a stand-in for the proxy app, because these tests need to hold each line in
flight and release it on cue (precise timing); it counts itself in `runtime.inflight` as the real
middleware does. Lines through the real proxy and vLLM: tests/integration/test_batch_api.py.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from app.batch.runner import Runner
from app.batch.store import AsyncStore, Result, Store, new_batch_doc
from app.runtime import Phase, Runtime

EP = "/v1/chat/completions"


class Pipeline:
    """Answers each line 200 when released (or what `answers` says first); records what it saw."""

    def __init__(self, runtime: Runtime, hold: bool = False) -> None:
        self.runtime = runtime
        self.hold = hold
        self.release = asyncio.Event()
        self.seen: list[dict] = []
        self.running = 0
        self.most = 0
        self.hung_up = 0
        self.answers: list[tuple[int, dict]] = []

    async def __call__(self, scope, receive, send):
        self.runtime.request_started()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            message = await receive()
            self.seen.append(orjson.loads(message["body"]))
            if self.hold:
                waiter = asyncio.ensure_future(receive())
                released = asyncio.ensure_future(self.release.wait())
                done, _ = await asyncio.wait({waiter, released}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                released.cancel()
                if waiter in done:
                    self.hung_up += 1
                    return  # the client left: no response
            status, body = (
                self.answers.pop(0)
                if self.answers
                else (200, {"ok": True, "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
            )
            raw = orjson.dumps(body)
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": raw})
        finally:
            self.running -= 1
            self.runtime.request_finished()


async def setup(tmp_path, n: int, *, hold=False, concurrency=4, threshold=1, **doc_changes):
    runtime = Runtime()
    runtime.set_phase(Phase.READY)
    store = AsyncStore(tmp_path)
    await store.open()
    tmp = await store.run(Store.temp_path)
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": EP, "body": {"model": "m", "i": i}}
        for i in range(1, n + 1)
    ]
    tmp.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    file = await store.run(Store.add_file, tmp, "in.jsonl", "batch")
    doc = new_batch_doc(file["id"], EP, None)
    doc.update(doc_changes)
    await store.run(Store.add_batch, doc)
    pipeline = Pipeline(runtime, hold)
    runner = Runner(store, runtime, concurrency=concurrency, yield_threshold=threshold)
    runner.pipeline = pipeline
    return runtime, store, runner, pipeline, doc["id"]


async def until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def finished(store, batch_id, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = await store.run(Store.get_batch, batch_id)
        if doc["status"] in ("completed", "cancelled", "expired", "failed"):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"batch still {doc['status']}")
        await asyncio.sleep(0.02)


def test_live_requests_make_batches_yield_to_one_line(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(tmp_path, 12, hold=True, concurrency=4)
        runtime.request_started()  # a live request in flight
        task = asyncio.ensure_future(runner.run())
        await until(lambda: pipe.running == 1)
        await asyncio.sleep(0.3)  # several gate polls: still one line while live traffic runs
        assert pipe.most == 1
        runtime.request_finished()  # live traffic over: the batch takes its full concurrency
        await until(lambda: pipe.running == 4)
        assert runner.live() == 0
        pipe.release.set()
        doc = await finished(store, batch_id)
        assert doc["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
        assert pipe.most == 4
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_no_line_starts_until_the_engine_is_ready(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(tmp_path, 2)
        runtime.set_phase(Phase.STARTING)
        task = asyncio.ensure_future(runner.run())
        await asyncio.sleep(0.3)
        assert pipe.seen == []
        runtime.set_phase(Phase.READY)
        assert (await finished(store, batch_id))["request_counts"]["completed"] == 2
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_the_proxys_engine_unavailable_answer_is_retried_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr("app.batch.runner.RETRY_DELAY", 0.01)

    async def main():
        runtime, store, runner, pipe, batch_id = await setup(tmp_path, 1)
        unavailable = {
            "error": {"message": "loading", "type": "x", "param": None, "code": "engine_unavailable"}
        }
        engine_400 = {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}
        pipe.answers = [
            (503, unavailable),
            (502, {**unavailable, "error": {**unavailable["error"], "code": "engine_unreachable"}}),
        ]
        task = asyncio.ensure_future(runner.run())
        doc = await finished(store, batch_id)
        assert len(pipe.seen) == 3 and doc["request_counts"]["completed"] == 1
        task.cancel()
        await store.close()

        # An answer of the engine's own (here a 400) is the line's result: recorded, not retried.
        runtime, store, runner, pipe, batch_id = await setup(tmp_path / "b", 1)
        pipe.answers = [(400, engine_400)]
        task = asyncio.ensure_future(runner.run())
        doc = await finished(store, batch_id)
        assert len(pipe.seen) == 1 and doc["request_counts"]["failed"] == 1
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_cancel_hangs_up_the_lines_in_flight_and_records_none_of_them(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(tmp_path, 10, hold=True, concurrency=3)
        task = asyncio.ensure_future(runner.run())
        await until(lambda: pipe.running == 3)

        def cancel(doc):
            doc["status"] = "cancelling"
            return doc

        await store.run(Store.update_batch, batch_id, cancel)
        runner.wake()
        doc = await finished(store, batch_id)
        assert doc["status"] == "cancelled" and doc["cancelled_at"]
        assert pipe.hung_up == 3 and len(pipe.seen) == 3
        assert doc["request_counts"] == {"total": 10, "completed": 0, "failed": 0}
        assert doc["output_file_id"] is None
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_a_restart_runs_only_the_lines_not_recorded(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(tmp_path, 4, status="in_progress")
        done = orjson.dumps({"custom_id": "c2", "from": "before the restart"})
        await store.run(Store.record, batch_id, [Result(2, True, done)])
        task = asyncio.ensure_future(runner.run())
        doc = await finished(store, batch_id)
        assert sorted(b["i"] for b in pipe.seen) == [1, 3, 4]
        out = (tmp_path / "files" / doc["output_file_id"]).read_bytes().splitlines()
        assert [orjson.loads(x)["custom_id"] for x in out] == ["c1", "c2", "c3", "c4"]  # input order
        assert orjson.loads(out[1])["from"] == "before the restart"
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_an_expired_batch_lists_its_lines_not_run_in_the_error_file(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(tmp_path, 3, expires_at=int(time.time()) - 1)
        task = asyncio.ensure_future(runner.run())
        doc = await finished(store, batch_id)
        assert doc["status"] == "expired" and doc["expired_at"]
        assert pipe.seen == []
        errors = [
            orjson.loads(x) for x in (tmp_path / "files" / doc["error_file_id"]).read_bytes().splitlines()
        ]
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            ("c1", "batch_expired"),
            ("c2", "batch_expired"),
            ("c3", "batch_expired"),
        ]
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_threshold_zero_never_yields(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(
            tmp_path, 6, hold=True, concurrency=3, threshold=0
        )
        for _ in range(5):
            runtime.request_started()
        task = asyncio.ensure_future(runner.run())
        await until(lambda: pipe.running == 3)
        pipe.release.set()
        await finished(store, batch_id)
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_batch_api_calls_in_flight_are_not_live_traffic(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(tmp_path, 6, hold=True, concurrency=3)
        api_calls = 2  # e.g. an upload and a poll of the Batch API, counted by the middleware too
        runner.not_live = lambda: api_calls
        for _ in range(api_calls):
            runtime.request_started()
        task = asyncio.ensure_future(runner.run())
        await until(lambda: pipe.running == 3)
        pipe.release.set()
        await finished(store, batch_id)
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_lines_running_at_the_expiry_are_hung_up_on_and_listed_as_expired(tmp_path):
    async def main():
        runtime, store, runner, pipe, batch_id = await setup(
            tmp_path, 5, hold=True, concurrency=2, expires_at=int(time.time()) + 2
        )
        task = asyncio.ensure_future(runner.run())
        doc = await finished(store, batch_id)
        assert doc["status"] == "expired" and pipe.hung_up == 2
        errors = [
            orjson.loads(x) for x in (tmp_path / "files" / doc["error_file_id"]).read_bytes().splitlines()
        ]
        assert [e["custom_id"] for e in errors] == ["c1", "c2", "c3", "c4", "c5"]  # every line, once
        task.cancel()
        await store.close()

    asyncio.run(main())


def test_with_several_workers_the_runner_finds_batches_another_worker_created(tmp_path):
    """PROXY_WORKERS > 1 (app/workers.py): worker 0 runs every batch, but a batch created through
    another worker wakes only that worker's (idle) runner. Worker 0's looks at the store every
    `poll_s` and finds it."""

    async def main():
        runtime, store, runner, pipe, first = await setup(tmp_path, 1)
        runner.poll_s = 0.2
        task = asyncio.ensure_future(runner.run())
        assert (await finished(store, first))["request_counts"]["completed"] == 1
        tmp = await store.run(Store.temp_path)  # another worker, on the same store: no wake() here
        tmp.write_bytes(orjson.dumps({"custom_id": "x", "method": "POST", "url": EP, "body": {"model": "m"}}))
        file = await store.run(Store.add_file, tmp, "in2.jsonl", "batch")
        doc = new_batch_doc(file["id"], EP, None)
        await store.run(Store.add_batch, doc)
        assert (await finished(store, doc["id"], timeout=5))["request_counts"]["completed"] == 1
        task.cancel()
        await store.close()

    asyncio.run(main())
