"""Measuring a Server-Sent Events stream while relaying it byte for byte.

JSON is parsed only for the first events (until the first generated token, for TTFT) and for the
events that carry `usage` or an `error`; every other event leaves as it arrived, and most reads are
not even searched (see StreamObserver).

When the proxy itself requested the usage chunk (see `request_body.inspect_json`), it drops that
chunk here. vLLM moves `system_fingerprint` from the finishing chunks onto the usage chunk when
usage is on, so the finishing chunks are held back until the usage chunk arrives and get the
fingerprint back: the client receives the bytes it would have received without the proxy. With one
choice (the common case) the finishing chunk and the usage chunk arrive together, so holding costs
no time.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import orjson

_USAGE = b'"usage"'
_FINISHED = b'"finish_reason":"'
_FINGERPRINT = b'"system_fingerprint"'
_ERROR = b'"error"'


def _split_events(block: bytes) -> list[bytes]:
    """Split a block of whole events, keeping each event's terminating blank line."""
    events: list[bytes] = []
    start = 0
    while start < len(block):
        end = block.find(b"\n\n", start)
        if end < 0:
            events.append(block[start:])
            break
        events.append(block[start : end + 2])
        start = end + 2
    return events


def _event_start(block: bytes, index: int) -> int:
    """Where the event holding `block[index]` begins (events end with a blank line: LF or CRLF)."""
    lf = block.rfind(b"\n\n", 0, index)
    crlf = block.rfind(b"\n\r\n", max(lf, 0), index)  # only past the LF boundary: no second scan
    if crlf > lf:
        return crlf + 3
    return lf + 2 if lf >= 0 else 0


def _event_at(block: bytes, index: int) -> bytes:
    """The whole event holding `block[index]`."""
    lf = block.find(b"\n\n", index)
    end = len(block) if lf < 0 else lf + 2
    crlf = block.find(b"\n\r\n", index, end)  # only before the LF boundary: no scan past it
    if crlf >= 0:
        end = crlf + 3
    return block[_event_start(block, index) : end]


def _last_events_start(block: bytes, n: int) -> int:
    """Where the last `n` events of a block begin (0 if it has fewer)."""
    start = len(block)
    while start and block[start - 1] in b"\r\n":
        start -= 1
    for _ in range(n):
        if start == 0:
            break
        start = _event_start(block, start - 1)  # - 1: not the boundary that ends at `start`
    return start


_LAST_EVENTS = (
    b"event: response.completed",  # Responses API
    b"event: response.failed",
    b"event: response.incomplete",
    b"event: message_stop",  # Anthropic Messages API
)


def is_final(block: bytes) -> bool:
    """Whether a block of whole events ends with a stream's last event (`data: [DONE]`, or the
    closing event of the Responses or Messages API): once it is sent, the client has the whole
    answer, and may close the connection at once (the OpenAI SDK does)."""
    if block.endswith(b"[DONE]\n\n"):
        return True
    if not block.startswith(b"event: "):  # chat and completions events are `data:` only
        return False
    return block.startswith(_LAST_EVENTS, _event_start(block, len(block) - 2))


def passes_untouched(events: bytes, strip_usage: bool) -> bool:
    """Whether a chunk's payload, in a stream whose observer is `steady`, needs nothing from `feed`
    but to be recorded: whole events, LF only, `data:` or `event:` ones, none the stream's last
    (`is_final`), and no finishing or usage event when the usage chunk is to be removed. What
    app/proxy/passthrough.py passes straight on; app/proxy/_passthrough.c makes the same checks."""
    if len(events) < 8 or not events.endswith(b"\n\n") or b"\r" in events or is_final(events):
        return False
    if not events.startswith((b"data: ", b"event: ")):
        return False
    return not (strip_usage and (_FINISHED in events or _USAGE in events))


def _data(event: bytes) -> Any:
    """The parsed JSON of an event's `data:` field, or None (comments, `[DONE]`, non-JSON)."""
    for line in event.splitlines():
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if not payload.startswith(b"{"):
                return None
            try:
                return orjson.loads(payload)
            except orjson.JSONDecodeError:
                return None
    return None


def has_generated_output(obj: Any) -> bool:
    """True if an event reports a generated token (OpenAI chat, completions, Responses API), even
    one whose text is still empty: vLLM holds back text that ends in an incomplete UTF-8 sequence
    and skips special tokens, so a stream's tokens may all decode to "" (a tiny model's often do).
    vLLM sends a completions chunk only for new tokens, and a chat chunk with an empty delta only
    for the last ones (`finish_reason`) or with logprobs or token ids; the chat role chunk that
    opens a stream is the one event with a choice and no token."""
    if not isinstance(obj, dict):
        return False
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if "text" in choice:  # completions
                return True
            delta = choice.get("delta")
            if isinstance(delta, dict) and (
                delta.get("content")
                or delta.get("reasoning_content")
                or delta.get("reasoning")
                or delta.get("tool_calls")
            ):
                return True
            if choice.get("finish_reason") is not None or choice.get("logprobs") or choice.get("token_ids"):
                return True
        return False
    kind = obj.get("type")
    return isinstance(kind, str) and kind.endswith(".delta") and bool(obj.get("delta"))


def usage_counts(obj: Any) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from an OpenAI or Responses API body or event."""
    if not isinstance(obj, dict):
        return None, None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        response = obj.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def _error_message(obj: Any) -> str | None:
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("type") or "error")[:500]
        if isinstance(err, str):
            return err[:500]
    return None


class StreamObserver:
    """Feed it upstream reads in order; send what it returns. Then call `finish()`.

    Per read, after the first token, the common case costs two constant-time checks and one
    substring search: engines write whole events, so a read that ends with a blank line needs no
    framing; `usage` and mid-stream `error` events come at the end of a stream, so they are looked
    for once, in the last few reads, when it ends. Only a stream whose usage chunk the proxy must
    remove is watched per read, for its finishing event.
    """

    __slots__ = (
        "_buf",
        "_held",
        "_start",
        "_recent",
        "record",
        "strip_usage",
        "ttft_s",
        "prompt_tokens",
        "completion_tokens",
        "error",
        "error_before",
        "_tail",
    )

    TAIL_READS = 4  # reads kept to look for the usage and error events when the stream ends

    def __init__(self, start: float, strip_usage: bool = False) -> None:
        self._start = start
        self._buf = b""
        self._held: list[bytes] | None = None
        self._recent: collections.deque[bytes] = collections.deque(maxlen=self.TAIL_READS)
        # For events relayed without `feed` (app/proxy/passthrough.py: whole `data:` events once the
        # stream is `steady`): kept as `feed` keeps them, for `finish` to read the stream's end.
        self.record = self._recent.append
        self.strip_usage = strip_usage
        self.ttft_s: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.error: str | None = None
        self.error_before: str | None = None
        """The request's error when the stream ended (`settle`: an error event does not replace it)."""
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._buf + chunk if self._buf else chunk
        if data.endswith(b"\n\n"):  # the usual read: whole events
            block, self._buf = data, b""
        else:
            end = _event_start(data, len(data))  # just past the last blank line; 0: none yet
            if end == 0:
                self._buf = data
                return b""
            block, self._buf = (data, b"") if end == len(data) else (data[:end], data[end:])
        if self.ttft_s is None:
            self._first_token(block)
        if self.strip_usage and (self._held is not None or _FINISHED in block or _USAGE in block):
            block = self._strip(block)
        self._recent.append(block)
        return block

    @property
    def steady(self) -> bool:
        """The first token is out and nothing is buffered or held: a read of whole events that
        are neither the stream's last nor (when stripping usage) finishing or usage events needs
        nothing from `feed` but to be recorded."""
        return self.ttft_s is not None and not self._buf and self._held is None

    def finish(self) -> bytes:
        """Whatever is still buffered or held (a stream cut short, a last event without a blank
        line); and what the stream's last events say (usage, error): `end`, then `read_end`."""
        out = self.end()
        self.read_end()
        return out

    def end(self) -> bytes:
        """Whatever is still buffered or held, to send now; the stream's last reads are kept for
        `read_end`, which the relay leaves to the request's accounting (`settle`), once the
        response is out."""
        out = b"".join(self._held) if self._held else b""
        self._held = None
        if self._buf:
            out += self._buf
            self._buf = b""
        recent = self._recent
        if out:
            recent.append(out)
        # Usually the whole tail is one read: searched where it lies, not copied.
        self._tail = recent[0] if len(recent) == 1 else b"".join(recent)
        recent.clear()
        return out

    def read_end(self) -> None:
        """What the stream's last events say: its usage and an error event."""
        tail, self._tail = self._tail, b""
        # Searched from the end: the usage event is the stream's last but `[DONE]`, and an error
        # event one of its last few. A forward search read every byte of every stream (JSON is full
        # of the quote the needles end with): 18 µs a 64-event stream, a tenth of the proxy's CPU.
        if self.completion_tokens is None and (at := tail.rfind(_USAGE)) >= 0:
            self._usage(_data(_event_at(tail, at)))
        if self.error is None and (at := tail.rfind(_ERROR, _last_events_start(tail, 3))) >= 0:
            self.error = _error_message(_data(_event_at(tail, at)))

    def settle(self, rec: Any) -> None:
        """`read_end`, onto the request's record (app/middleware.py's accounting): the tokens, and
        the error event unless the request already had an error when the stream ended."""
        self.read_end()
        rec.prompt_tokens, rec.completion_tokens = self.prompt_tokens, self.completion_tokens
        if self.error is not None and self.error_before is None:
            rec.error = self.error

    def _strip(self, block: bytes) -> bytes:
        """From the first finishing event on, event by event: hold, strip, restore."""
        if self._held is not None:
            return self._events(block)
        marks = [i for i in (block.find(_FINISHED), block.find(_USAGE)) if i >= 0]
        cut = _event_start(block, min(marks))
        return block[:cut] + self._events(block[cut:])

    def _first_token(self, block: bytes) -> None:
        start = 0
        while start < len(block):  # event by event, stopping at the first with output
            end = block.find(b"\n\n", start)
            end = len(block) if end < 0 else end + 2
            if has_generated_output(_data(block[start:end])):
                self.ttft_s = time.perf_counter() - self._start
                return
            start = end

    def _usage(self, obj: Any) -> None:
        prompt, completion = usage_counts(obj)
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion

    def _events(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for event in _split_events(block):
            if _USAGE in event:
                obj = _data(event)
                self._usage(obj)
                if isinstance(obj, dict) and obj.get("choices") == []:
                    self._release_held(out, obj.get("system_fingerprint"))
                    continue
            if self._held is not None or _FINISHED in event:
                if self._held is None:
                    self._held = []
                self._held.append(event)
                continue
            out.append(event)
        return b"".join(out)

    def _release_held(self, out: list[bytes], fingerprint: Any) -> None:
        held, self._held = self._held or [], None
        if isinstance(fingerprint, str):
            suffix = b',"system_fingerprint":' + orjson.dumps(fingerprint) + b"}"
            for i, event in enumerate(held):
                if _FINISHED in event and _FINGERPRINT not in event:
                    close = event.rfind(b"}")
                    held[i] = event[:close] + suffix + event[close + 1 :]
        out.extend(held)
