"""Admission control, API keys with limits, and usage per key, through the proxy (in this process)
in front of a stand-in engine (tests/fake_engine.py): these tests need the engine to hold requests
until the test lets them go (`x-fake: gate`), so that which request waits, which is served and
which is refused is exact, not a matter of timing. Token counts against real vLLM:
tests/integration/test_admission_stack.py."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from app import metrics
from fake_engine import FakeEngine
from inproc import InProcessProxy
from stack import wait_for

KEYS = """\
- name: burst
  key: sk-burst
- name: quiet
  key: sk-quiet
- name: slow
  key: sk-slow
  rpm: 2
- name: single
  key: sk-single
  max_parallel_requests: 1
- name: frugal
  key: sk-frugal
  tpm: 5
- name: narrow
  key: sk-narrow
  models: [allowed]
- name: gone
  key: sk-gone
  expires: 2020-01-01
"""
SECRETS = [line.split(": ")[1] for line in KEYS.splitlines() if line.strip().startswith("key:")]
ADMIN = "sk-admin-secret"


@pytest.fixture(scope="module")
def fake():
    with FakeEngine() as engine:
        yield engine


@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS)
    return path


def post(
    url: str, key: str | None, rid: str, fake_mode: str = "echo", model: str = "m", headers=None, **kw
) -> httpx.Response:
    headers = {"x-request-id": rid, "x-fake": fake_mode, **(headers or {})}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(url + "/v1/chat/completions", json={"model": model}, headers=headers, timeout=60, **kw)


def in_threads(jobs) -> tuple[list[threading.Thread], dict]:
    results: dict = {}

    def run(name, fn):
        results[name] = fn()

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    return threads, results


def usage(url: str, key: str, window: str = "1h") -> httpx.Response:
    return httpx.get(url + f"/v1/usage?window={window}", headers={"authorization": f"Bearer {key}"})


def test_n_requests_m_served_the_rest_429_none_lost_or_counted_twice(fake, keys_file):
    """30 requests at once, 4 slots, 8 places: the engine holds the 4 it gets until the test lets
    them go, so exactly 4 + 8 are served and 18 refused, whatever the arrival order."""
    n, slots, places = 30, 4, 8
    before = {
        "full": metrics.REJECTIONS.labels("queue_full").value,
        "ok": metrics.KEY_REQUESTS.labels("burst", 200).value,
        "429": metrics.KEY_REQUESTS.labels("burst", 429).value,
        "prompt": metrics.KEY_PROMPT_TOKENS.labels("burst").value,
        "waited": metrics.ADMISSION_WAIT._only.counts[:],
    }
    fake.most_held = 0
    with InProcessProxy(
        fake.url,
        API_KEY_FILE=str(keys_file),
        ADMIN_API_KEY=ADMIN,
        MAX_CONCURRENT_REQUESTS=slots,
        MAX_QUEUED_REQUESTS=places,
        QUEUE_TIMEOUT=60,
    ) as p:
        rids = [f"acct-{i}" for i in range(n)]
        threads, results = in_threads(
            [(rid, lambda rid=rid: post(p.url, "sk-burst", rid, "gate")) for rid in rids]
        )
        wait_for(
            lambda: fake.held == slots and len(results) == n - slots - places, what="the burst to settle"
        )
        assert metrics.ADMISSION_QUEUE_DEPTH._only.value == places
        assert metrics.ADMISSION_IN_FLIGHT._only.value == slots
        # Shedding is not a failure: the probes stay 200.
        assert httpx.get(p.url + "/health").status_code == 200
        assert httpx.get(p.url + "/ping").status_code == 200
        fake.release(slots + places)
        for t in threads:
            t.join(60)
        statuses = Counter(r.status_code for r in results.values())
        assert statuses == {200: slots + places, 429: n - slots - places}
        assert fake.most_held == slots  # never more than MAX_CONCURRENT_REQUESTS at the engine
        for rid, r in results.items():
            if r.status_code == 429:
                err = r.json()["error"]
                assert (err["type"], err["code"]) == ("rate_limit_error", "queue_full")
                assert 1 <= int(r.headers["retry-after"]) <= 60
                assert r.headers["x-request-id"] == rid
        served = {rid for rid, r in results.items() if r.status_code == 200}
        seen = [
            s.headers.get("X-Request-ID")
            for s in fake.seen
            if s.headers.get("X-Request-ID", "").startswith("acct-")
        ]
        assert sorted(seen) == sorted(served)  # each served one reached the engine once; no refused one did
        lines = {rid: p.logs.request(rid) for rid in rids}
        assert all(line["key"] == "burst" for line in lines.values())
        assert Counter(line["status"] for line in lines.values()) == statuses
        assert (
            sum(line["queued_ms"] is not None and line["queued_ms"] > 0 for line in lines.values()) >= places
        )
        body = usage(p.url, "sk-burst").json()
    assert body["data"] == [
        {
            "key": "burst",
            "requests": n,
            "prompt_tokens": 3 * (slots + places),
            "completion_tokens": 4 * (slots + places),
            "errors": n - slots - places,
            "rate_limited": n - slots - places,
            "total_tokens": 7 * (slots + places),
        }
    ]
    assert metrics.REJECTIONS.labels("queue_full").value - before["full"] == n - slots - places
    assert metrics.KEY_REQUESTS.labels("burst", 200).value - before["ok"] == slots + places
    assert metrics.KEY_REQUESTS.labels("burst", 429).value - before["429"] == n - slots - places
    assert metrics.KEY_PROMPT_TOKENS.labels("burst").value - before["prompt"] == 3 * (slots + places)
    waited = sum(metrics.ADMISSION_WAIT._only.counts) - sum(before["waited"])
    assert waited == slots + places  # every request that got a slot, whether it waited or not
    assert metrics.ADMISSION_QUEUE_DEPTH._only.value == 0 and metrics.ADMISSION_IN_FLIGHT._only.value == 0
    logged = json.dumps(p.logs.records())
    assert not any(secret in logged for secret in SECRETS)


def test_a_quiet_key_gets_a_place_and_takes_turns_with_a_key_that_filled_the_queue(fake, keys_file):
    fake.most_held = 0
    with InProcessProxy(
        fake.url,
        API_KEY_FILE=str(keys_file),
        MAX_CONCURRENT_REQUESTS=1,
        MAX_QUEUED_REQUESTS=4,
        QUEUE_TIMEOUT=60,
    ) as p:
        burst = [f"fair-a{i}" for i in range(6)]
        threads, results = in_threads(
            [(rid, lambda rid=rid: post(p.url, "sk-burst", rid, "gate")) for rid in burst]
        )
        wait_for(lambda: fake.held == 1 and len(results) == 1, what="the burst to fill the queue")
        quiet: list[dict] = []
        for i in range(2):  # each takes the place of the bursting key's newest
            rid = f"fair-b{i}"
            t, r = in_threads([(rid, lambda rid=rid: post(p.url, "sk-quiet", rid, "gate"))])
            threads += t
            quiet.append(r)
            wait_for(lambda n=i: len(results) == 2 + n, what="an eviction")
        first = len(fake.seen)
        for _ in range(5):  # one at a time: the order the engine gets them is the queue's order
            count = len(fake.seen)
            fake.release(1)
            wait_for(lambda c=count: len(fake.seen) == c + 1 or len(fake.seen) == first + 4, what="the next")
        for t in threads:
            t.join(60)
        for r in quiet:
            results.update(r)
    order = [s.headers["X-Request-ID"] for s in fake.seen[first:]]
    assert len(order) == 4
    assert [rid.startswith("fair-b") for rid in order] == [False, True, False, True]
    codes = Counter((rid[:6], r.status_code) for rid, r in results.items())
    assert codes == {("fair-a", 200): 3, ("fair-a", 429): 3, ("fair-b", 200): 2}


def test_a_client_that_hangs_up_while_queued_leaves_the_queue_at_once_and_never_reaches_the_engine(
    fake, keys_file
):
    with InProcessProxy(
        fake.url,
        API_KEY_FILE=str(keys_file),
        MAX_CONCURRENT_REQUESTS=1,
        MAX_QUEUED_REQUESTS=4,
        QUEUE_TIMEOUT=60,
    ) as p:
        threads, results = in_threads([("held", lambda: post(p.url, "sk-burst", "hang-held", "gate"))])
        wait_for(lambda: fake.held == 1, what="the first request at the engine")
        body = b'{"model":"m"}'
        sock = socket.create_connection(("127.0.0.1", p.port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-burst\r\n"
            b"x-request-id: hang-queued\r\nx-fake: gate\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        wait_for(lambda: metrics.ADMISSION_QUEUE_DEPTH._only.value == 1, what="the request to queue")
        t2, r2 = in_threads([("next", lambda: post(p.url, "sk-quiet", "hang-next", "gate"))])
        wait_for(lambda: metrics.ADMISSION_QUEUE_DEPTH._only.value == 2, what="a second one to queue")
        sock.close()
        started = time.monotonic()
        wait_for(lambda: metrics.ADMISSION_QUEUE_DEPTH._only.value == 1, timeout=5, what="the hang-up")
        assert time.monotonic() - started < 1.0
        line = p.logs.request("hang-queued")
        assert line["status"] == 499 and line["key"] == "burst" and line["queued_ms"] > 0
        fake.release(2)
        for t in threads + t2:
            t.join(30)
    assert results["held"].status_code == 200 and r2["next"].status_code == 200
    assert "hang-queued" not in [s.headers.get("X-Request-ID") for s in fake.seen]


def test_a_keys_limits_answer_429_with_openais_rate_limit_headers(fake, keys_file):
    with InProcessProxy(fake.url, API_KEY_FILE=str(keys_file)) as p:
        # rpm: 2 a minute; every answer says where the key stands, as OpenAI's do
        first, second, third = (post(p.url, "sk-slow", f"rpm-{i}") for i in range(3))
        assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second, third)] == [
            "1",
            "0",
            "0",
        ]
        assert third.headers["x-ratelimit-reset-requests"].endswith("s")
        assert 1 <= int(third.headers["retry-after"]) <= 30
        assert (
            third.json()["error"]["code"] == "key_rpm" and third.json()["error"]["type"] == "rate_limit_error"
        )
        assert "x-ratelimit-limit-tokens" not in first.headers
        # max_parallel_requests: 1
        threads, results = in_threads([("held", lambda: post(p.url, "sk-single", "par-1", "gate"))])
        wait_for(lambda: fake.held == 1)
        refused = post(p.url, "sk-single", "par-2")
        fake.release(1)
        threads[0].join(30)
        assert results["held"].status_code == 200 and refused.status_code == 429
        assert refused.json()["error"]["code"] == "key_parallel" and refused.headers["retry-after"] == "1"
        assert post(p.url, "sk-single", "par-3").status_code == 200
        # tpm: 5; each answer uses 7 tokens, counted when it ends
        ok = post(p.url, "sk-frugal", "tpm-1")
        over = post(p.url, "sk-frugal", "tpm-2")
        assert (ok.status_code, over.status_code) == (200, 429)
        assert (
            ok.headers["x-ratelimit-limit-tokens"] == "5"
            and ok.headers["x-ratelimit-remaining-tokens"] == "5"
        )
        assert (
            over.headers["x-ratelimit-remaining-tokens"] == "0" and over.json()["error"]["code"] == "key_tpm"
        )
        assert p.logs.request("tpm-2")["error"] == "refused: key_tpm"
        # models: a key may use only those listed (403), and only where its model can be read
        assert post(p.url, "sk-narrow", "model-1", model="allowed").status_code == 200
        denied = post(p.url, "sk-narrow", "model-2", model="m")
        assert denied.status_code == 403
        assert (denied.json()["error"]["code"], denied.json()["error"]["param"]) == (
            "model_not_allowed",
            "model",
        )
        multipart = httpx.post(
            p.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", b"RIFF")},
            data={"model": "allowed"},
            headers={"authorization": "Bearer sk-narrow"},
        )
        assert multipart.status_code == 403
        # GET /v1/models is no request for a model: let through, the list cut to what the key may use
        listed = httpx.get(
            p.url + "/v1/models", headers={"authorization": "Bearer sk-narrow", "x-fake": "models"}
        )
        assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == ["allowed"]
        # an answer that is no model list is not passed on unfiltered
        broken = httpx.get(p.url + "/v1/models", headers={"authorization": "Bearer sk-narrow"})
        assert broken.status_code == 502 and broken.json()["error"]["code"] == "engine_error"
        # expired
        expired = post(p.url, "sk-gone", "exp-1")
        assert expired.status_code == 401 and expired.json()["error"]["code"] == "expired_api_key"
        assert post(p.url, "sk-nope", "bad-1").status_code == 401
        assert post(p.url, None, "none-1").status_code == 401


def test_usage_survives_a_restart_and_a_key_sees_only_its_own(fake, keys_file, tmp_path):
    db = tmp_path / "usage.db"
    settings = {"API_KEY_FILE": str(keys_file), "ADMIN_API_KEY": ADMIN, "USAGE_DB_PATH": str(db)}
    with InProcessProxy(fake.url, **settings) as p:
        assert post(p.url, "sk-burst", "use-1").status_code == 200
        assert post(p.url, "sk-burst", "use-2").status_code == 200
        assert post(p.url, "sk-burst", "use-3", "status").status_code == 400  # the engine's error
        assert post(p.url, "sk-quiet", "use-4").status_code == 200
        stream = httpx.post(
            p.url + "/v1/chat/completions",
            json={"model": "m", "stream": True},
            headers={"authorization": "Bearer sk-quiet", "x-fake": "stream"},
        )
        assert stream.status_code == 200
    with InProcessProxy(fake.url, **settings) as p:  # a new app on the same file: a restart
        mine = usage(p.url, "sk-burst", "1d")
        assert mine.status_code == 200 and mine.json()["object"] == "usage"
        assert mine.json()["data"] == [
            {
                "key": "burst",
                "requests": 3,
                "prompt_tokens": 6,
                "completion_tokens": 8,
                "errors": 1,
                "rate_limited": 0,
                "total_tokens": 14,
            }
        ]
        theirs = usage(p.url, "sk-quiet", "all").json()["data"]
        assert [(r["key"], r["requests"]) for r in theirs] == [("quiet", 2)]
        everyone = usage(p.url, ADMIN, "1w").json()["data"]
        by_key = {r["key"]: r for r in everyone}
        assert set(by_key) == {"burst", "quiet", "slow", "single", "frugal", "narrow", "gone"}
        assert by_key["burst"]["requests"] == 3 and by_key["slow"]["requests"] == 0
        bad = usage(p.url, "sk-burst", "2h")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"
        assert httpx.get(p.url + "/v1/usage").status_code == 401
        assert usage(p.url, "sk-gone").status_code == 401
        dash = httpx.get(p.url + "/api/v1/key_usage?window=1h").json()
        assert {r["key"]: r["requests"] for r in dash["data"]}["burst"] == 3
        assert dash["admission"]["max_concurrent"] is None


def test_without_keys_usage_is_counted_as_anonymous_and_open_to_read(fake):
    with InProcessProxy(fake.url) as p:
        assert post(p.url, None, "anon-1").status_code == 200
        assert p.logs.request("anon-1")["key"] == "anonymous"
        rows = httpx.get(p.url + "/v1/usage?window=1h").json()["data"]
    assert [(r["key"], r["requests"], r["total_tokens"]) for r in rows] == [("anonymous", 1, 7)]


def test_keys_reload_when_the_file_changes_while_requests_keep_coming(fake, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- name: a\n  key: sk-a\n")
    stop = threading.Event()
    seen: dict[str, list[int]] = {"sk-a": [], "sk-b": []}

    def load(key: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            seen[key].append(post(p.url, key, f"reload-{key}-{i}").status_code)

    with InProcessProxy(fake.url, API_KEY_FILE=str(keys_file)) as p:
        threads = [threading.Thread(target=load, args=(k,)) for k in seen]
        for t in threads:
            t.start()
        time.sleep(0.3)
        tmp = keys_file.with_suffix(".new")
        tmp.write_text("- name: b\n  key: sk-b\n")
        os.replace(tmp, keys_file)  # replaced whole, as the README advises
        wait_for(lambda: 200 in seen["sk-b"], timeout=15, what="the reload")
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        sent = [f"reload-{k}-{i}" for k, v in seen.items() for i in range(1, len(v) + 1)]
        # A request's line is written after its last byte went out: the client may read the
        # answer before the line of the last request lands, so each line is waited for.
        logged = {rid: p.logs.request(rid)["status"] for rid in sent}
        lines = [r for r in p.logs.records() if str(r.get("request_id", "")).startswith("reload-")]
    # Each key switched once, and every request was answered once, with its log line.
    for key, before, after in (("sk-a", 200, 401), ("sk-b", 401, 200)):
        codes = seen[key]
        switch = codes.index(after)
        assert set(codes[:switch]) == {before} and set(codes[switch:]) == {after}, (key, codes)
        assert [logged[f"reload-{key}-{i}"] for i in range(1, len(codes) + 1)] == codes
    assert sorted(line["request_id"] for line in lines) == sorted(sent)


def test_a_browser_on_an_allowed_origin_may_read_retry_after_and_the_rate_limit_headers(fake, keys_file):
    with InProcessProxy(fake.url, API_KEY_FILE=str(keys_file), CORS_ALLOW_ORIGINS="https://app.example") as p:
        for i in range(3):
            r = post(p.url, "sk-slow", f"cors-{i}", headers={"origin": "https://app.example"})
    assert r.status_code == 429
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {
        "retry-after",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-tokens",
        "x-request-id",
    } <= exposed
