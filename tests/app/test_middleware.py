"""The request middleware's accounting: metrics, usage and the log line of the requests that ended
in one event-loop iteration, done together once per iteration, and before the app shuts down."""

import asyncio

import pytest

from app import logs, middleware
from app.middleware import RequestContextMiddleware
from app.runtime import Runtime


async def answer(scope, receive, send):
    """A proxied route's app: it sets the record's status, as the pass-through does."""
    scope[middleware.RECORD_KEY].status = 200
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def http_scope(request_id: str) -> dict:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"x-request-id", request_id.encode())],
        "client": ("127.0.0.1", 5000),
    }


async def call(app, request_id: str) -> None:
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    await app(http_scope(request_id), receive, send)


@pytest.fixture
def lines(monkeypatch):
    written: list[dict] = []
    monkeypatch.setattr(logs, "request_line", written.append)
    return written


def test_requests_that_end_in_one_loop_iteration_are_accounted_in_one_run(lines):
    accounted: list[str] = []
    app = RequestContextMiddleware(answer, Runtime(), lambda rec, status: accounted.append(rec.request_id))
    runs = []
    real = app.account
    app.account = lambda: (runs.append(len(app._ended)), real())

    async def main():
        await asyncio.gather(*(call(app, f"r{i}") for i in range(5)))
        await asyncio.sleep(0)

    asyncio.run(main())
    assert runs == [5]
    assert accounted == [f"r{i}" for i in range(5)]
    assert [line["request_id"] for line in lines] == [f"r{i}" for i in range(5)]
    assert all(line["status"] == 200 for line in lines)


def test_one_request_whose_accounting_fails_costs_no_request_its_line(lines):
    def on_finished(rec, status):
        if rec.request_id == "r1":
            raise RuntimeError("boom")

    app = RequestContextMiddleware(answer, Runtime(), on_finished)

    async def main():
        await asyncio.gather(*(call(app, f"r{i}") for i in range(3)))
        await asyncio.sleep(0)

    asyncio.run(main())
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2"]


def test_requests_that_ended_are_accounted_before_the_app_shuts_down(lines):
    """Usage is written at the app's shutdown: the last requests must be counted before it, even
    when the shutdown begins in the iteration they ended in."""
    accounted: list[str] = []
    seen_at_shutdown: list[list[str]] = []

    async def app_with_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.shutdown":
                    seen_at_shutdown.append(list(accounted))
                    await send({"type": "lifespan.shutdown.complete"})
                    return
                await send({"type": "lifespan.startup.complete"})
        await answer(scope, receive, send)

    app = RequestContextMiddleware(
        app_with_lifespan, Runtime(), lambda rec, status: accounted.append(rec.request_id)
    )
    messages = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]

    async def receive():  # never suspends: the shutdown comes in the request's iteration
        return messages.pop()

    async def send(message):
        pass

    async def main():
        await call(app, "last")
        await app({"type": "lifespan"}, receive, send)

    asyncio.run(main())
    assert seen_at_shutdown == [["last"]]
    assert [line["request_id"] for line in lines] == ["last"]


def test_a_line_logged_while_a_request_is_served_carries_its_id_and_none_after(lines):
    from inproc import LOGS

    log = logs.get_logger("app.test")

    async def logs_meanwhile(scope, receive, send):
        log.info("while serving", marker="middleware-ctx")
        await answer(scope, receive, send)

    app = RequestContextMiddleware(logs_meanwhile, Runtime())

    async def main():
        await call(app, "ctx-1")
        log.info("after serving", marker="middleware-ctx")

    asyncio.run(main())
    records = [r for r in LOGS.records() if r.get("marker") == "middleware-ctx"]
    assert [(r["event"], r.get("request_id")) for r in records] == [
        ("while serving", "ctx-1"),
        ("after serving", None),
    ]
