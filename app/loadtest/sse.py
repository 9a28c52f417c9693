"""An incremental Server-Sent Events parser for the load tester's client side.

Reads may end anywhere: inside a line, between the CR and LF of a CRLF, or inside a multi-byte
character. Lines end with CRLF, LF or CR, an event ends at a blank line, `data:` lines of one event
are joined with newlines, and comment lines (`:`) are skipped, as in the WHATWG definition of the
event-stream format.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    data: str
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
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        data = self._buf + chunk if self._buf else chunk
        events: list[Event] = []
        start = 0
        size = len(data)
        while start < size:
            lf = data.find(b"\n", start)
            cr = data.find(b"\r", start, lf if lf >= 0 else size)
            if cr >= 0:
                end, nxt = cr, cr + 2 if data.startswith(b"\n", cr + 1) else cr + 1
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(data[start:end], events)
            start = nxt
        self._buf = data[start:]
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:  # a blank line dispatches the event, if it has data
            if self._data:
                events.append(
                    Event(
                        b"\n".join(self._data).decode("utf-8", "replace"), self._event.decode() or "message"
                    )
                )
            self._data = []
            self._event = b""
            return
        if line.startswith(b":"):
            return
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
