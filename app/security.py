"""Who may call what, and which media URLs the engine may be asked to fetch.

- API keys: one or several (`API_KEY`, comma-separated, and/or `API_KEY_FILE`), with names and
  limits: app/keys.py.
- Admin routes (app/routes.py): engine endpoints that change or expose the server rather than
  answer a request (LoRA loading, elastic scaling, aborting other requests, dev-mode routes...).
  Refused unless the request carries `ADMIN_API_KEY`.
- One `Authorization` header: a request with several is refused (400) on every route, so the proxy
  and the engine (Starlette reads the first) can never read different keys.
- Media URLs (SSRF): every `http(s)` URL the engine could fetch from a request body (see
  `media_urls`) is checked before the engine sees it: no userinfo, no backslash or control characters (the parser-differential tricks of
  GHSA-v359-jj2v-j536 / CVE-2026-24779), only `ALLOWED_MEDIA_DOMAINS` when set, and never a host that
  resolves to a private, loopback, link-local or otherwise non-public address unless
  `ALLOW_PRIVATE_MEDIA_URLS`. The engine is also told not to follow redirects and gets the same
  domain allow-list, so a check here cannot be walked around there.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.keys import KeyEntry, plain_name, read_key_file

# --- keys -----------------------------------------------------------------------------------------


def load_keys(inline: str | None, file: Path | None) -> list[bytes]:
    """Every key's secret: `API_KEY`'s (comma-separated), then `API_KEY_FILE`'s (one per line, or the
    YAML/JSON list of app/keys.py), keys with limits last: the proxy's own clients (the RunPod
    worker, one-shot batches) take the first."""
    inline_keys = [k.strip().encode() for k in (inline or "").split(",") if k.strip()]
    entries = [KeyEntry(plain_name(k), k) for k in inline_keys]
    if file is not None:
        entries += read_key_file(file)
    return [e.secret for e in sorted(entries, key=lambda e: e.limited)]


SEVERAL_AUTHORIZATION = "Send one Authorization header, not several."


def authorization(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """(the Authorization header, whether there are several): several are refused everywhere."""
    found = None
    for name, value in headers:
        if name == b"authorization":
            if found is not None:
                return found, True
            found = value
    return found, False


def mask_url_userinfo(url: str) -> str:
    """The URL with any `user:password@` replaced by `***@`, for display."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rsplit('@', 1)[1]}{slash}{path}"


def bearer(value: bytes | None) -> bytes | None:
    scheme, _, token = (value or b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


def matches(token: bytes | None, keys: Iterable[bytes]) -> bool:
    """Constant time per key, and every key is compared (no early exit that would time which)."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


# --- media URLs -------------------------------------------------------------------------------------

_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")

# Where vLLM 0.32 reads a URL to fetch (derived from its code; tests/app/test_media_parity.py replays
# bodies through vLLM's own parsers to show the two agree):
# - content parts (renderers/chat_utils.py): by the key it reads, whatever `type` says:
#   `image_url`, `audio_url`, `video_url`, as a string or `{"url": ...}` (Responses API
#   `input_image` parts hold a string `image_url`);
# - Anthropic image blocks, also inside `tool_result` (entrypoints/anthropic/serving.py):
#   `source.url`;
# - `/inference/v1/generate` `content_parts`: `{"type": "image_url" | ..., "url": ...}`;
# - `/v1/systemone` and Cohere's `/v2/embed`: top-level `images`, `audio`, `videos` lists.
# Every dict in the body is looked at, wherever it sits (messages, Responses input and tool
# outputs, `/v1/rerank` documents, `/score` data_*/text_*/queries/items, pooling inputs...): a URL
# the engine would not fetch may be checked too, one it would fetch is never missed.
_MEDIA_KEYS = ("image_url", "audio_url", "video_url")
_URL_PART_TYPES = frozenset(_MEDIA_KEYS)
_MEDIA_LISTS = ("images", "audio", "videos")


def media_urls(obj: Any, deep: bool = True) -> list[str]:
    """Every URL in a request body that the engine could fetch (data: URLs included). `deep=False`:
    only the top-level media lists (the caller knows no key ending in `url` is in the body)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key in _MEDIA_LISTS:
            value = obj.get(key)
            if isinstance(value, str):
                found.append(value)
            elif isinstance(value, list):
                found += [v for v in value if isinstance(v, str)]
    stack = [obj] if deep else []
    while stack:  # depth first, in document order; iterative: no nesting exhausts the stack
        node = stack.pop()
        if isinstance(node, dict):
            for key in _MEDIA_KEYS:
                value = node.get(key)
                if isinstance(value, dict):
                    value = value.get("url")
                if isinstance(value, str):
                    found.append(value)
            source = node.get("source")
            if isinstance(source, dict) and isinstance(url := source.get("url"), str):
                found.append(url)
            if isinstance(url := node.get("url"), str) and node.get("type") in _URL_PART_TYPES:
                found.append(url)
            stack += [v for v in reversed(node.values()) if isinstance(v, (dict, list))]
        elif isinstance(node, list):
            stack += [v for v in reversed(node) if isinstance(v, (dict, list))]
    return found


class MediaRefused(Exception):
    """A media URL the engine must not fetch; the message is safe to show the client."""


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def parse_media_url(url: str, allowed_domains: frozenset[str]) -> str | None:
    """The host to resolve for an http(s) URL, None for inline data; raises MediaRefused."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return None
    if scheme not in ("http", "https"):
        raise MediaRefused(f"media URL scheme {scheme!r} is not allowed (http, https or data)")
    rest = url.split(":", 1)[1] if ":" in url else ""
    authority = rest[2:].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0] if rest.startswith("//") else ""
    if _FORBIDDEN.search(url.split("?", 1)[0].split("#", 1)[0]) or _FORBIDDEN.search(authority):
        raise MediaRefused("media URL contains a backslash, space or control character")
    if "@" in authority:
        raise MediaRefused("media URL with credentials (user@host) is not allowed")
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        _ = parts.port  # a malformed port raises ValueError
    except ValueError as exc:
        raise MediaRefused(f"malformed media URL: {exc}") from None
    if not host:
        raise MediaRefused("media URL has no host")
    if allowed_domains and host not in allowed_domains:
        raise MediaRefused(f"media URL host {host!r} is not in ALLOWED_MEDIA_DOMAINS")
    return host


class MediaGuard:
    """Checks media URLs; resolves hosts (cached briefly) to refuse non-public addresses."""

    CACHE_SECONDS = 30.0

    def __init__(self, allowed_domains: Iterable[str], allow_private: bool) -> None:
        self.allowed_domains = frozenset(d.strip().rstrip(".").lower() for d in allowed_domains if d.strip())
        self.allow_private = allow_private
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def check(self, urls: list[str]) -> None:
        for url in urls:
            host = parse_media_url(url, self.allowed_domains)
            if host is None or self.allow_private:
                continue
            problem = await self._host_problem(host)
            if problem:
                raise MediaRefused(problem)

    async def _host_problem(self, host: str) -> str | None:
        now = time.monotonic()
        cached = self._cache.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        problem = await self._resolve(host)
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[host] = (now + self.CACHE_SECONDS, problem)
        return problem

    @staticmethod
    async def _resolve(host: str) -> str | None:
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                return f"media URL host {host!r} cannot be resolved"
            addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses or not all(_public(a) for a in addresses):
            return (
                f"media URL host {host!r} is not a public address (set ALLOW_PRIVATE_MEDIA_URLS "
                "to allow private, loopback and link-local hosts)"
            )
        return None
