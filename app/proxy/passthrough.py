"""The per-token step of a relayed stream: once the sink says a stream is under way
(`open_passthrough`), each read from the engine that is whole chunks of whole events (`data:` ones,
or the `event:` ones of the Responses and Messages APIs), none of them the stream's last
(`sse.is_final`), goes to the client as it came, chunk framing and all, with no parse, no
re-framing and no call into the sink; anything else goes the slow way (`_slow_received`: the
response parser, then the sink). The client gets the bytes the sink would have written: the proxy
frames a relayed body as chunks too, one per read (`app/server.py`'s BodyWriter).

`RelayBase` is the base class of the engine connection (`app/proxy/upstream.py`). It is compiled
from `_passthrough.c` (`scripts/build_ext.py`; `make` builds it), and this module's Python class of
the same behaviour stands in where it is not built; tests/app/proxy/test_passthrough.py holds both
to the same cases. Which one runs is `COMPILED`, logged at start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.proxy.sse import passes_untouched

_MAX_CHUNKS = 64
_HEX = frozenset(b"0123456789abcdefABCDEF")


class PyRelayBase:
    """`_passthrough.RelayBase` in Python: the same checks, in the same order."""

    _edge = False  # the engine's response parser is between two chunks (set by its callbacks)
    _last_data = 0.0
    passed = 0
    _passing = False
    _strip = False
    _write: Callable[[bytes], Any] | None = None
    _seen: Callable[[bytes], Any] | None = None
    _clock: Callable[[], float] | None = None
    _writer: Any = None

    @property
    def passing(self) -> bool:
        return self._passing

    def open_passthrough(
        self, write: Callable[[bytes], Any], seen: Callable[[bytes], Any], clock, writer, strip
    ) -> None:
        self._write, self._seen, self._clock, self._writer = write, seen, clock, writer
        self._strip = bool(strip)
        self._passing = True

    def close_passthrough(self) -> None:
        self._passing = False
        self._write = self._seen = self._clock = self._writer = None

    def _slow_received(self, data: bytes) -> None:
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        if self._passing and self._edge and type(data) is bytes:
            try:
                if self._pass_on(data):
                    return
            except Exception:  # the slow path meets the same failure and handles it (the sink's)
                self.close_passthrough()
        self._slow_received(data)

    def _pass_on(self, data: bytes) -> bool:
        spans: list[tuple[int, int]] = []
        pos, end = 0, len(data)
        while pos < end:
            digits = pos
            while digits < end and data[digits] in _HEX:
                digits += 1
                if digits - pos > 8:
                    return False
            if digits == pos:
                return False
            size = int(data[pos:digits], 16)
            if size == 0 or data[digits : digits + 2] != b"\r\n":
                return False
            pos = digits + 2
            if end - pos < size + 2 or data[pos + size : pos + size + 2] != b"\r\n":
                return False
            if not passes_untouched(data[pos : pos + size], self._strip):
                return False
            if len(spans) == _MAX_CHUNKS:
                return False
            spans.append((pos, size))
            pos += size + 2
        if not spans or self._writer.closed:
            return False
        self._write(data)
        self.passed += len(spans)
        # Sent: whatever fails from here must not send it again the slow way. The passthrough
        # ends (the next reads go to the sink); only the record of these events is lost.
        try:
            for start, size in spans:
                self._seen(data[start : start + size])
            self._last_data = float(self._clock())
        except Exception:
            self.close_passthrough()
        return True


try:
    from app.proxy._passthrough import RelayBase  # type: ignore[import-not-found]

    COMPILED = True
except ImportError:  # not built: the same in Python
    RelayBase = PyRelayBase  # type: ignore[misc]
    COMPILED = False
