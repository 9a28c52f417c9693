"""A streaming upstream whose events arrive on a schedule, as a generating engine's do.

    python bench/slow_upstream.py --port 19201 --events 8 --first-pause-ms 20 --token-delay-ms 20

Answers every request (keep-alive, any method and path) with a vLLM-shaped chat stream of `--events`
events (`harness.chat_stream_events`), chunked: the first event at once, the next after
`--first-pause-ms`, then one every `--token-delay-ms` (0: all the rest in one write); the finishing,
usage and `[DONE]` events follow the last token together. The benchmarks reach it through the
upstream nginx (`X-Bench-Body: slow`, `/sse-slow`) and start it pinned to the load core.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import HOST, chat_stream_events  # noqa: E402

_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve(args: argparse.Namespace) -> None:
    events = chat_stream_events(args.events)
    tokens, tail = events[1:-3], b"".join(_chunk(e) for e in events[-3:]) + b"0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # one response per request until the peer closes
                head = await reader.readuntil(b"\r\n\r\n")
                if length := _LENGTH.search(head):
                    await reader.readexactly(int(length.group(1)))
                writer.write(_HEAD + _chunk(events[0]))
                await writer.drain()
                if args.token_delay_ms <= 0:
                    await asyncio.sleep(args.first_pause_ms / 1000)
                    writer.write(b"".join(_chunk(e) for e in tokens) + tail)
                else:
                    for i, event in enumerate(tokens):
                        pause = args.first_pause_ms if i == 0 else args.token_delay_ms
                        await asyncio.sleep(pause / 1000)
                        writer.write(_chunk(event))
                    writer.write(tail)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, args.port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=8, help="data events, [DONE] not counted (8)")
    parser.add_argument("--first-pause-ms", type=float, default=20.0, help="after the first event (20)")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="between later tokens (20)")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
