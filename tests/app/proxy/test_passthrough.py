"""The per-token passthrough (app/proxy/passthrough.py, app/proxy/_passthrough.c): what it passes
straight to the client and what it leaves to the slow path (the response parser and the sink),
for the compiled class and its Python stand-in alike, and the two against each other on mutated
streams. Through real sockets: tests/app/proxy/test_relay_direct.py."""

from __future__ import annotations

import random

import pytest

from app.proxy import passthrough
from app.proxy.passthrough import PyRelayBase
from app.proxy.sse import is_final

IMPLEMENTATIONS = [PyRelayBase]
if passthrough.COMPILED:
    IMPLEMENTATIONS.append(passthrough.RelayBase)


def test_the_compiled_passthrough_is_built():
    """`make` builds it (scripts/build_ext.py): the tests must hold the one that ships."""
    assert passthrough.COMPILED, (
        "app/proxy/_passthrough.c is not built: run `make venv` or scripts/build_ext.py"
    )
    assert passthrough.RelayBase is not PyRelayBase


class Writer:
    closed = False


def connection(base: type, *, strip: bool = False, edge: bool = True, opened: bool = True):
    class Conn(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.slow: list[bytes] = []
            self.written: list[bytes] = []
            self.seen: list[bytes] = []
            self.writer = Writer()

        def _slow_received(self, data: bytes) -> None:
            self.slow.append(data)

    conn = Conn()
    conn._edge = edge
    if opened:
        conn.open_passthrough(conn.written.append, conn.seen.append, lambda: 12.5, conn.writer, strip)
    return conn


def chunk(payload: bytes, size: str | None = None) -> bytes:
    return (size or f"{len(payload):x}").encode() + b"\r\n" + payload + b"\r\n"


TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
TOKEN2 = b'data: {"choices":[{"index":0,"delta":{"content":" there"},"finish_reason":null}]}\n\n'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
DELTA = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
COMPLETED = b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'
MESSAGE_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

PASSED = {
    "one event": (chunk(TOKEN), [TOKEN]),
    "two chunks in one read": (chunk(TOKEN) + chunk(TOKEN2), [TOKEN, TOKEN2]),
    "two events in one chunk": (chunk(TOKEN + TOKEN2), [TOKEN + TOKEN2]),
    "upper-case size": (chunk(TOKEN, f"{len(TOKEN):X}"), [TOKEN]),
    "size with leading zeros": (chunk(TOKEN, f"{len(TOKEN):04x}"), [TOKEN]),
    "finish and usage, not stripping": (chunk(FINISH) + chunk(USAGE), [FINISH, USAGE]),
    "64 chunks": (chunk(TOKEN) * 64, [TOKEN] * 64),
    "a Responses API delta": (chunk(DELTA), [DELTA]),
    "a Messages API delta": (chunk(MESSAGE_DELTA), [MESSAGE_DELTA]),
    "a final event, then a delta": (chunk(COMPLETED + DELTA), [COMPLETED + DELTA]),
}

SLOW = {
    "half a chunk": chunk(TOKEN)[:40],
    "a chunk without its CRLF": chunk(TOKEN)[:-2],
    "a chunk and half of the next": chunk(TOKEN) + chunk(TOKEN2)[:30],
    "the last chunk": chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n",
    "the zero chunk alone": b"0\r\n\r\n",
    "[DONE]": chunk(b"data: [DONE]\n\n"),
    "an event, then [DONE]": chunk(TOKEN + b"data: [DONE]\n\n"),
    "the Responses API's last event": chunk(COMPLETED),
    "a delta, then the Responses API's last event": chunk(DELTA + COMPLETED),
    "response.failed": chunk(b"event: response.failed\ndata: {}\n\n"),
    "response.incomplete": chunk(b"event: response.incomplete\ndata: {}\n\n"),
    "the Messages API's last event": chunk(MESSAGE_STOP),
    "a delta, then the Messages API's last event": chunk(MESSAGE_DELTA) + chunk(MESSAGE_STOP),
    "an event with a CR inside": chunk(b"data: a\rb\n\n"),
    "an id: field first": chunk(b"id: 1\ndata: x\n\n"),
    "an SSE comment": chunk(b": keep-alive\n\n"),
    "a partial event": chunk(TOKEN[:-1]),
    "an event ended with CRLF": chunk(TOKEN[:-2] + b"\r\n\r\n"),
    "a chunk extension": chunk(TOKEN, f"{len(TOKEN):x};ext=1"),
    "whitespace before the CRLF": chunk(TOKEN, f"{len(TOKEN):x} "),
    "a size too small": chunk(TOKEN, f"{len(TOKEN) - 1:x}"),
    "a size too large": chunk(TOKEN, f"{len(TOKEN) + 1:x}"),
    "nine hex digits": chunk(TOKEN, f"{len(TOKEN):09x}"),
    "a sign": chunk(TOKEN, f"+{len(TOKEN):x}"),
    "an underscore": b"5_0\r\n" + TOKEN[:80] + b"\r\n",
    "no size": b"\r\n" + TOKEN + b"\r\n",
    "LF without CR": b"%x\n" % len(TOKEN) + TOKEN + b"\r\n",
    "65 chunks": chunk(TOKEN) * 65,
    "empty": b"",
}


@pytest.mark.parametrize("base", IMPLEMENTATIONS, ids=lambda b: b.__module__)
@pytest.mark.parametrize("name", list(PASSED))
def test_whole_data_events_go_to_the_client_as_they_came(base, name):
    data, events = PASSED[name]
    conn = connection(base)
    conn.data_received(data)
    assert conn.slow == []
    assert conn.written == [data]  # one write, the engine's chunk framing included
    assert conn.seen == events
    assert conn.passed == len(events)
    assert conn._last_data == 12.5  # the idle watchdog sees the read


@pytest.mark.parametrize("base", IMPLEMENTATIONS, ids=lambda b: b.__module__)
@pytest.mark.parametrize("name", list(SLOW))
def test_anything_else_goes_the_slow_way_untouched(base, name):
    data = SLOW[name]
    conn = connection(base)
    conn.data_received(data)
    assert conn.slow == [data]
    assert conn.written == [] and conn.seen == [] and conn.passed == 0


@pytest.mark.parametrize("base", IMPLEMENTATIONS, ids=lambda b: b.__module__)
@pytest.mark.parametrize("payload", [FINISH, USAGE, TOKEN + FINISH])
def test_a_stream_whose_usage_chunk_is_removed_keeps_its_finishing_events_for_the_sink(base, payload):
    conn = connection(base, strip=True)
    conn.data_received(chunk(TOKEN))
    conn.data_received(chunk(payload))
    assert conn.written == [chunk(TOKEN)]
    assert conn.slow == [chunk(payload)]


@pytest.mark.parametrize("base", IMPLEMENTATIONS, ids=lambda b: b.__module__)
@pytest.mark.parametrize(
    "state",
    ["not opened", "parser mid-chunk", "closed again", "client gone", "not bytes"],
)
def test_nothing_passes_unless_the_sink_opened_it_at_a_chunk_boundary_for_a_live_client(base, state):
    conn = connection(base, opened=state != "not opened", edge=state != "parser mid-chunk")
    data: object = chunk(TOKEN)
    if state == "closed again":
        conn.close_passthrough()
    elif state == "client gone":
        conn.writer.closed = True
    elif state == "not bytes":
        data = bytearray(chunk(TOKEN))
    conn.data_received(data)
    assert conn.slow == [data] and conn.written == []
    assert conn.passing is (state not in ("not opened", "closed again"))


@pytest.mark.parametrize("base", IMPLEMENTATIONS, ids=lambda b: b.__module__)
def test_a_write_that_raises_goes_the_slow_way_and_ends_the_passthrough(base):
    """The sink meets the same failure there and reports it (`wait_end` re-raises it)."""
    conn = connection(base)

    def broken(data: bytes) -> None:
        raise RuntimeError("transport gone")

    conn.open_passthrough(broken, conn.seen.append, lambda: 1.0, conn.writer, False)
    conn.data_received(chunk(TOKEN))
    assert conn.slow == [chunk(TOKEN)]
    assert not conn.passing
    conn.data_received(chunk(TOKEN2))  # stays closed until the sink opens it again
    assert conn.slow == [chunk(TOKEN), chunk(TOKEN2)]


@pytest.mark.parametrize("base", IMPLEMENTATIONS, ids=lambda b: b.__module__)
@pytest.mark.parametrize("failing", ["seen", "clock"])
def test_a_failure_after_the_write_never_sends_the_read_twice(base, failing):
    """The read is out: the slow way would write it again. The passthrough ends instead; the
    watchdog's last read time stays a time."""
    conn = connection(base)

    def broken(*_: object) -> float:
        raise MemoryError

    seen = broken if failing == "seen" else conn.seen.append
    clock = broken if failing == "clock" else (lambda: 3.0)
    conn._last_data = 2.0
    conn.open_passthrough(conn.written.append, seen, clock, conn.writer, False)
    conn.data_received(chunk(TOKEN))
    assert conn.written == [chunk(TOKEN)] and conn.slow == []
    assert not conn.passing and conn._last_data == 2.0
    conn.data_received(chunk(TOKEN2))
    assert conn.written == [chunk(TOKEN)] and conn.slow == [chunk(TOKEN2)]


def _mutations(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        at = rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[min(at, len(b) - 1)]
        elif op == 1:
            b[at:at] = rng.choice([b"\r", b"\n", b"0", b"f", b"F", b";", b" ", b"data: ", b"[DONE]\n\n"])
        elif op == 2 and b:
            b[min(at, len(b) - 1)] = rng.randrange(256)
        else:
            b = b[:at]
    return bytes(b)


@pytest.mark.skipif(not passthrough.COMPILED, reason="needs the compiled class to compare")
def test_the_compiled_class_and_its_python_stand_in_agree_on_mutated_reads():
    rng = random.Random(1907)
    seeds = [d for d, _ in PASSED.values()] + list(SLOW.values())
    outcomes = {True: 0, False: 0}
    events = [TOKEN, TOKEN2, FINISH, USAGE, DELTA, COMPLETED, MESSAGE_DELTA, MESSAGE_STOP]
    events += [b"data: [DONE]\n\n", b"data: x\n\n", b"data: {}\r\n\r\n", b"event: x\n\n"]
    for _ in range(20_000):
        if rng.random() < 0.5:
            data = rng.choice(seeds)
        else:  # a read of whole chunks, as an engine writes them
            data = b"".join(chunk(rng.choice(events)) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.7:
            data = _mutations(rng, data)
        strip = rng.random() < 0.3
        results = []
        for base in (PyRelayBase, passthrough.RelayBase):
            conn = connection(base, strip=strip)
            conn.data_received(data)
            results.append((conn.slow, conn.written, conn.seen, conn.passed))
        assert results[0] == results[1], data
        outcomes[bool(results[0][3])] += 1
        for passed in results[0][2]:  # what passed on never needed the sink's end-of-stream step
            assert not is_final(passed), passed
    assert min(outcomes.values()) > 1000, outcomes  # both ways well covered
