"""Which HTTP client should the proxy use to reach the engine? Measures the candidates side by side.

The proxy relays every request to the engine through one pooled client (`app/proxy/upstream.py`). On a
lean server side that client is most of the proxy's CPU cost, so this benchmark runs one minimal proxy
per client, all of the same shape (`bench/proxies/<client>.py`: a raw ASGI app under uvicorn with
httptools and uvloop, one worker, no access log; it reads the request body, forwards it with the
headers, and relays status, headers and body chunks back as they arrive), in front of the same upstream:

- upstream: nginx on loopback answering `POST /v1/chat/completions` with a canned chat completion
  (~700 bytes of JSON) and `POST /sse` with a canned stream (64 chunk events + `data: [DONE]`,
  `text/event-stream`), and relaying `/sse-slow` from a tiny in-process server that sends the first
  event of the same stream at once and the rest only after a pause (`--slow-pause-ms`, 50 ms);
- load: wrk, `-t1 -c32 -d5s --latency` by default, POSTing a chat request; nginx and wrk are pinned to
  core 1, the proxy under test to core 0, so the proxy gets one whole core;
- contenders: `direct` (wrk straight to nginx, no proxy: the ceiling, though a low one, as nginx
  shares core 1 with wrk there), `aiohttp`, `httpx`, `httpx2`, `pyreqwest` (with a 1-byte streamed
  read buffer) and `pyreqwest-readahead` (the same with pyreqwest's default 64 KiB read-ahead, kept as
  the control that the TTFB column must catch).

How to read the table:

- `json req/s`, `sse req/s`: throughput at the given concurrency; the proxy's core is saturated, so
  this is the inverse of the CPU cost per relayed request. `× aiohttp` divides by aiohttp's figure for
  the same body kind (aiohttp is the client the proxy uses today).
- `p50`, `p99`: wrk's latency percentiles under that load (queueing included).
- `TTFB`: median, over `--ttfb-requests` sequential requests with no other load, of the time from
  sending `POST /sse-slow` to receiving the first byte of the response *body* (the first event). A
  proxy that streams shows ~1 ms; one that reads ahead before relaying shows the upstream's pause (50
  ms) or more. Throughput alone cannot see that defect, which is why this column exists.
- `nginx conns`: connections nginx accepted during the wrk runs (warm-up, json, sse). `direct` opens
  one per wrk connection per run (3 × `--connections`); a proxy that pools well opens about
  `--connections` once and reuses them, far more means its pool closes and reopens connections.
- `errors`: wrk's socket errors and non-2xx responses. Anything but 0 makes the row's req/s suspect.

Each proxy's relayed bodies are checked byte for byte against nginx's before it is measured.

    .venv/bin/python bench/upstream_clients.py [--duration 5] [--connections 32] [--only aiohttp,httpx]

Prints the machine and the table (Markdown) to stdout, progress to stderr, and writes the same data to
`bench/results/upstream_clients.json`. Uses ports 19000-19010. Needs nginx, wrk and taskset
(`apt-get install -y nginx wrk`) and at least 2 CPUs. Every process it starts is stopped on exit,
on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
NGINX_PORT = 19000
SLOW_PORT = 19001
PROXY_PORTS = range(19002, 19011)
PROXY_CORE, LOAD_CORE = "0", "1"
STARTUP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Contender:
    name: str
    module: str | None  # bench.proxies.<module>; None for `direct`
    package: str | None  # what must be importable
    env: dict[str, str] = field(default_factory=dict)


CONTENDERS = [
    Contender("direct", None, None),
    Contender("aiohttp", "aiohttp", "aiohttp"),
    Contender("httpx", "httpx", "httpx"),
    Contender("httpx2", "httpx2", "httpx2"),
    Contender("pyreqwest", "pyreqwest", "pyreqwest"),
    Contender(
        "pyreqwest-readahead",
        "pyreqwest",
        "pyreqwest",
        {"BENCH_PYREQWEST_READ_BUFFER_LIMIT": str(64 * 1024)},
    ),
]
BASELINE = "aiohttp"
VERSIONED_PACKAGES = ("aiohttp", "httpx", "httpx2", "pyreqwest", "uvicorn", "uvloop", "httptools")


class BenchError(Exception):
    """A failure with a message meant for the user (no traceback)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the canned bodies --------------------------------------------------------------------------

REQUEST_BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "Say something about proxies."}],
        "max_tokens": 64,
    }
).encode()
SSE_REQUEST_BODY = REQUEST_BODY[:-1] + b', "stream": true}'

JSON_BODY = json.dumps(
    {
        "id": "chatcmpl-bench-0123456789abcdef",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": (
                        "A reverse proxy relays each request to the engine and streams the answer back. "
                        "Its cost per request is mostly the upstream HTTP client: connection pooling, "
                        "header handling and body relaying, all on one event loop. "
                        "This canned answer only pads the body to a realistic size, about the length of "
                        "a short reply from a chat model."
                    ),
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 14, "total_tokens": 78, "completion_tokens": 64},
        "system_fingerprint": None,
    }
).encode()


def _sse_event(i: int) -> bytes:
    chunk = {
        "id": "chatcmpl-bench-0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


SSE_EVENTS = [_sse_event(i) for i in range(64)] + [b"data: [DONE]\n\n"]
SSE_BODY = b"".join(SSE_EVENTS)


# --- nginx --------------------------------------------------------------------------------------


def nginx_config(tmp: Path) -> str:
    """Serves JSON_BODY and SSE_BODY as static files (nginx's `return` takes at most 4 KiB); the
    static module answers POST with 405, which `error_page 405 =200 $uri` turns into the file."""
    www = tmp / "www"
    (www / "v1" / "chat").mkdir(parents=True)
    (www / "v1" / "chat" / "completions").write_bytes(JSON_BODY)
    (www / "sse").write_bytes(SSE_BODY)
    for path in (tmp, *www.rglob("*"), www):  # nginx's worker may run as `nobody`
        path.chmod(0o755 if path.is_dir() else 0o644)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 100000000;  # never close a pooled client connection mid-run
    etag off;
    open_file_cache max=16;
{temp_paths}
    server {{
        listen {HOST}:{NGINX_PORT};
        root {www};
        error_page 405 =200 $uri;
        location = /v1/chat/completions {{
            default_type application/json;
        }}
        location = /sse {{
            default_type text/event-stream;
        }}
        location = /nginx-status {{
            stub_status;
        }}
        location = /sse-slow {{
            proxy_pass http://{HOST}:{SLOW_PORT};
            proxy_http_version 1.1;
            proxy_buffering off;
        }}
    }}
}}
"""


# --- the slow SSE upstream behind /sse-slow -----------------------------------------------------


class SlowSSEServer:
    """Answers every request with SSE_EVENTS, chunked: the first event at once, the rest after `pause`.

    Runs its own event loop in a daemon thread of this process; it only serves the sequential TTFB
    requests, never the wrk load.
    """

    def __init__(self, port: int, pause: float) -> None:
        self.port = port
        self.pause = pause
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="slow-sse", daemon=True)

    def __enter__(self) -> SlowSSEServer:
        self._thread.start()
        self._ready.wait(STARTUP_TIMEOUT_S)
        if self._error is not None:
            raise BenchError(f"slow SSE server on port {self.port}: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, HOST, self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def chunk(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data)

        try:
            while True:  # keep-alive: one response per request until the peer closes
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk(SSE_EVENTS[0])
                )
                await writer.drain()
                await asyncio.sleep(self.pause)
                writer.write(b"".join(chunk(e) for e in SSE_EVENTS[1:]) + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """Starts the long-running processes (nginx, proxies) and stops every one of them on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)

    def start(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start `argv` (in its own session, so a Ctrl-C reaches only us) and wait until it listens."""
        ensure_port_free(port)
        logfile = self.logdir / f"{name}.log"
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not port_open(port):
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode} before listening:\n{tail(logfile)}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{name} not listening on port {port} after {STARTUP_TIMEOUT_S:.0f} s:\n{tail(logfile)}"
                )
            time.sleep(0.02)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def ensure_port_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise BenchError(
                f"port {port} is in use ({exc}); this benchmark needs ports 19000-19010"
            ) from exc


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- a bare HTTP/1.1 client: body checks and time to first body byte ----------------------------


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    ttfb_s: float  # request sent -> first byte of the body


def fetch(port: int, path: str, body: bytes, method: str = "POST") -> Fetched:
    """Send `body` on a fresh connection (`Connection: close`), read the whole answer."""
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    buf, ttfb = b"", None
    start = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request)
        while data := sock.recv(65536):
            buf += data
            if ttfb is None and (end := buf.find(b"\r\n\r\n")) != -1 and len(buf) > end + 4:
                ttfb = time.perf_counter() - start
    head, _, raw = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raw = dechunk(raw)
    return Fetched(int(status_line.split()[1]), headers, raw, ttfb if ttfb is not None else float("nan"))


def dechunk(raw: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2


def check_bodies(name: str, port: int) -> None:
    """The proxy must relay nginx's answers byte for byte, with their content type."""
    for path, request, expected, ctype in (
        ("/v1/chat/completions", REQUEST_BODY, JSON_BODY, "application/json"),
        ("/sse", SSE_REQUEST_BODY, SSE_BODY, "text/event-stream"),
        ("/sse-slow", SSE_REQUEST_BODY, SSE_BODY, "text/event-stream"),
    ):
        got = fetch(port, path, request)
        if (
            got.status != 200
            or got.body != expected
            or not got.headers.get("content-type", "").startswith(ctype)
        ):
            raise BenchError(
                f"{name}: POST {path} relayed status {got.status}, content-type "
                f"{got.headers.get('content-type')!r}, {len(got.body)} body bytes (expected 200, {ctype}, "
                f"{len(expected)} bytes): {got.body[:200]!r}"
            )


def nginx_accepts() -> int:
    """How many connections nginx has accepted so far (stub_status)."""
    status = fetch(NGINX_PORT, "/nginx-status", b"", method="GET").body.decode()
    return int(status.split("\n")[2].split()[0])


def measure_ttfb(port: int, requests: int) -> dict:
    ttfbs, totals = [], []
    for _ in range(requests):
        start = time.perf_counter()
        got = fetch(port, "/sse-slow", SSE_REQUEST_BODY)
        totals.append(time.perf_counter() - start)
        if got.body != SSE_BODY:
            raise BenchError(f"/sse-slow on port {port}: truncated or altered stream ({len(got.body)} bytes)")
        ttfbs.append(got.ttfb_s)
    return {
        "ttfb_median_ms": statistics.median(ttfbs) * 1000,
        "ttfb_max_ms": max(ttfbs) * 1000,
        "total_median_ms": statistics.median(totals) * 1000,
        "requests": requests,
    }


# --- wrk ----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk_script(tmp: Path, name: str, body: bytes) -> Path:
    script = tmp / f"{name}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{body.decode()}]==]\n"
    )
    return script


def run_wrk(port: int, path: str, script: Path, duration: int, connections: int) -> dict:
    argv = [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
        "--latency", "-s", str(script), f"http://{HOST}:{port}{path}",
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"wrk failed ({exc.returncode}): {exc.stderr or exc.stdout}") from exc
    return parse_wrk(done.stdout)


def parse_wrk(out: str) -> dict:
    def latency_ms(percentile: str) -> float | None:
        found = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(found.group(1)) * _UNITS[found.group(2)] if found else None

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in", out, re.M)
    if not rps or not total:
        raise BenchError(f"cannot read wrk's output:\n{out}")
    errors = {}
    if sock := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors = {
            k: int(v)
            for k, v in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True)
            if int(v)
        }
    if non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors["non-2xx"] = int(non2xx.group(1))
    return {
        "requests_per_s": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": latency_ms("50"),
        "p90_ms": latency_ms("90"),
        "p99_ms": latency_ms("99"),
        "errors": errors,
    }


# --- the run ------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    versions["nginx"] = nginx.split("/")[-1]
    versions["wrk"] = wrk.split()[1] if len(wrk.split()) > 1 else wrk
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


def require_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        raise BenchError(
            f"missing: {', '.join(missing)}. Install with `apt-get install -y nginx wrk` "
            "(taskset is in util-linux)."
        )
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs CPUs 0 and 1: the proxy gets core 0, nginx and wrk core 1")


def uvicorn_argv(module: str, port: int) -> list[str]:
    return [
        "taskset", "-c", PROXY_CORE, sys.executable, "-m", "uvicorn", f"bench.proxies.{module}:app",
        "--host", HOST, "--port", str(port), "--http", "httptools", "--loop", "uvloop",
        "--no-access-log", "--log-level", "warning",
        "--no-server-header", "--no-date-header",  # as app/launcher.py: the upstream's headers pass through
    ]  # fmt: skip


def bench_one(contender: Contender, port: int, procs: Processes, scripts: dict, args) -> dict:
    proc = None
    if contender.module is not None:
        env = {"BENCH_UPSTREAM": f"http://{HOST}:{NGINX_PORT}", **contender.env}
        proc = procs.start(contender.name, uvicorn_argv(contender.module, port), port, env)
    try:
        check_bodies(contender.name, port)
        accepted = nginx_accepts()
        if args.warmup > 0:
            run_wrk(port, "/v1/chat/completions", scripts["json"], args.warmup, args.connections)
        result = {
            "json": run_wrk(port, "/v1/chat/completions", scripts["json"], args.duration, args.connections),
            "sse": run_wrk(port, "/sse", scripts["sse"], args.duration, args.connections),
        }
        # Connections nginx accepted during the wrk runs, the stub_status request itself excluded.
        result["upstream_connections"] = nginx_accepts() - accepted - 1
        result["ttfb"] = measure_ttfb(port, args.ttfb_requests)
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{contender.name} died during the run (exit {proc.returncode})")
        return result
    finally:
        if proc is not None:
            procs.stop(proc)


def _fmt_rps(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _fmt_ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}×"


def _fmt_errors(result: dict) -> str:
    parts = [
        f"{kind} {name} {count}" for kind in ("json", "sse") for name, count in result[kind]["errors"].items()
    ]
    return ", ".join(parts) or "0"


def table(results: dict[str, dict]) -> str:
    base = results.get(BASELINE)
    base_json = base["json"]["requests_per_s"] if base and "json" in base else None
    base_sse = base["sse"]["requests_per_s"] if base and "sse" in base else None
    rows = [
        "| contender | json req/s | × aiohttp | json p50 | json p99 | sse req/s | × aiohttp | sse p50 | sse p99 "
        "| TTFB median | nginx conns | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, res in results.items():
        if "skipped" in res:
            rows.append(f"| {name} | {res['skipped']} |" + " |" * 10)
            continue
        j, s = res["json"], res["sse"]
        rows.append(
            f"| {name} | {_fmt_rps(j['requests_per_s'])} | {_fmt_ratio(j['requests_per_s'], base_json)} "
            f"| {_fmt_ms(j['p50_ms'])} | {_fmt_ms(j['p99_ms'])} "
            f"| {_fmt_rps(s['requests_per_s'])} | {_fmt_ratio(s['requests_per_s'], base_sse)} "
            f"| {_fmt_ms(s['p50_ms'])} | {_fmt_ms(s['p99_ms'])} "
            f"| {_fmt_ms(res['ttfb']['ttfb_median_ms'])} | {res['upstream_connections']} | {_fmt_errors(res)} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [c.name for c in CONTENDERS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load per body kind (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of wrk load before measuring (1; 0: none)"
    )
    parser.add_argument("--ttfb-requests", type=int, default=50, help="sequential /sse-slow requests (50)")
    parser.add_argument(
        "--slow-pause-ms", type=float, default=50.0, help="pause after the first slow event (50)"
    )
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(names)}")
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "results" / "upstream_clients.json",
        help="JSON results",
    )
    args = parser.parse_args(argv)
    args.contenders = CONTENDERS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        if unknown := sorted(set(wanted) - set(names)):
            parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        args.contenders = [c for c in CONTENDERS if c.name in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools()
    info = machine()
    print("## Upstream HTTP clients: one proxy core, wrk and nginx on the other\n")
    print(f"- machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}, Python {info['python']}")
    print("- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(
        f"- load: wrk -t1 -c{args.connections} -d{args.duration:g}s (+{args.warmup:g} s warm-up), POST; "
        f"TTFB: median of {args.ttfb_requests} sequential /sse-slow requests "
        f"(upstream pauses {args.slow_pause_ms:g} ms after the first event)\n",
        flush=True,
    )

    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-upstream-")))
        procs = stack.enter_context(Processes(tmp))
        stack.enter_context(SlowSSEServer(SLOW_PORT, args.slow_pause_ms / 1000))
        (tmp / "nginx.conf").write_text(nginx_config(tmp))
        nginx_argv = ["taskset", "-c", LOAD_CORE, "nginx", "-p", f"{tmp}/", "-e", str(tmp / "error.log"),
                      "-c", "nginx.conf", "-g", "daemon off;"]  # fmt: skip
        procs.start("nginx", nginx_argv, NGINX_PORT)
        scripts = {
            "json": wrk_script(tmp, "json", REQUEST_BODY),
            "sse": wrk_script(tmp, "sse", SSE_REQUEST_BODY),
        }

        ports = iter(PROXY_PORTS)
        for contender in args.contenders:
            port = NGINX_PORT if contender.module is None else next(ports)
            if contender.package and importlib.util.find_spec(contender.package) is None:
                log(f"{contender.name}: skipped, {contender.package} is not installed")
                results[contender.name] = {"skipped": f"{contender.package} not installed (pip install it)"}
                continue
            log(f"{contender.name}: measuring ...")
            results[contender.name] = bench_one(contender, port, procs, scripts, args)
            res = results[contender.name]
            log(
                f"{contender.name}: json {res['json']['requests_per_s']:,.0f} req/s, "
                f"sse {res['sse']['requests_per_s']:,.0f} req/s, TTFB {res['ttfb']['ttfb_median_ms']:.2f} ms"
            )

    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("contenders", "output", "only")}
    settings["contenders"] = [asdict(c) for c in args.contenders]
    payload = {"machine": info, "settings": settings, "results": results}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"results written to {args.output}")
    return 0


def _terminate(signum, frame) -> None:
    log("terminated; stopping every process started")
    raise SystemExit(128 + signum)  # unwinds through the cleanup like Ctrl-C does


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted; every process started was stopped")
        sys.exit(130)
