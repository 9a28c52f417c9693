import asyncio

import pytest

from app.security import (
    MediaGuard,
    MediaRefused,
    authorization,
    bearer,
    load_keys,
    mask_url_userinfo,
    matches,
    media_urls,
    parse_media_url,
)

NONE = frozenset()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1\\@example.com/x.png", "backslash"),  # GHSA-v359-jj2v-j536
        ("http://example.com\\@127.0.0.1/x.png", "backslash"),
        ("http://user:pass@example.com/x.png", "credentials"),
        ("http://example.com@127.0.0.1/x.png", "credentials"),
        ("http://exa mple.com/x.png", "space"),
        ("http://example.com\t/x.png", "control"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://example.com/", "scheme"),
        ("http:///x.png", "no host"),
        ("http://example.com:99999/x", "malformed"),
    ],
)
def test_parser_differential_tricks_and_odd_urls_are_refused(url, why):
    with pytest.raises(MediaRefused, match=why):
        parse_media_url(url, NONE)


def test_allowed_domains_are_exact_hostnames():
    allowed = frozenset({"images.example.com"})
    assert parse_media_url("https://images.example.com./a.png", allowed) == "images.example.com"
    assert parse_media_url("https://IMAGES.example.com/a.png", allowed) == "images.example.com"
    for url in ("https://evil.example.com/a.png", "https://images.example.com.evil.net/a.png"):
        with pytest.raises(MediaRefused, match="ALLOWED_MEDIA_DOMAINS"):
            parse_media_url(url, allowed)
    assert parse_media_url("data:image/png;base64,AAAA", allowed) is None


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "[::1]",
        "[fe80::1]",
        "[fc00::1]",
        "[::ffff:127.0.0.1]",
        "localhost",  # resolves to loopback
    ],
)
def test_non_public_addresses_are_refused(host):
    guard = MediaGuard((), allow_private=False)
    with pytest.raises(MediaRefused, match="not a public address"):
        asyncio.run(guard.check([f"http://{host}/x.png"]))


def test_public_addresses_pass_and_private_ones_can_be_allowed():
    asyncio.run(
        MediaGuard((), allow_private=False).check(["http://8.8.8.8/x.png", "http://[2001:4860::8888]/a"])
    )
    asyncio.run(MediaGuard((), allow_private=True).check(["http://127.0.0.1/x.png"]))
    with pytest.raises(MediaRefused, match="credentials"):  # allowing private hosts keeps the syntax checks
        asyncio.run(MediaGuard((), allow_private=True).check(["http://a@127.0.0.1/x.png"]))


def test_unresolvable_hosts_are_refused():
    with pytest.raises(MediaRefused, match="cannot be resolved"):
        asyncio.run(MediaGuard((), allow_private=False).check(["http://no-such-host.invalid/x.png"]))


def test_media_urls_are_found_in_chat_and_responses_requests():
    chat = {
        "messages": [
            {"role": "user", "content": "plain"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "http://not-a-media-url.example"},
                    {"type": "image_url", "image_url": {"url": "http://a/1.png"}},
                    {"type": "video_url", "video_url": {"url": "http://a/v.mp4"}},
                    {"type": "audio_url", "audio_url": {"url": "http://a/s.wav"}},
                    {"type": "image_url", "image_url": "http://a/2.png"},
                ],
            },
        ]
    }
    assert media_urls(chat) == ["http://a/1.png", "http://a/v.mp4", "http://a/s.wav", "http://a/2.png"]
    responses = {
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://b/3.png"}]}]
    }
    assert media_urls(responses) == ["http://b/3.png"]


def test_keys_from_the_variable_and_the_file(tmp_path):
    file = tmp_path / "keys"
    file.write_text("# team keys\nsk-file-1\n\n  sk-file-2  \n")
    keys = load_keys("sk-a, sk-b", file)
    assert keys == [b"sk-a", b"sk-b", b"sk-file-1", b"sk-file-2"]
    assert matches(bearer(b"Bearer sk-file-2"), keys) and matches(bearer(b"bearer sk-a"), keys)
    assert not matches(bearer(b"Bearer sk-c"), keys)
    assert not matches(bearer(b"sk-a"), keys) and not matches(bearer(b"Bearer "), keys)
    with pytest.raises(ValueError, match="cannot be read"):
        load_keys(None, tmp_path / "missing")


def test_several_authorization_headers_are_reported_and_the_first_is_read():
    assert authorization([(b"authorization", b"Bearer a")]) == (b"Bearer a", False)
    assert authorization([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")])[1]
    assert authorization([(b"x", b"y")]) == (None, False)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@engine:8000/v1", "http://***@engine:8000/v1"),
        ("https://token@engine", "https://***@engine"),
        ("http://a:b@c@engine:1", "http://***@engine:1"),
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001"),
        ("http://engine/path@x", "http://engine/path@x"),
    ],
)
def test_engine_url_userinfo_is_masked(url, shown):
    assert mask_url_userinfo(url) == shown
