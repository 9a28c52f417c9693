"""What the benchmarks in `bench/` share: canned OpenAI bodies, the nginx upstream that serves them, the
slow streaming upstream, wrk runs and their parsing, process start/stop, /proc sampling (CPU time, RSS),
a keep-alive HTTP client that times the first body byte, the machine description and table formatting.

Nothing here measures anything by itself: `upstream_clients.py` and `proxy_overhead.py` decide what to
run and how to read it. Every process is started in its own session (so a Ctrl-C reaches only the
benchmark, which then stops them all) and waited for by polling against a deadline, never by sleeping.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httptools

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROXY_CORE, LOAD_CORE = "0", "1"  # the contender gets core 0; wrk, nginx and the clients core 1
STARTUP_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """A failure with a message meant for the user (no traceback)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll `check` until it returns something truthy; BenchError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- the canned bodies --------------------------------------------------------------------------

MODEL = "bench-model"
COMPLETION_ID = "chatcmpl-bench-0123456789abcdef"

REQUEST_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something about proxies."}],
        "max_tokens": 64,
    }
).encode()
# Streams ask for the usage chunk, as most SDK users do: the canned streams carry one, so every
# contender relays the same bytes (the proxy would otherwise ask for it and strip it again).
SSE_REQUEST_BODY = REQUEST_BODY[:-1] + b', "stream": true, "stream_options": {"include_usage": true}}'

JSON_BODY = json.dumps(
    {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
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


def _chunk_event(delta: dict, finish: str | None = None) -> bytes:
    chunk = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def chat_stream_events(events: int) -> list[bytes]:
    """A vLLM-shaped chat stream of `events` data events plus `data: [DONE]`: the first carries the
    role and the first token, then one token per event, a finishing chunk and the usage chunk."""
    if events < 3:
        raise ValueError("a chat stream needs at least 3 events (first token, finish, usage)")
    tokens = events - 2
    out = [_chunk_event({"role": "assistant", "content": "tok0 "})]
    out += [_chunk_event({"content": f"tok{i} "}) for i in range(1, tokens)]
    out.append(_chunk_event({}, finish="stop"))
    usage = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 14, "total_tokens": 14 + tokens, "completion_tokens": tokens},
    }
    out.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


SSE_EVENTS = chat_stream_events(64)
SSE_BODY = b"".join(SSE_EVENTS)


# --- nginx: the fast upstream -------------------------------------------------------------------

# What `X-Bench-Body` selects on POST /v1/chat/completions (default: the JSON body). Routing on a
# header keeps one OpenAI path for every body, which routers that only relay OpenAI routes need.
BODY_HEADER = "X-Bench-Body"


def _temp_paths(prefix: Path) -> str:
    return "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def upstream_nginx_config(tmp: Path, port: int, slow_port: int, long_body: bytes | None = None) -> Path:
    """Write the canned bodies and an nginx config serving them on `port`; returns the config's path.

    - `POST /v1/chat/completions`: JSON_BODY; with `X-Bench-Body: sse` SSE_BODY, `long` `long_body`,
      `slow` the slow streaming upstream on `slow_port` (relayed unbuffered);
    - `POST /sse` (SSE_BODY) and `POST /sse-slow` (slow upstream): the same by path;
    - `GET /health`, `/version`, `/metrics`: what a proxy asks an engine at start and while it runs;
    - `GET /nginx-status`: stub_status (connections accepted).

    Bodies are static files (nginx's `return` takes at most 4 KiB); the static module answers POST
    with 405, which `error_page 405 =200 $uri` turns into the file.
    """
    prefix = tmp / "upstream-nginx"
    canned = prefix / "www" / "canned"
    canned.mkdir(parents=True)
    (canned / "json").write_bytes(JSON_BODY)
    (canned / "sse").write_bytes(SSE_BODY)
    (canned / "long").write_bytes(long_body or SSE_BODY)
    (canned / "version").write_bytes(b'{"version":"nginx-canned"}')
    (canned / "metrics").write_bytes(b"# canned upstream: no engine metrics\n")
    for path in (tmp, prefix, *prefix.rglob("*")):  # nginx's worker may run as `nobody`
        path.chmod(0o755 if path.is_dir() else 0o644)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 100000000;  # never close a pooled client connection mid-run
    etag off;
    open_file_cache max=16;
{_temp_paths(prefix)}
    map $http_x_bench_body $bench_target {{
        default /canned/json;
        sse /canned/sse;
        long /canned/long;
        slow /slow;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        root {prefix / "www"};
        error_page 405 =200 $uri;
        location = /v1/chat/completions {{ rewrite ^ $bench_target last; }}
        location = /sse {{ rewrite ^ /canned/sse last; }}
        location = /sse-slow {{ rewrite ^ /slow last; }}
        location = /canned/json {{ internal; default_type application/json; }}
        location = /canned/sse {{ internal; default_type text/event-stream; }}
        location = /canned/long {{ internal; default_type text/event-stream; }}
        location = /slow {{
            internal;
            proxy_pass http://{HOST}:{slow_port};
            proxy_http_version 1.1;
            proxy_buffering off;
        }}
        location = /health {{ return 200; }}
        location = /version {{ default_type application/json; try_files /canned/version =404; }}
        location = /metrics {{ default_type text/plain; try_files /canned/metrics =404; }}
        location = /nginx-status {{ stub_status; }}
    }}
}}
""")
    return conf


def proxy_nginx_config(tmp: Path, port: int, upstream_port: int) -> Path:
    """nginx as a plain reverse proxy on `port` in front of `upstream_port`: one worker, a keepalive
    pool to the upstream, no buffering of responses (streams are relayed as they arrive)."""
    prefix = tmp / "proxy-nginx"
    prefix.mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
{_temp_paths(prefix)}
    upstream engine {{
        server {HOST}:{upstream_port};
        keepalive 256;
        keepalive_requests 100000000;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    return conf


def nginx_argv(conf: Path, core: str) -> list[str]:
    prefix = conf.parent
    return ["taskset", "-c", core, "nginx", "-p", f"{prefix}/", "-e", str(prefix / "error.log"),
            "-c", str(conf), "-g", "daemon off;"]  # fmt: skip


def checkout(rev: str, tree: Path) -> None:
    """The proxy as committed at `rev`, in a worktree at `tree`, built as `make` builds it (its C
    extension, where that revision has one: without it the Python stand-in would be measured)."""
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), rev], cwd=REPO, check=True)
    build = tree / "scripts" / "build_ext.py"
    if build.exists():
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(build)], check=True)


def base_tree(ref: str, tmp: Path, cleanup: list[list[str]]) -> tuple[str, Path]:
    """`checkout` of `ref` under `tmp`: its short hash and the tree. The command that removes the
    worktree is added to `cleanup`, to run once the processes started from it have stopped."""
    rev = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = tmp / f"tree-{rev}"
    cleanup.append(["git", "worktree", "remove", "--force", str(tree)])
    checkout(rev, tree)
    return rev, tree


def uvicorn_argv(module: str, port: int) -> list[str]:
    """A minimal proxy of `bench/proxies/` (`module`), on core 0, under plain uvicorn (httptools,
    uvloop) configured as the proxy's own server is (app/server.py)."""
    return [
        "taskset", "-c", PROXY_CORE, sys.executable, "-m", "uvicorn", f"bench.proxies.{module}:app",
        "--host", HOST, "--port", str(port), "--http", "httptools", "--loop", "uvloop",
        "--no-access-log", "--log-level", "warning",
        "--no-server-header", "--no-date-header",  # as app/launcher.py: the upstream's headers pass through
    ]  # fmt: skip


def nginx_accepts(port: int) -> int:
    """How many connections the upstream nginx has accepted so far (stub_status)."""
    status = fetch(port, "/nginx-status", b"", method="GET").body.decode()
    return int(status.split("\n")[2].split()[0])


def slow_upstream_argv(port: int, events: int, first_pause_ms: float, token_delay_ms: float) -> list[str]:
    """`bench/slow_upstream.py` on the load core: a stream whose events arrive on a schedule."""
    return [
        "taskset", "-c", LOAD_CORE, sys.executable, str(REPO / "bench" / "slow_upstream.py"),
        "--port", str(port), "--events", str(events),
        "--first-pause-ms", f"{first_pause_ms:g}", "--token-delay-ms", f"{token_delay_ms:g}",
    ]  # fmt: skip


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """Starts the long-running processes (nginx, proxies, engines) and stops every one on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        timeout: float = STARTUP_TIMEOUT_S,
        ready_path: str | None = None,
    ) -> subprocess.Popen:
        """Start `argv` in its own session, output to `<logdir>/<name>.log`, and wait until `port`
        accepts connections (and, with `ready_path`, until `GET ready_path` answers 200)."""
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

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(
                    f"{name} exited with {proc.returncode} before it was ready:\n{tail(logfile)}"
                )
            if not port_open(port):
                return False
            return ready_path is None or http_status(port, ready_path) == 200

        try:
            wait_until(ready, timeout, f"{name} on port {port}", interval=0.05)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{tail(logfile)}") from None
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        """SIGTERM to the process's group (it leads its own session), SIGKILL after `timeout` s."""
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _killpg(proc.pid, signal.SIGKILL)  # anything of its group left behind
        if proc in self._procs:
            self._procs.remove(proc)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


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
                f"port {port} is in use ({exc}); another benchmark may still be running"
            ) from exc


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# --- /proc: CPU time and memory of a process tree -----------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set size of the processes, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


# --- a bare HTTP/1.1 client: body checks and time to first body byte ----------------------------


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    ttfb_s: float  # request sent -> first byte of the body
    total_s: float = 0.0  # request sent -> last byte of the body


def _request_bytes(
    port: int, method: str, path: str, body: bytes, headers: dict[str, str], close: bool
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Response:
    """httptools callbacks: one response, with the time its first body byte arrived."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.first_body: float | None = None
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        if self.first_body is None:
            self.first_body = time.perf_counter()
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class HttpClient:
    """One keep-alive connection, one request at a time; times the first byte of each body.

    Used for checks and for the TTFT figure, where a client holding its connection open (as the
    OpenAI SDKs do) is the realistic case.
    """

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Fetched:
        resp = _Response()
        parser = httptools.HttpResponseParser(resp)
        start = time.perf_counter()
        self.sock.sendall(_request_bytes(self.port, method, path, body, headers or {}, close=False))
        while not resp.done:
            data = self.sock.recv(1 << 16)
            if not data:
                raise BenchError(f"port {self.port}: connection closed mid-response ({path})")
            parser.feed_data(data)
        end = time.perf_counter()
        first = resp.first_body if resp.first_body is not None else end
        return Fetched(
            parser.get_status_code(), resp.headers, b"".join(resp.chunks), first - start, end - start
        )


def fetch(
    port: int, path: str, body: bytes, method: str = "POST", headers: dict[str, str] | None = None
) -> Fetched:
    """One request on a fresh connection (closed afterwards)."""
    with HttpClient(port, timeout=10) as client:
        return client.request(method, path, body, headers)


def http_status(port: int, path: str) -> int | None:
    try:
        return fetch(port, path, b"", method="GET").status
    except (OSError, BenchError, httptools.HttpParserError):
        return None


# --- wrk ----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk_script(
    tmp: Path,
    name: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    delay_ms: float | None = None,
    stop_after: int | None = None,
) -> Path:
    """A wrk Lua script POSTing `body` with `headers`. `delay_ms`: each connection waits that long
    between its requests (an open-ish load of about connections / delay). `stop_after`: after that
    many responses wrk stops sending and writes the file `<script>.done` (see `wrk_until`)."""
    script = tmp / f"{name}.lua"
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items()]
    lines.append(f"wrk.body = [==[{body.decode()}]==]")
    if delay_ms is not None:
        lines.append(f"function delay() return {delay_ms:g} end")
    if stop_after is not None:
        lines += [
            "local n = 0",
            "function response(status, headers, body)",
            "  n = n + 1",
            f"  if n == {stop_after} then",
            f'    local f = io.open("{script}.done", "w"); f:write(n); f:close()',
            "    wrk.thread:stop()",
            "  end",
            "end",
        ]
    script.write_text("\n".join(lines) + "\n")
    return script


def wrk_argv(
    port: int, path: str, script: Path, duration: float, connections: int, timeout_s: float = 5
) -> list[str]:
    return [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s",
        f"--timeout={timeout_s:g}s", "--latency", "-s", str(script), f"http://{HOST}:{port}{path}",
    ]  # fmt: skip


def run_wrk(port: int, path: str, script: Path, duration: float, connections: int) -> dict:
    argv = wrk_argv(port, path, script, duration, connections)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"wrk failed ({exc.returncode}): {exc.stderr or exc.stdout}") from exc
    return parse_wrk(done.stdout)


class BackgroundWrk:
    """wrk running while something else is measured; `stop()` interrupts it and returns its figures."""

    def __init__(self, port: int, path: str, script: Path, connections: int, max_duration: float) -> None:
        self.proc = subprocess.Popen(
            wrk_argv(port, path, script, max_duration, connections),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # wrk stops and prints what it measured so far
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return parse_wrk(out or err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wrk_until(
    port: int,
    path: str,
    script: Path,
    connections: int,
    timeout: float,
    during: Callable[[], None] | None = None,
) -> dict:
    """Run wrk with a `stop_after` script until it wrote its `.done` file; `during` is called between
    polls (e.g. to sample memory)."""
    marker = Path(f"{script}.done")
    marker.unlink(missing_ok=True)
    wrk = BackgroundWrk(port, path, script, connections, timeout + 5)
    try:

        def finished() -> bool:
            if during is not None:
                during()
            if wrk.proc.poll() is not None and not marker.exists():
                raise BenchError(f"wrk ended before its request count: {wrk.proc.communicate()}")
            return marker.exists()

        wait_until(finished, timeout, f"wrk to finish its requests on port {port}", interval=0.1)
        return wrk.stop()
    finally:
        wrk.kill()


def parse_wrk(out: str) -> dict:
    def latency_ms(percentile: str) -> float | None:
        found = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(found.group(1)) * _UNITS[found.group(2)] if found else None

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", out, re.M)
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
        "seconds": float(total.group(2)) * _UNITS[total.group(3)] / 1000,
        "p50_ms": latency_ms("50"),
        "p90_ms": latency_ms("90"),
        "p99_ms": latency_ms("99"),
        "errors": errors,
    }


# --- the machine --------------------------------------------------------------------------------


def _command_version(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def machine(packages: Iterable[str], extra_versions: dict[str, str] | None = None) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["nginx"] = _command_version(["nginx", "-v"], r"nginx/(\S+)")
    versions["wrk"] = _command_version(["wrk", "-v"], r"wrk (\S+)")
    versions.update(extra_versions or {})
    mem_kb = 0
    with contextlib.suppress(OSError, AttributeError):
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": list(os.getloadavg()),
        "versions": versions,
    }


def machine_line(info: dict) -> str:
    load = ", ".join(f"{v:.2f}" for v in info["load_average"])
    return (
        f"{info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']:g} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; load average at start {load}"
    )


def require_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        raise BenchError(
            f"missing: {', '.join(missing)}. Install with `apt-get install -y nginx wrk` "
            "(taskset is in util-linux)."
        )
    if not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs CPUs 0 and 1: the contender gets core 0, nginx and wrk core 1")


@contextlib.contextmanager
def session(prefix: str) -> Iterator[tuple[Path, Processes, list[list[str]]]]:
    """What a network benchmark's run stands on: the tools checked, this process (a client too) off
    the contenders' core, a temp dir, the processes it starts (`Processes`: stopped on exit, error
    and Ctrl-C) and a list of commands to run once they have stopped (`base_tree`'s worktrees).
    Yields (tmp, procs, cleanup)."""
    require_tools()
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    cleanup: list[list[str]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        stack.callback(lambda: [subprocess.run(c, cwd=REPO, check=False) for c in cleanup])
        yield tmp, stack.enter_context(Processes(tmp)), cleanup


# --- formatting ---------------------------------------------------------------------------------


def fmt_int(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def fmt_ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    sign = "+" if signed and value >= 0 else ""
    size = abs(value)
    digits = 3 if size < 1 else 2 if size < 10 else 1 if size < 100 else 0
    return f"{sign}{value:.{digits}f} ms"


def fmt_ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}×"


def fmt_mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f} MiB"


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """`align`: one of `l`/`r` per column (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "--:" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (header, rule, *rows))


# --- the command line ---------------------------------------------------------------------------


def _terminate(signum, frame) -> None:
    log("terminated; stopping every process started")
    raise SystemExit(128 + signum)  # unwinds through the cleanup like Ctrl-C does


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark's `main` with clean exits: every process it started is stopped (the context
    managers unwind) on error, Ctrl-C and SIGTERM."""
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
