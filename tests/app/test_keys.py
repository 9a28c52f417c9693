"""API keys (app/keys.py): the file formats, names, limits, and reloads that never drop keys in
use. The SIGHUP path runs the real launcher (`python -m app.launcher`, ENGINE=external) in front of
a stand-in engine (tests/fake_engine.py), which holds requests open on cue so that a reload can be
shown to happen while they are in flight."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from app import metrics
from app.keys import ANONYMOUS, KeyRing, load_entries, parse_key_file, plain_name
from app.security import load_keys
from app.settings import load_settings
from fake_engine import FakeEngine
from stack import ROOT, free_port, wait_for

YAML = """\
# team keys
- name: team-a
  key: sk-team-a
  max_parallel_requests: 4
  rpm: 600
  tpm: 100000
  models: [tiny-text, my-adapter]
  expires: 2027-01-31
- name: team-b
  key: sk-team-b
"""


def test_a_yaml_list_gives_names_and_limits():
    a, b = parse_key_file(YAML)
    assert (a.name, a.secret, a.max_parallel_requests, a.rpm, a.tpm) == (
        "team-a",
        b"sk-team-a",
        4,
        600,
        100000,
    )
    assert a.models == frozenset({"tiny-text", "my-adapter"}) and a.limited
    assert a.expires == dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()
    assert (b.name, b.rpm, b.models, b.expires, b.limited) == ("team-b", None, None, None, False)
    assert "sk-team-a" not in repr(a)  # a secret never reaches a log or a traceback through repr


def test_json_and_a_keys_mapping_read_the_same():
    doc = [{"name": "j", "key": "sk-j", "rpm": 5, "expires": "2027-01-31T12:00:00+02:00"}]
    (j,) = parse_key_file(json.dumps(doc))
    assert j.rpm == 5 and j.expires == dt.datetime(2027, 1, 31, 10, tzinfo=dt.UTC).timestamp()
    (k,) = parse_key_file(json.dumps({"keys": doc}), Path("keys.json"))
    assert k == j
    (y,) = parse_key_file("keys:\n  - name: y\n    key: 12345\n")  # YAML reads digits as a number
    assert y.secret == b"12345"


def test_the_plain_format_keeps_working_and_names_keys_by_their_hash():
    entries = parse_key_file("# comment\nsk-one\n\n  sk-two  \nsk-one\n")
    assert [e.secret for e in entries] == [b"sk-one", b"sk-two"]
    assert entries[0].name == plain_name(b"sk-one") and entries[0].name.startswith("key-")
    assert len(entries[0].name) == 12 and "sk-one" not in entries[0].name
    assert not entries[0].limited


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- name: a\n  key: k\n  rpm: 0\n", "`rpm` must be a whole number of at least 1"),
        ("- name: a\n  key: k\n  tpm: 1.5\n", "`tpm` must be a whole number"),
        ("- name: a\n  key: k\n  max_parallel_requests: true\n", "max_parallel_requests"),
        ("- name: a\n  key: k\n  rate: 5\n", "unknown field(s) rate"),
        ("- name: a b\n  key: k\n", "`name` must be"),
        ("- name: admin\n  key: k\n", "reserved"),
        ("- name: a\n  key: has space\n", "`key` must be"),
        ("- name: a\n", "`key` must be"),
        ("- name: a\n  key: k\n- name: a\n  key: j\n", "given to two keys"),
        ("- name: a\n  key: k\n- name: b\n  key: k\n", "the same secret is listed twice"),
        ("- name: a\n  key: k\n  models: 5\n", "`models` must be a list"),
        ("- name: a\n  key: k\n  expires: next week\n", "not an ISO 8601"),
        ("- [a\n", "not valid YAML or JSON"),
        ('{"name": "a"}', "expected a list of keys"),
        ("- just-a-string\n", "expected a mapping"),
    ],
)
def test_a_bad_key_file_is_refused_saying_why_and_never_quoting_a_secret(text, problem):
    with pytest.raises(ValueError) as err:
        parse_key_file(text)
    assert problem in str(err.value)
    assert "has space" not in str(err.value) and "sk-" not in str(err.value)


def test_a_bad_key_file_stops_the_start_with_one_line(tmp_path, monkeypatch, capsys):
    file = tmp_path / "keys.yaml"
    file.write_text("- name: a\n  key: k\n  rpm: -1\n")
    monkeypatch.setenv("MODEL_NAME", "m")
    monkeypatch.setenv("API_KEY_FILE", str(file))
    assert load_settings() is None
    assert "key 'a': `rpm` must be a whole number of at least 1" in capsys.readouterr().err
    monkeypatch.setenv("MAX_QUEUED_REQUESTS", "3")
    monkeypatch.delenv("API_KEY_FILE")
    assert load_settings() is None
    assert "MAX_QUEUED_REQUESTS needs MAX_CONCURRENT_REQUESTS" in capsys.readouterr().err


def test_inline_keys_join_the_files_and_the_proxys_own_clients_take_one_without_limits(tmp_path):
    file = tmp_path / "keys.yaml"
    file.write_text("- name: limited\n  key: sk-l\n  rpm: 1\n- name: free\n  key: sk-f\n")
    names = [e.name for e in load_entries("sk-x, sk-f", file)]
    assert names == ["limited", "free", plain_name(b"sk-x")]  # sk-f is the file's, with its name
    assert load_keys("sk-x", file) == [b"sk-x", b"sk-f", b"sk-l"]


def test_keys_are_identified_by_their_digest_and_an_expired_key_says_so(tmp_path):
    file = tmp_path / "keys.yaml"
    file.write_text("- name: old\n  key: sk-old\n  expires: 2020-01-01\n- name: new\n  key: sk-new\n")
    ring = KeyRing(None, file)
    assert ring.active and ring.identify(b"sk-new").name == "new"
    assert ring.identify(b"sk-old").expired() and not ring.identify(b"sk-new").expired()
    assert ring.identify(b"sk-nope") is None and ring.identify(None) is None
    assert not KeyRing(None, None).active and ANONYMOUS == "anonymous"


def test_a_reload_replaces_the_keys_and_a_bad_or_empty_file_keeps_those_in_use(tmp_path):
    file = tmp_path / "keys.yaml"
    file.write_text("- name: a\n  key: sk-a\n")
    ring = KeyRing("sk-inline", file)
    ok, errors = metrics.KEY_RELOADS.labels("ok").value, metrics.KEY_RELOADS.labels("error").value
    file.write_text("- name: b\n  key: sk-b\n")
    assert ring.reload()
    assert ring.identify(b"sk-a") is None and ring.identify(b"sk-b").name == "b"
    assert ring.identify(b"sk-inline") is not None  # API_KEY's keys stay
    file.write_text("- name: b\n  key: sk-b\n  rpm: nope\n")
    assert not ring.reload()
    assert ring.identify(b"sk-b").name == "b"
    plain = tmp_path / "plain"
    plain.write_text("sk-p\n")
    ring2 = KeyRing(None, plain)
    plain.write_text("")  # half-written, or emptied by mistake: keys would turn off
    assert not ring2.reload() and ring2.identify(b"sk-p") is not None
    plain.unlink()
    assert not ring2.reload() and ring2.active
    assert metrics.KEY_RELOADS.labels("ok").value - ok == 1
    assert metrics.KEY_RELOADS.labels("error").value - errors == 3


def test_a_changed_file_is_noticed_once_it_has_settled(tmp_path):
    file = tmp_path / "keys"
    file.write_text("sk-1\n")
    ring = KeyRing(None, file)
    assert not ring.changed()
    file.write_text("sk-1\nsk-2\n")
    now = time.time()
    assert not ring.changed(now)  # just written: a writer may not be done
    assert ring.changed(now + 1)
    ring.reload("file changed")
    assert not ring.changed(now + 1)


# --- SIGHUP, through the real launcher ----------------------------------------------------------


def _launcher(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "app.launcher"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_sighup_reloads_the_keys_while_requests_are_in_flight(tmp_path):
    """Fake engine: it holds requests open until the test releases them, so the reload happens
    while they are in flight, on cue."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("- name: old\n  key: sk-old\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with FakeEngine() as fake:
        proc = _launcher(
            {
                "ENGINE": "external",
                "ENGINE_URL": fake.url,
                "PORT": str(port),
                "ENGINE_PORT": str(free_port()),
                "API_KEY_FILE": str(keys),
                "LOG_FORMAT": "json",
                "SCRAPE_INTERVAL": "0",
                "USAGE_DB_PATH": str(tmp_path / "usage.db"),
                "DRAIN_GRACE_SECONDS": "0",
            },
            tmp_path / "launcher.log",
        )
        try:

            def healthy() -> bool:
                assert proc.poll() is None, (tmp_path / "launcher.log").read_text()
                try:
                    return httpx.get(url + "/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 60, lambda: (tmp_path / "launcher.log").read_text(), interval=0.1)
            results: list[int] = []

            def held() -> None:
                r = httpx.post(
                    url + "/v1/chat/completions",
                    json={"model": "m"},
                    headers={"authorization": "Bearer sk-old", "x-fake": "gate"},
                    timeout=30,
                )
                results.append(r.status_code)

            threads = [threading.Thread(target=held) for _ in range(3)]
            for t in threads:
                t.start()
            wait_for(lambda: fake.held >= 3, 10, "3 requests held by the engine")
            assert fake.held == 3
            keys.write_text("- name: new\n  key: sk-new\n")
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(
                lambda: b"API keys reloaded" in (tmp_path / "launcher.log").read_bytes(), 10, "the reload"
            )
            new = httpx.post(
                url + "/v1/chat/completions", json={"model": "m"}, headers={"authorization": "Bearer sk-new"}
            )
            old = httpx.post(
                url + "/v1/chat/completions", json={"model": "m"}, headers={"authorization": "Bearer sk-old"}
            )
            assert (new.status_code, old.status_code) == (200, 401)
            fake.release(3)
            for t in threads:
                t.join(30)
            assert results == [200, 200, 200]  # in flight with the old key: answered, once each
            assert proc.poll() is None  # SIGHUP no longer ends the process
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    lines = [json.loads(x) for x in (tmp_path / "launcher.log").read_text().splitlines() if x.startswith("{")]
    reload_line = next(x for x in lines if x.get("event") == "API keys reloaded")
    assert reload_line["added"] == ["new"] and reload_line["removed"] == ["old"]
    assert not any("sk-old" in json.dumps(x) or "sk-new" in json.dumps(x) for x in lines)
    assert proc.returncode == 0
