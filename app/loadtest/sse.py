"""An incremental Server-Sent Events parser for the load tester's client side.

Reads may end anywhere: inside a line, between the CR and LF of a CRLF, or inside a multi-byte
character. Lines end with CRLF, LF or CR, an event ends at a blank line, `data:` lines of one event
are joined with newlines, and comment lines (`:`) are skipped, as in the WHATWG definition of the
event-stream format. Data stays bytes (UTF-8 as sent): the JSON parser reads bytes, and a load
tester parses tens of thousands of events a second.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    data: bytes
    event: str = "message"


class SSEParser:
    """Feed it the body's reads in order; each call returns the events completed by that read."""

    __slots__ = ("_buf", "_data", "_event", "_after_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event = b""
        self._after_cr = False  # the last read ended with CR: an LF opening the next one is its pair

    def feed(self, chunk: bytes) -> list[Event]:
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if not chunk:
            return []
        self._after_cr = chunk[-1:] == b"\r"
        data = self._buf + chunk if self._buf else chunk
        if b"\r" in data:  # CRLF and lone CR end lines too (a partial line in _buf never holds one)
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self._buf = lines.pop()  # what follows the last line end: the start of a line, or b""
        events: list[Event] = []
        pending = self._data
        for line in lines:
            if not line:  # a blank line dispatches the event, if it has data
                if pending:
                    data_ = pending[0] if len(pending) == 1 else b"\n".join(pending)
                    events.append(
                        Event(data_, self._event.decode() or "message") if self._event else Event(data_)
                    )
                    pending = self._data = []
                    self._event = b""
                elif self._event:
                    self._event = b""
            elif line.startswith(b"data:"):
                pending.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[:1] != b":":
                name, colon, value = line.partition(b":")
                if name == b"event":
                    self._event = value[1:] if value[:1] == b" " else value
                elif name == b"data":  # `data` with no colon: an empty data line
                    pending.append(b"")
        return events
