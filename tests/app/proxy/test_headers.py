from app.proxy.headers import filter_headers, get_header


def test_hop_by_hop_and_connection_named_headers_are_dropped():
    headers = [
        (b"content-type", b"application/json"),
        (b"connection", b"keep-alive, x-secret-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"x-secret-hop", b"1"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"x-request-id", b"abc"),
    ]
    assert filter_headers(headers) == [(b"content-type", b"application/json"), (b"x-request-id", b"abc")]


def test_extra_drops_and_first_value_lookup():
    headers = [(b"host", b"a"), (b"accept", b"1"), (b"accept", b"2")]
    assert filter_headers(headers, frozenset({b"host"})) == [(b"accept", b"1"), (b"accept", b"2")]
    assert get_header(headers, b"accept") == b"1"
    assert get_header(headers, b"missing") is None
