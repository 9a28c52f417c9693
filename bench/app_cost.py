"""What the proxy's app costs per request, with no HTTP server and no other process: one event loop
runs a canned engine, the proxy's client and the app, driven through ASGI calls.

    .venv/bin/python bench/app_cost.py                  # json and sse, 5 rounds
    .venv/bin/python bench/app_cost.py --profile json   # and a cProfile of the app's requests
    .venv/bin/python bench/app_cost.py --ablate         # and what each of the app's layers costs

`floor` is `bench/proxies/own.py` (the proxy's client, nothing else) under the same driver; `app` is
`create_app()` configured as `this-proxy` in `proxy_overhead.py` (ENGINE=external, JSON request log,
metrics). Both pay for the engine, the client and the driver alike, so `app` − `floor` is the app's
own work per request (keys, admission, the body read, the log line, metrics, usage, the observer),
measured in one process with none of a network benchmark's noise: CPU time (`process_time`) over
many requests, 32 at a time, the two in turns. The request lines go to /dev/null.

`--ablate` also measures the app with one layer at a time replaced by a no-op (or, for the body
read, by a bare parse of `model` and `stream`), in turns with the whole app: the difference is that
layer's cost per request. The layers interact a little (fewer objects, warmer caches), so the parts
need not add up to the whole.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import JSON_BODY, REQUEST_BODY, SSE_BODY, SSE_REQUEST_BODY  # noqa: E402

PATH = b"/v1/chat/completions"


class Engine(asyncio.Protocol):
    """A canned engine: every request gets the JSON answer, or the 64-event stream when it asks for
    one (`"stream": true`), keep-alive."""

    json_answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(JSON_BODY)
        + JSON_BODY
    )
    sse_answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + (b"%x\r\n%b\r\n0\r\n\r\n" % (len(SSE_BODY), SSE_BODY))
    )

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.body = b""

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        stream = b'"stream": true' in self.body
        self.body = b""
        self.transport.write(self.sse_answer if stream else self.json_answer)


def scope_for(body: bytes) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "root_path": "",
        "method": "POST",
        "path": PATH.decode(),
        "raw_path": PATH,
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"user-agent", b"bench"),
            (b"accept", b"*/*"),
        ],
        "state": {},
        # What app/server.py offers: the hang-up hook (no watcher timer), no straight relay.
        "app.hangup_hook": None,
    }


async def drive(app, body: bytes, requests: int, concurrency: int) -> float:
    """CPU seconds per request for `requests` requests, `concurrency` at a time."""
    left = [requests]

    async def never() -> dict:
        await asyncio.Event().wait()  # the client never hangs up
        raise AssertionError

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            status: list[int] = []

            async def receive(messages=messages) -> dict:
                return messages.pop() if messages else await never()

            async def send(message: dict, status=status) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])

            await app(scope_for(body), receive, send)
            if status != [200]:
                raise RuntimeError(f"status {status}")

    start = time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return (time.process_time() - start) / requests


def _bare_inspect(body: bytes, path: str, log_prompts: bool = False):
    """The body read with nothing but what the exchange needs: model and stream."""
    import orjson

    from app.proxy.request_body import RequestInfo

    obj = orjson.loads(body)
    return RequestInfo(body=body, model=obj.get("model"), stream=obj.get("stream") is True)


class _NoContext:
    """`logs.REQUEST_ID` with nothing set: the log context's no-op."""

    def set(self, value: str) -> None:
        return None

    def reset(self, token: None) -> None:
        pass

    def get(self) -> None:
        return None


def ablations(app) -> dict[str, Callable[[], Callable[[], None]]]:
    """Each layer's no-op: a function that puts it in place and returns the undo."""
    from app import logs, middleware
    from app.proxy import handler

    def patch(*targets: tuple[object, str, object]) -> Callable[[], Callable[[], None]]:
        def apply() -> Callable[[], None]:
            saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
            for obj, name, value in targets:
                setattr(obj, name, value)
            return lambda: [setattr(obj, name, value) for obj, name, value in saved]

        return apply

    return {
        "log line": patch(
            (logs, "request_line", lambda fields: None),
            (middleware.RequestRecord, "fields", lambda self, d: None),
        ),
        "metrics": patch((middleware, "observe", lambda *a, **k: None)),
        "usage per key": patch((app, "on_finished", None)),
        "log context": patch((logs, "REQUEST_ID", _NoContext())),
        "body read": patch((handler, "inspect_json", _bare_inspect)),
    }


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Engine, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-app-cost-"))
    os.environ.update(
        {
            "ENGINE": "external",
            "ENGINE_URL": url,
            "LOG_FORMAT": "json",
            "SCRAPE_INTERVAL": "10",
            "METRICS_DB_PATH": str(tmp / "metrics.db"),
            "BENCH_UPSTREAM": url,
        }
    )
    from app.logs import configure_from
    from app.main import create_app
    from app.settings import Settings
    from bench.proxies import own
    from bench.proxies._common import start_lifespan

    settings = Settings()
    # The request lines go to stdout, as the shipped image's do: here to /dev/null.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    configure_from(settings)
    contenders = {"floor": own.app, "app": create_app(settings)}
    held = [await start_lifespan(app) for app in contenders.values()]
    bodies = {"json": REQUEST_BODY, "sse": SSE_REQUEST_BODY}
    for kind in args.kinds.split(","):
        body = bodies[kind]
        for app in contenders.values():  # warm-up
            await drive(app, body, 2000, args.concurrency)
        cost: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name in (*contenders, *reversed(contenders)):
                cost[name].append(await drive(contenders[name], body, args.requests, args.concurrency))
        floor, app = (statistics.median(cost[n]) * 1e6 for n in ("floor", "app"))
        spread = [round(c * 1e6, 1) for c in cost["app"]]
        print(
            f"{kind:4} CPU µs per request: floor {floor:6.1f}, app {app:6.1f}, "
            f"the app's own work {app - floor:6.1f} (app per run {spread})",
            file=out,
            flush=True,
        )
        if args.ablate:
            layers = ablations(contenders["app"])
            whole: list[float] = []
            without: dict[str, list[float]] = {name: [] for name in layers}
            for _ in range(args.rounds):
                for name, apply in layers.items():
                    whole.append(await drive(contenders["app"], body, args.requests, args.concurrency))
                    undo = apply()
                    try:
                        without[name].append(
                            await drive(contenders["app"], body, args.requests, args.concurrency)
                        )
                    finally:
                        undo()
            base = statistics.median(whole) * 1e6
            for name, runs in without.items():
                print(f"     {name:14} {base - statistics.median(runs) * 1e6:5.1f} µs", file=out, flush=True)
        if args.profile == kind:
            profiler = cProfile.Profile()
            profiler.enable()
            await drive(contenders["app"], body, args.requests, args.concurrency)
            profiler.disable()
            path = tmp / f"{kind}.prof"
            profiler.dump_stats(path)
            stats = pstats.Stats(str(path), stream=out)
            stats.sort_stats("tottime").print_stats(30)
            print(f"profile: {path}", file=out)
    del held


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="json,sse", help="comma-separated: json, sse (json,sse)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each, in turns (5)")
    parser.add_argument("--requests", type=int, default=10000, help="requests per run (10000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests at a time (32)")
    parser.add_argument("--profile", choices=("json", "sse"), help="cProfile the app on this kind")
    parser.add_argument("--ablate", action="store_true", help="each layer's cost, by its no-op")
    uvloop.run(main(parser.parse_args()))
