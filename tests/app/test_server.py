"""The proxy's HTTP server (app/server.py), from a raw socket: the request-head bound, and the
HTTP layer's own refusals (400, 408, 431) each logged once and counted like any answer.

The engine behind is scripted (tests/raw_engine.py) and accepts heads of any size, as vLLM's own
uvicorn does with httptools: what the proxy refuses is the proxy's doing.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading

import httpx
import orjson
import pytest

from app.server import MAX_HEAD_BYTES, MAX_HEADERS, UVICORN_WRITTEN_FOR, uvicorn_version_warning
from inproc import InProcessProxy
from raw_engine import RawConn, RawEngineThread, ok
from stack import ROOT


async def answer(conn: RawConn) -> None:
    while (request := await conn.read_request()) is not None:
        await conn.send(ok(orjson.dumps({"headers": len(request.headers), "body": len(request.body)})))


@pytest.fixture(scope="module")
def raw():
    with RawEngineThread(answer) as engine:
        yield engine


@pytest.fixture(scope="module")
def proxy(raw):
    with InProcessProxy(raw.url, CLIENT_TIMEOUT=1) as p:
        yield p


def forwarded(raw) -> int:
    """Requests the engine got, less the proxy's own (its /metrics merges the engine's)."""
    return sum(1 for conn in raw.connections for r in conn.requests if r.target != "/metrics")


def exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send `data`, read until the server closes; what it answered."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def requests_counted(proxy, route: str, status: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    want = {"route": route, "model": "", "status": str(status)}
    for family in text_string_to_metric_families(httpx.get(proxy.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "vllm_api_requests_total" and sample.labels == want:
                return sample.value
    return 0.0


def refusal(data: bytes, status: int) -> dict:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), data[:200]
    assert b"content-type: application/json" in head and b"connection: close" in head
    return orjson.loads(body)["error"]


HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: %b\r\ncontent-type: application/json\r\n"
)


def test_a_head_over_the_bound_gets_431_as_soon_as_it_passes_it_and_nothing_is_forwarded(proxy, raw):
    before, counted = forwarded(raw), requests_counted(proxy, "/v1/chat/completions", 431)
    head = HEAD % b"big-head" + b"x-big: " + b"a" * MAX_HEAD_BYTES  # the head never ends
    error = refusal(exchange(proxy.port, head), 431)  # at once: not CLIENT_TIMEOUT's 408
    assert error["code"] == "request_header_fields_too_large" and str(MAX_HEAD_BYTES) in error["message"]
    assert forwarded(raw) == before
    line = proxy.logs.request("big-head")
    assert (line["status"], line["method"], line["path"]) == (431, "POST", "/v1/chat/completions")
    assert requests_counted(proxy, "/v1/chat/completions", 431) == counted + 1


def test_a_client_still_sending_its_oversized_head_reads_the_431_not_a_reset(proxy):
    """The client sends all of a 4 MiB header before it reads: the proxy, done with it after
    MAX_HEAD_BYTES, half-closes and drops the rest instead of closing on unread bytes (a reset,
    which can destroy the answer before the client reads it)."""
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.settimeout(10)
        sock.sendall(HEAD % b"still-sending" + b"x-big: " + b"b" * (4 << 20))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert refusal(data, 431)["code"] == "request_header_fields_too_large"


def test_a_request_line_over_the_bound_gets_431(proxy, raw):
    before = forwarded(raw)
    error = refusal(exchange(proxy.port, b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\n\r\n"), 431)
    assert error["code"] == "request_header_fields_too_large" and forwarded(raw) == before


def test_too_many_header_fields_get_431(proxy, raw):
    before = forwarded(raw)
    fields = b"".join(b"x-f%d: v\r\n" % i for i in range(MAX_HEADERS))
    data = exchange(proxy.port, HEAD % b"many-fields" + fields + b"content-length: 2\r\n\r\n{}")
    assert refusal(data, 431)["code"] == "request_header_fields_too_large"
    assert re.search(rb"x-request-id: many-fields\r\n", data)
    assert forwarded(raw) == before
    assert proxy.logs.request("many-fields")["status"] == 431


@pytest.mark.parametrize("size", [MAX_HEAD_BYTES - 200, 1 << 20], ids=["head-near-the-bound", "big-body"])
def test_heads_within_the_bound_pass_whatever_arrives_with_them(proxy, raw, size):
    """A head just under the bound, and a small head sent in one piece with a 1 MiB body (the
    first read holds far more than the bound: only the head counts)."""
    pad = b"x-pad: " + b"p" * (size - 400) + b"\r\n" if size < MAX_HEAD_BYTES else b""
    body = b'{"model":"m","prompt":"' + b"z" * (size if not pad else 10) + b'"}'
    request = HEAD % b"within" + pad + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
    assert len(request.split(b"\r\n\r\n")[0]) < MAX_HEAD_BYTES
    head, _, answer_body = exchange(proxy.port, request).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b'"body":%d' % len(body) in answer_body


def test_heads_over_the_bound_leave_the_proxys_memory_flat(proxy):
    """The issue's case: four connections each sending a 16 MiB header. Before the bound, the
    proxy gathered every byte (64 to 191 MiB); now each is cut after MAX_HEAD_BYTES."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    header = HEAD % b"huge" + b"x-huge: " + b"h" * (16 << 20)
    done = threading.Barrier(5, timeout=60)
    socks = []

    def send() -> None:
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        socks.append(sock)
        try:
            sock.sendall(header)
        except OSError:
            pass
        done.wait()

    before = rss()
    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    done.wait()
    grown = rss() - before  # measured with the connections still open (the head never ended)
    for sock in socks:
        sock.close()
    for t in threads:
        t.join(10)
    assert grown < 24 << 20, f"{grown / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "raw_request,status,error",
    [
        (b"GARBAGE\r\n\r\n", 400, "invalid HTTP request"),
        (b"x" * 100_000, 400, "invalid HTTP request"),  # unparsable, and past the head's bound
        (
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-request-id: bad-header\r\nx-bad: a\x01b\r\n\r\n",
            400,
            "invalid HTTP request",
        ),
        (
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-request-id: slow-head\r\n",
            408,
            "not received in time",
        ),
    ],
    ids=["garbage", "oversized-garbage", "bad-header-value", "slow-head"],
)
def test_the_http_layers_refusals_are_logged_once_and_counted(proxy, raw_request, status, error):
    route = "/v1/completions" if b"/v1/completions" in raw_request else "other"
    counted = requests_counted(proxy, route, status)
    others = {s: requests_counted(proxy, route, s) for s in (400, 408, 431) if s != status}
    data = exchange(proxy.port, raw_request)
    assert refusal(data, status)["code"] == ("request_timeout" if status == 408 else "invalid_http")
    rid = re.search(rb"x-request-id: (\S+)\r\n", data).group(1).decode()  # the line's id, sent back
    line = proxy.logs.request(rid)
    assert line["status"] == status and error in line["error"]
    if route != "other":
        assert (line["method"], line["path"], line["request_id"]) == ("POST", route, rid)
    assert len([r for r in proxy.logs.records() if r.get("request_id") == rid]) == 1
    assert requests_counted(proxy, route, status) == counted + 1
    assert {s: requests_counted(proxy, route, s) for s in others} == others  # refused once, not twice


def test_a_connection_that_never_sent_a_byte_is_closed_without_a_request_line(proxy):
    before = len(proxy.logs.records())
    assert exchange(proxy.port, b"").startswith(b"HTTP/1.1 408")
    # (a line of an earlier test's request may still land meanwhile: only a 408 would be this one's)
    assert not [
        r for r in proxy.logs.records()[before:] if r.get("event") == "request" and r.get("status") == 408
    ]


def test_a_body_with_broken_chunking_gets_400_logged_once_as_the_apps_request(proxy, raw):
    before = forwarded(raw)
    data = (
        HEAD % b"bad-chunks"
        + b'transfer-encoding: chunked\r\n\r\n5\r\n{"mod\r\nzz\r\n'  # a chunk size that is not hex
    )
    assert refusal(exchange(proxy.port, data), 400)["code"] == "invalid_http"
    line = proxy.logs.request("bad-chunks")
    assert (line["status"], line["error"]) == (400, "invalid HTTP in the request body")
    assert len([r for r in proxy.logs.records() if r.get("request_id") == "bad-chunks"]) == 1
    assert forwarded(raw) == before


# --- what app/server.py uses of uvicorn -----------------------------------------------


def test_the_installed_uvicorn_is_one_the_server_was_written_for():
    import uvicorn

    assert uvicorn_version_warning(uvicorn.__version__) is None


@pytest.mark.parametrize("version", ["0.29.1", "0.55.0", "1.0.0", "dev"])
def test_another_uvicorn_is_named_in_a_warning_with_the_range(version, monkeypatch, caplog):
    import uvicorn

    from app.server import server_config

    (lo_major, lo_minor), (hi_major, hi_minor) = UVICORN_WRITTEN_FOR
    message = uvicorn_version_warning(version)
    assert message is not None and f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}" in message
    assert version in message
    monkeypatch.setattr(uvicorn, "__version__", version)
    with caplog.at_level("WARNING", logger="app.server"):
        server_config(lambda scope, receive, send: None, "127.0.0.1", 0, 1)
    assert any(version in r.getMessage() and "written for" in r.getMessage() for r in caplog.records)


def test_a_uvicorn_without_the_internals_used_fails_at_import_naming_them():
    code = (
        "import uvicorn.server as m\n"
        "def init(self):\n"
        "    self.total_requests = 0\n"
        "    self.connections = set()\n"
        "    self.default_headers = []\n"
        "m.ServerState.__init__ = init\n"
        "import app.server\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "ServerState.tasks" in run.stderr and "written for uvicorn" in run.stderr
