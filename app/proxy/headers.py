"""Header handling for a pass-through proxy (RFC 9110 section 7.6.1)."""

from __future__ import annotations

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

Headers = list[tuple[bytes, bytes]]


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def filter_headers(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """Headers without hop-by-hop ones, those named in `Connection`, and `drop` (lower-case)."""
    extra = _connection_tokens(headers)
    return [
        (name, value)
        for name, value in headers
        if (low := name.lower()) not in HOP_BY_HOP and low not in extra and low not in drop
    ]


def get_header(headers: Headers, name: bytes) -> bytes | None:
    """First value of `name` (lower-case), as ASGI servers lower-case request header names."""
    for key, value in headers:
        if key == name:
            return value
    return None
