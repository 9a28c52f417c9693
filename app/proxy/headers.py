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


def filter_headers(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """Headers without hop-by-hop ones, those named in `Connection`, and `drop` (lower-case)."""
    out: Headers = []
    connection = None
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in drop:
            if low == b"connection":
                connection = value
            continue
        out.append((name, value))
    if connection is not None:
        named = {token.strip().lower() for token in connection.split(b",")}
        out = [(name, value) for name, value in out if name.lower() not in named]
    return out


def get_header(headers: Headers, name: bytes) -> bytes | None:
    """First value of `name` (lower-case), as ASGI servers lower-case request header names."""
    for key, value in headers:
        if key == name:
            return value
    return None
