"""The token counts of a non-streamed answer, found as its body passes through the proxy.

vLLM's bodies end with their `usage` object, or nearly: chat completions put `prompt_logprobs` and
`prompt_token_ids` after it, which can be megabytes. So the body is neither kept nor parsed whole:
each chunk is searched for the `"usage":` key, and only the few hundred bytes from the last one on are
kept and parsed. The match is always the key: inside a JSON string every quote is escaped, and a
string value `"usage"` (a prompt token's text in `prompt_logprobs`) is not followed by a colon.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from app.proxy.sse import usage_counts

_KEY = b'"usage":'
_HOLD = 4096  # bytes kept from the last key on; the object is ~150 B, a few hundred with its details
_DECODE = json.JSONDecoder().raw_decode  # one value, whatever follows it


class UsageFinder:
    """Feed it a body's chunks in order, then read `counts()`; it holds at most `_HOLD` bytes."""

    __slots__ = ("_held", "_carry")

    def __init__(self) -> None:
        self._held = b""  # from the last key seen on, at most _HOLD bytes
        self._carry = b""  # the last bytes of the body so far: a key split across two chunks

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk if self._carry else chunk
        at = data.rfind(_KEY)
        if at >= 0:
            self._held = data[at : at + _HOLD]
        elif 0 < len(self._held) < _HOLD:
            self._held += chunk[: _HOLD - len(self._held)]
        self._carry = data[-(len(_KEY) - 1) :]

    def settle(self, rec: Any) -> None:
        """The counts onto the request's record, in its accounting (app/middleware.py), once the
        response is out."""
        rec.prompt_tokens, rec.completion_tokens = self.counts()

    def counts(self) -> tuple[int | None, int | None]:
        """(prompt_tokens, completion_tokens) of the body's last `"usage":` value, or Nones."""
        held = self._held
        if not held:
            return None, None
        # Usually a flat object: up to its first `}` is the value exactly when that parses (a nested
        # object or a `}` in a string leaves the prefix unbalanced).
        if (end := held.find(b"}")) > 0:
            try:
                return usage_counts({"usage": orjson.loads(held[len(_KEY) : end + 1])})
            except orjson.JSONDecodeError:
                pass
        text = held.decode("utf-8", "replace")
        start = len(_KEY)
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        try:
            value, _ = _DECODE(text, start)
        except ValueError:  # cut short by _HOLD, or not JSON
            return None, None
        return usage_counts({"usage": value})
