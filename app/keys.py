"""API keys: who is calling, under which name, with which limits; reloaded without a restart.

`API_KEY` (comma-separated) and `API_KEY_FILE` give the keys. The file is either the plain format,
one key per line (`#` comments), or a YAML or JSON list of keys with a name and optional limits:

    - name: team-a                     # logs, metrics and usage carry this, never the secret
      key: sk-team-a-...
      max_parallel_requests: 8         # requests in flight (queued ones included)
      rpm: 600                         # requests per minute
      tpm: 200000                      # prompt + completion tokens per minute
      models: [tiny-text, my-adapter]  # `model` values this key may use (base or adapters)
      expires: 2027-01-31T00:00:00Z    # refused (401) from then on

(a mapping `{"keys": [...]}` is read the same). A plain key's name is `key-` and the first 8 hex
digits of its SHA-256, so it is the same after a restart or a reordering of the file.

Keys are looked up by the SHA-256 digest of the token: one hash per request whatever the number of
keys, and no timing reveals a key. The file is read again on SIGHUP (the launcher) and when it
changes (`KeyRing.watch`); a file that cannot be read or parsed, or that would leave no key at all
where there were some, is refused and the keys in use stay.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app import metrics
from app.logs import get_logger

log = get_logger("app.keys")

ANONYMOUS = "anonymous"
"""The name requests are counted under when no API key is configured."""
ADMIN = "admin"
"""The name of requests made with ADMIN_API_KEY."""
BATCH = "batch"
"""The name batch lines (app/batch/) are counted under when their batch records no owner (made
before owners were); otherwise they count under the key that made the batch."""
RESERVED = frozenset({ANONYMOUS, ADMIN, BATCH})

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SECRET = re.compile(r"[\x21-\x7e]+")  # what a bearer token can hold: visible ASCII, no space
_FIELDS = ("name", "key", "max_parallel_requests", "rpm", "tpm", "models", "expires")
_LIMITS = ("max_parallel_requests", "rpm", "tpm")
POLL_S = 1.0
"""How often the file's modification time is looked at."""
SETTLE_S = 0.5
"""A changed file is read once its modification time is this old (a writer has finished)."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    name: str
    secret: bytes = field(repr=False)
    max_parallel_requests: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: frozenset[str] | None = None
    expires: float | None = None
    """Unix time from which the key is refused."""

    @property
    def limited(self) -> bool:
        return self.max_parallel_requests is not None or self.rpm is not None or self.tpm is not None

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def plain_name(secret: bytes) -> str:
    return "key-" + hashlib.sha256(secret).hexdigest()[:8]


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


# --- parsing ----------------------------------------------------------------------------------------


def _structured(text: str, path: Path | None) -> bool:
    """A YAML or JSON list, rather than one key per line: by the file's extension, or by its first
    line that is not blank or a comment (`[`, `{`, `- `, `keys:`). A plain key never starts so (a
    bearer token holds no space, and `[`/`{` would be odd ones)."""
    if path is not None and path.suffix.lower() in (".yaml", ".yml", ".json"):
        return True
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        return line.startswith(("[", "{", "- ")) or line == "-" or line.startswith("keys:")
    return False


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number of at least 1, not {value!r}")
    return value


def _expiry(value: Any, what: str) -> float:
    """A date (its start, UTC), a date and time (UTC unless it says otherwise), an ISO 8601 string of
    either, or unix seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a date, a date and time or unix seconds, not {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be finite")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{what}: {value!r} is not an ISO 8601 date or date and time") from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    raise ValueError(f"{what} must be a date, a date and time or unix seconds, not {value!r}")


def _entry(item: Any, index: int) -> KeyEntry:
    where = f"key {index + 1}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping with `name` and `key`, not {type(item).__name__}")
    unknown = sorted(str(k) for k in item if k not in _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    name = item.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(
            f"{where}: `name` must be 1-64 letters, digits, `.`, `_` or `-` (starting with a letter or "
            f"digit), not {name!r}"
        )
    where = f"key {name!r}"
    if name in RESERVED:
        raise ValueError(f"{where}: the names {', '.join(sorted(RESERVED))} are reserved")
    secret = item.get("key")
    if isinstance(secret, int) and not isinstance(secret, bool):
        secret = str(secret)  # YAML reads an all-digit key as a number
    if not isinstance(secret, str) or not _SECRET.fullmatch(secret):
        raise ValueError(f"{where}: `key` must be a non-empty string of visible ASCII characters, no spaces")
    limits = {k: _positive_int(item[k], f"{where}: `{k}`") for k in _LIMITS if item.get(k) is not None}
    models = item.get("models")
    if models is not None:
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{where}: `models` must be a list of model names")
        models = frozenset(models)
    expires = item.get("expires")
    return KeyEntry(
        name=name,
        secret=secret.encode(),
        models=models,
        expires=None if expires is None else _expiry(expires, f"{where}: `expires`"),
        **limits,
    )


def parse_key_file(text: str, path: Path | None = None) -> list[KeyEntry]:
    """The keys a file holds, in its order; raises ValueError saying what is wrong (never quoting a
    secret)."""
    if not _structured(text, path):
        secrets = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        return [KeyEntry(plain_name(s.encode()), s.encode()) for s in dict.fromkeys(secrets)]
    try:
        data = json.loads(text) if text.lstrip().startswith(("[", "{")) else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"not valid YAML or JSON{at}") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ValueError("expected a list of keys (or a mapping with one field, `keys`, holding the list)")
    entries = [_entry(item, i) for i, item in enumerate(data)]
    names, secrets = set(), set()
    for e in entries:
        if e.name in names:
            raise ValueError(f"the name {e.name!r} is given to two keys")
        if e.secret in secrets:
            raise ValueError(f"key {e.name!r}: the same secret is listed twice")
        names.add(e.name)
        secrets.add(e.secret)
    return entries


def read_key_file(path: Path) -> list[KeyEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"API_KEY_FILE {path} cannot be read: {reason}") from exc
    try:
        return parse_key_file(text, path)
    except ValueError as exc:
        raise ValueError(f"API_KEY_FILE {path}: {exc}") from None


def load_entries(inline: str | None, file: Path | None) -> list[KeyEntry]:
    """The file's keys, then API_KEY's that the file does not hold."""
    entries = read_key_file(file) if file is not None else []
    held = {e.secret for e in entries}
    for secret in dict.fromkeys(k.strip() for k in (inline or "").split(",") if k.strip()):
        if secret.encode() not in held:
            entries.append(KeyEntry(plain_name(secret.encode()), secret.encode()))
    return entries


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


# --- the keys in use ----------------------------------------------------------------------------


class KeyRing:
    """The keys in use. Replaced whole on a reload: a request keeps the entry it was identified by."""

    def __init__(self, inline: str | None, file: Path | None) -> None:
        self.inline = inline
        self.file = file
        self._stamp = _stamp(file) if file is not None else None
        self._set(load_entries(inline, file))

    def _set(self, entries: list[KeyEntry]) -> None:
        self.entries: tuple[KeyEntry, ...] = tuple(entries)
        self._by_digest = {_digest(e.secret): e for e in entries}
        self.names = frozenset(e.name for e in entries)
        self._by_name = {e.name: e for e in entries}

    @property
    def active(self) -> bool:
        """Keys are required: at least one is configured."""
        return bool(self.entries)

    def named(self, name: str) -> KeyEntry | None:
        """The key called `name` now (a batch's owner, app/batch/: revoked keys are gone)."""
        return self._by_name.get(name)

    def identify(self, token: bytes | None) -> KeyEntry | None:
        if token is None:
            return None
        return self._by_digest.get(_digest(token))

    def secrets(self) -> list[bytes]:
        """Every secret, keys without limits first (the proxy's own clients use the first)."""
        return [e.secret for e in sorted(self.entries, key=lambda e: e.limited)]

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Read the file again; on any problem keep the keys in use (and say why)."""
        if self.file is None:
            log.info("API keys: nothing to reload (no API_KEY_FILE)", reason=reason)
            return False
        stamp = _stamp(self.file)
        try:
            entries = load_entries(self.inline, self.file)
            if self.entries and not entries:
                raise ValueError(f"API_KEY_FILE {self.file} holds no key: that would turn the keys off")
        except ValueError as exc:
            self._stamp = stamp  # not read again until it changes again
            metrics.KEY_RELOADS.labels("error").inc()
            log.error("API keys not reloaded: the keys in use stay", reason=reason, error=str(exc))
            return False
        self._stamp = stamp
        before = self.names
        self._set(entries)
        metrics.KEY_RELOADS.labels("ok").inc()
        log.info(
            "API keys reloaded",
            reason=reason,
            keys=len(entries),
            added=sorted(self.names - before),
            removed=sorted(before - self.names),
        )
        return True

    def changed(self, now: float | None = None) -> bool:
        """The file differs from what was read, and has settled (SETTLE_S)."""
        if self.file is None:
            return False
        stamp = _stamp(self.file)
        if stamp is None or stamp == self._stamp:
            return False
        return (time.time() if now is None else now) - stamp[0] / 1e9 >= SETTLE_S

    async def watch(self) -> None:
        """Reload when the file changes (run for the app's lifetime)."""
        while self.file is not None:
            await asyncio.sleep(POLL_S)
            if self.changed():
                self.reload("file changed")
