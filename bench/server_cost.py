"""What the HTTP server costs per request, alone: the proxy's protocol (`app/server.py`) against
uvicorn's own httptools protocol, each serving a trivial ASGI app (one JSON answer with a
Content-Length) to 32 keep-alive connections of a minimal client in the same process and loop.

    .venv/bin/python bench/server_cost.py                 # 5 rounds of each, in turns
    .venv/bin/python bench/server_cost.py --profile own   # and a cProfile of one round

Printed: CPU µs per request (`process_time`, the client's share included: it is the same for both,
so the difference is the servers'), per round and the medians. No network benchmark's noise: one
process, loopback sockets, nothing else running in it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.server import server_config  # noqa: E402

ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"message":{"content":"hi"}}]}' * 4
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8000\r\nuser-agent: bench\r\n"
    b"accept: */*\r\ncontent-type: application/json\r\ncontent-length: 64\r\n\r\n" + b"x" * 64
)
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(ANSWER)),
    (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
]
SERVERS = {"own": None, "uvicorn": "httptools"}  # the config's `http`: None keeps the proxy's


async def app(scope: dict, receive, send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


class Client(asyncio.Protocol):
    """Sends the request again as soon as the whole answer is in."""

    def __init__(self, left: list[int], done: asyncio.Future) -> None:
        self.left, self.done, self.buffer = left, done, b""
        self.answer_size = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0 and len(self.buffer) >= end + 4 + len(ANSWER):
            self.buffer = self.buffer[end + 4 + len(ANSWER) :]
            self.left[0] -= 1
            if self.left[0] <= 0:
                if not self.done.done():
                    self.done.set_result(None)
                return
            self.transport.write(REQUEST)


async def serve_and_drive(kind: str, requests: int, profile: bool) -> float:
    from uvicorn.server import ServerState

    loop = asyncio.get_running_loop()
    config = server_config(app, "127.0.0.1", 0, 60, lifespan="off")
    if SERVERS[kind] is not None:
        config.http = SERVERS[kind]
    config.load()
    state = ServerState()
    protocol = config.http_protocol_class
    server = await loop.create_server(
        lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    cost = 0.0
    for warm in (True, False):  # a short warm-up round, then the measured one
        count = requests // 10 if warm else requests
        left, done = [count], loop.create_future()
        conns = [
            await loop.create_connection(lambda left=left, done=done: Client(left, done), "127.0.0.1", port)
            for _ in range(32)
        ]
        profiler = cProfile.Profile() if profile and not warm else None
        start = time.process_time()
        if profiler is not None:
            profiler.enable()
        await done
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        cost = (time.process_time() - start) / count
        for transport, _ in conns:
            transport.close()
        await asyncio.sleep(0.05)
    server.close()
    return cost


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each, in turns (5)")
    parser.add_argument("--requests", type=int, default=40000, help="requests per run (40000)")
    parser.add_argument("--profile", choices=sorted(SERVERS), help="cProfile one run of this server")
    args = parser.parse_args(argv)
    costs: dict[str, list[float]] = {kind: [] for kind in SERVERS}
    for _ in range(args.rounds):
        for kind in SERVERS:
            costs[kind].append(uvloop.run(serve_and_drive(kind, args.requests, False)) * 1e6)
    for kind, runs in costs.items():
        print(
            f"{kind:8} CPU µs per request {statistics.median(runs):5.1f} (runs: {', '.join(f'{r:.1f}' for r in runs)})"
        )
    own, theirs = statistics.median(costs["own"]), statistics.median(costs["uvicorn"])
    print(f"own/uvicorn {own / theirs:.3f}; the difference {theirs - own:+.1f} µs per request")
    if args.profile:
        uvloop.run(serve_and_drive(args.profile, args.requests, True))


if __name__ == "__main__":
    main()
