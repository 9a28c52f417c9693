"""A stand-in engine that streams as vLLM does: one SSE event per write, every open stream one token
per step, steps at a fixed rate.

    python bench/paced_engine.py --port 19231 --events 200 --interval-ms 1

vLLM's engine produces one token for every running request per decode step, and its API server
writes each token as its own chunked SSE event as soon as it is detokenized: with 32 streams and
1 ms steps, 32 small writes every millisecond. Here one timer does the same: at each step it writes
the next event of every open stream (`harness.chat_stream_events`: role, tokens, finish, usage,
`[DONE]`), each in its own `write`. `POST` anything: a stream (keep-alive, one after the other on a
connection); `GET /health`, `/version`, `/metrics`, `/v1/models`: what a proxy or router asks an
engine. A step that comes late is not made up: the next is one interval after it (as a slow
engine's steps stretch). Runs under uvloop; the benchmarks pin it to the load core.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import HOST, chat_stream_events  # noqa: E402

_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_SMALL = {
    b"/health": (b"application/json", b"{}"),
    b"/version": (b"application/json", b'{"version":"paced-engine"}'),
    b"/metrics": (b"text/plain", b"# paced engine: no metrics\n"),
    b"/v1/models": (b"application/json", b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}'),
}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Engine:
    def __init__(self, events: int, interval_s: float) -> None:
        chunks = [_chunk(e) for e in chat_stream_events(events)]
        chunks[-1] += b"0\r\n\r\n"
        self.chunks = chunks
        self.interval = interval_s
        self.streams: list[_Conn] = []
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.events_written = 0

    def open(self, conn: _Conn) -> None:
        conn.next = 0
        self.streams.append(conn)
        if self._timer is None:
            self._timer = self.loop.call_at(self.loop.time() + self.interval, self._step)

    def _step(self) -> None:
        chunks, last = self.chunks, len(self.chunks) - 1
        ended = False
        for conn in self.streams:
            i = conn.next
            if conn.transport.is_closing():
                conn.next = -1
                ended = True
                continue
            conn.transport.write(chunks[i])
            if i == last:
                conn.next = -1
                ended = True
            else:
                conn.next = i + 1
        self.events_written += len(self.streams)
        if ended:
            self.streams = [c for c in self.streams if c.next >= 0]
        self._timer = (
            self.loop.call_at(self.loop.time() + self.interval, self._step) if self.streams else None
        )


class _Conn(asyncio.Protocol):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.url = b""
        self.next = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        url, self.url = self.url, b""
        if self.parser.get_method() == b"GET":
            ctype, body = _SMALL.get(url.split(b"?", 1)[0], (b"application/json", b"{}"))
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ncontent-length: %d\r\n\r\n%b"
                % (ctype, len(body), body)
            )
            return
        self.transport.write(_HEAD)
        self.engine.open(self)


async def _serve(args: argparse.Namespace) -> None:
    engine = Engine(args.events, args.interval_ms / 1000)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(engine), HOST, args.port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=200, help="data events per stream, [DONE] not counted")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="between steps (1)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
