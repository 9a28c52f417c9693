"""Several proxy processes serving one port, as one service (PROXY_WORKERS > 1).

    launcher (app/launcher.py)          the supervisor: engine, signals, drain, health phase
      ├─ worker 0 (python -m app.worker)  uvicorn + the app on its own socket of PORT; writes the
      │                                    dashboard's history, runs the batch runner
      ├─ worker 1 ...                     uvicorn + the app
      └─ engine

How the pieces stay one service:

- **The port.** The launcher binds one listening socket per worker, all on PORT with SO_REUSEPORT
  (the kernel spreads new connections evenly over them), and hands each worker its own. It keeps
  them open: while a worker restarts, the connections the kernel gave its socket wait in its
  backlog instead of being refused. Likewise for PORT_HEALTH.
- **State** (`SharedState`): a small mmap'd file the launcher writes and the workers read: the
  engine's phase and the drain grace (what `/health`, `/ping` and every request check), what
  `/info` shows, and per worker its pid, whether it is ready and its requests in flight (summed
  for `/health`, the batch runner and the launcher's drain).
- **Metrics**: each worker keeps its numbers in a file of its own (`app.promlite.SharedValues`);
  whichever worker is scraped exposes the sum of all. A restarted worker takes its file back, so
  counters never go backwards and nothing is counted twice. The `process_*` families are left
  out: one process's figures would change with the worker that happens to be scraped (as
  prometheus_client's own multiprocess mode does).
- **Logs**: workers write their JSON lines to a pipe; the launcher writes them out whole lines at a
  time with its own (one stream, no line cut by another, LOG_FILE rotated by one writer).
- **Drain**: SIGTERM reaches the launcher; the phase it publishes makes every worker refuse new
  requests after the grace; it waits for the workers' in-flight sum to reach 0, then tells each to
  stop (its control pipe), which lets uvicorn finish.
- **A worker that dies** is restarted by the launcher under the same index (logged as an error);
  more than `RESTARTS` deaths within `RESTART_WINDOW_S` stop the container (exit 1), as the engine
  dying does. Workers ignore SIGTERM and SIGINT: only the launcher stops them (a signal sent to the
  whole process group must not cut their streams before the drain), and a launcher that is gone
  closes their control pipe, which stops them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from app.engines.base import split_extra_args
from app.runtime import Phase, Runtime

MAX_WORKERS = 64
RESTARTS = 5
RESTART_WINDOW_S = 60.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
"""A stopping worker's own graceful shutdown is 5 s (app/server.py); then it is killed."""

_PHASES = list(Phase)
_READY, _DRAINING = _PHASES.index(Phase.READY), _PHASES.index(Phase.DRAINING)

# The control block, as int64s: header, then one slot per worker, then the JSON of what /info shows.
_PHASE, _GRACE, _SEQ, _LEN = 1, 2, 3, 4
_HEADER = 8
_SLOT = 8
_PID, _STATE, _INFLIGHT = 0, 1, 2
STARTING, READY = 0, 1
_META_AT = (_HEADER + _SLOT * MAX_WORKERS) * 8
_META_MAX = 64 * 1024
_SIZE = _META_AT + _META_MAX
_META_FIELDS = (
    "detail", "started_at", "engine_version", "engine_command", "model_path", "gpus", "profile", "startup",
    "caches",
)  # fmt: skip
_LORA_FILE = "lora-plan.pickle"
"""The LoRA start plan (dataclasses, not JSON): a file beside the control block, in the launcher's
0700 directory, written before the engine starts."""


def worker_count(settings: Any) -> int:
    """PROXY_WORKERS, `auto` resolved: the engine's API-server processes (vLLM's
    `--api-server-count`/`-asc` in ENGINE_EXTRA_ARGS), else 1."""
    if settings.PROXY_WORKERS != "auto":
        return int(settings.PROXY_WORKERS)
    if settings.ENGINE != "vllm":
        return 1
    words = split_extra_args(settings.ENGINE_EXTRA_ARGS)
    count = 1
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag in ("--api-server-count", "-asc"):
            value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
            if value.isdigit():
                count = int(value)
    return max(1, min(count, MAX_WORKERS))


# --- the state the launcher shares --------------------------------------------------------------


class SharedState:
    """The control block: written by the launcher (phase, grace, what /info shows), read by every
    worker; each worker writes its own slot (pid, state, in flight)."""

    FILE = "state"

    def __init__(self, directory: Path, mm: mmap.mmap) -> None:
        self.dir = directory
        self._mm = mm
        self.q = memoryview(mm).cast("q")
        self._meta_seq = -1
        self._meta: dict[str, Any] = {}
        self._lora_stamp: int | None = None
        self._lora_plan: Any = None

    @classmethod
    def create(cls) -> SharedState:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        directory = Path(tempfile.mkdtemp(prefix="vllm-api-workers-", dir=base))
        path = directory / cls.FILE
        with open(path, "wb") as fh:
            fh.truncate(_SIZE)
        return cls.attach(directory)

    @classmethod
    def attach(cls, directory: str | Path) -> SharedState:
        directory = Path(directory)
        with open(directory / cls.FILE, "r+b") as fh:
            mm = mmap.mmap(fh.fileno(), _SIZE)
        return cls(directory, mm)

    def close(self, remove: bool = False) -> None:
        self.q.release()
        self._mm.close()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- the launcher's side --------------------------------------------------------------------

    def publish_lora(self, plan: Any) -> None:
        path = self.dir / _LORA_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(plan))
        tmp.replace(path)  # a worker reads the old plan or the new one, never half of one

    def lora(self) -> Any:
        """The launcher's LoRA plan, once it has one (None before)."""
        path = self.dir / _LORA_FILE
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if stamp != self._lora_stamp:
            self._lora_plan, self._lora_stamp = pickle.loads(path.read_bytes()), stamp
        return self._lora_plan

    def publish(self, runtime: Runtime) -> None:
        q = self.q
        meta = orjson.dumps({name: getattr(runtime, name) for name in _META_FIELDS}, default=str)
        if len(meta) > _META_MAX:  # an enormous engine command: keep what matters
            meta = orjson.dumps({"detail": runtime.detail[:1000], "started_at": runtime.started_at})
        q[_SEQ] += 1  # odd: being written
        self._mm[_META_AT : _META_AT + len(meta)] = meta
        q[_LEN] = len(meta)
        q[_PHASE] = _PHASES.index(runtime.phase)
        q[_GRACE] = int(runtime.grace)
        q[_SEQ] += 1

    def slot(self, index: int) -> int:
        return _HEADER + _SLOT * index

    def reset_slot(self, index: int) -> None:
        at = self.slot(index)
        self.q[at + _STATE] = STARTING
        self.q[at + _INFLIGHT] = 0
        self.q[at + _PID] = 0

    def state(self, index: int) -> int:
        return self.q[self.slot(index) + _STATE]

    def inflight(self, count: int) -> int:
        q = self.q
        return sum(q[_HEADER + _SLOT * i + _INFLIGHT] for i in range(count))

    def pids(self, count: int) -> list[int]:
        return [pid for i in range(count) if (pid := self.q[_HEADER + _SLOT * i + _PID])]

    # --- the workers' side ----------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """What the launcher last published (cached until it publishes again)."""
        q = self.q
        for _ in range(100):
            seq = q[_SEQ]
            if seq == self._meta_seq:
                return self._meta
            if seq % 2:  # being written this instant
                time.sleep(0.0001)
                continue
            raw = bytes(self._mm[_META_AT : _META_AT + q[_LEN]])
            if q[_SEQ] == seq:
                self._meta = orjson.loads(raw) if raw else {}
                self._meta_seq = seq
                return self._meta
        return self._meta


class PublishedRuntime(Runtime):
    """The launcher's Runtime when it runs workers: every change is published to them, and what is
    in flight is theirs, summed."""

    _PUBLISHED = frozenset({"phase", "grace", *_META_FIELDS})

    def __init__(self, shared: SharedState, count: int) -> None:
        object.__setattr__(self, "_shared", None)
        super().__init__()
        object.__setattr__(self, "_count", count)
        object.__setattr__(self, "_shared", shared)
        shared.publish(self)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if self._shared is None:
            return
        if name in self._PUBLISHED:
            self._shared.publish(self)
        elif name == "lora" and value is not None:
            self._shared.publish_lora(value)

    @property  # type: ignore[override]
    def inflight(self) -> int:
        shared = self._shared
        return shared.inflight(self._count) if shared is not None else 0

    @inflight.setter
    def inflight(self, _: int) -> None:
        pass  # counted by the workers

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.inflight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


class WorkerRuntime:
    """A worker's view of the launcher's Runtime (same attributes, read from the shared state);
    its own requests in flight are counted in its slot."""

    def __init__(self, shared: SharedState, index: int, count: int) -> None:
        self._shared = shared
        self._q = shared.q
        self._count = count
        self._mine = shared.slot(index) + _INFLIGHT
        self.reloaders: list[Any] = []
        """Called on SIGHUP, which the launcher forwards to every worker (app/worker.py)."""

    @property
    def lora(self) -> Any:
        return self._shared.lora()

    @property
    def phase(self) -> Phase:
        return _PHASES[self._q[_PHASE]]

    @property
    def grace(self) -> bool:
        return bool(self._q[_GRACE])

    @property
    def accepting(self) -> bool:
        phase = self._q[_PHASE]
        return phase == _READY or (phase == _DRAINING and bool(self._q[_GRACE]))

    @property
    def inflight(self) -> int:
        return self._shared.inflight(self._count)

    def request_started(self) -> None:
        self._q[self._mine] += 1

    def request_finished(self) -> None:
        self._q[self._mine] -= 1

    def __getattr__(self, name: str) -> Any:  # detail, started_at, engine_version, ...
        if name in _META_FIELDS:
            meta = self._shared.meta()
            return meta.get(name, time.time() if name == "started_at" else None)
        raise AttributeError(name)

    @property
    def engine_command(self) -> list[str]:
        return self._shared.meta().get("engine_command") or []

    @property
    def detail(self) -> str:
        return self._shared.meta().get("detail") or self.phase.value


# --- in a worker: who am I ----------------------------------------------------------------------

_current: tuple[int, int] | None = None
"""(index, count) in a worker process; None in a single process."""


def set_current(index: int, count: int) -> None:
    global _current
    _current = (index, count)


def current() -> tuple[int, int] | None:
    return _current


def is_first() -> bool:
    """The one process that writes the dashboard's history and runs the batch runner: the only
    process, or worker 0."""
    return _current is None or _current[0] == 0


# --- the launcher's side: sockets, processes, their logs ----------------------------------------


def bind_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one port (SO_REUSEPORT). OSError if the port is taken, also by
    another process's SO_REUSEPORT sockets (which would otherwise share it silently)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]  # port 0: one the system picked, for all of them
    out: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class LineRelay:
    """A worker's output, passed on whole lines at a time: JSON lines as they are, anything else
    (an interpreter's traceback at start-up) as a JSON record of the launcher's."""

    def __init__(self, name: str, write: Any, log: Any) -> None:
        self.name = name
        self._write = write  # bytes of whole JSON lines
        self._log = log
        self._rest = b""

    def feed(self, data: bytes) -> None:
        data = self._rest + data if self._rest else data
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        if end:
            self._lines(data[:end])

    def close(self) -> None:
        if self._rest:
            rest, self._rest = self._rest, b""
            self._lines(rest + b"\n")

    def _lines(self, block: bytes) -> None:
        if block.startswith(b"{") and block.count(b"\n{") == block.count(b"\n") - 1:
            self._write(block)  # the usual read: JSON lines only, passed on in one piece
            return
        json_lines: list[bytes] = []
        for line in block.splitlines(keepends=True):
            if line.startswith(b"{"):
                json_lines.append(line)
            elif line.strip():
                if json_lines:
                    self._write(b"".join(json_lines))
                    json_lines = []
                self._log.error(line.decode("utf-8", "replace").rstrip(), source=self.name)
        if json_lines:
            self._write(b"".join(json_lines))


class WorkerPool:
    """The launcher's workers: started on their sockets, their output relayed, restarted when
    they die, stopped on request."""

    def __init__(self, settings: Any, shared: SharedState, count: int, write_lines: Any, log: Any) -> None:
        self.settings = settings
        self.shared = shared
        self.count = count
        self._write_lines = write_lines
        self._log = log
        self.sockets: list[socket.socket] = []
        self.health_sockets: list[socket.socket] = []
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self._controls: list[int | None] = [None] * count
        self._pumps: list[asyncio.Future | None] = [None] * count
        self._deaths: list[float] = []
        self.stopping = False
        self.restarts = 0

    def bind(self) -> None:
        s = self.settings
        self.sockets = bind_sockets(s.HOST, s.PORT, self.count)
        if s.PORT_HEALTH is not None and s.PORT_HEALTH != s.PORT:
            self.health_sockets = bind_sockets(s.HOST, s.PORT_HEALTH, self.count)

    async def start(self) -> bool:
        """Start every worker and wait until each serves; False if one could not."""
        for index in range(self.count):
            await self._spawn(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while not all(self.shared.state(i) == READY for i in range(self.count)):
            for index, proc in enumerate(self.procs):
                if proc is not None and proc.returncode is not None:
                    self._log.error("a proxy worker could not start", worker=index, exit_code=proc.returncode)
                    return False
            if loop.time() > deadline:
                self._log.error("proxy workers not ready in time", timeout_s=READY_TIMEOUT_S)
                return False
            await asyncio.sleep(0.02)
        self._log.info("proxy workers", workers=self.count, pids=self.shared.pids(self.count))
        return True

    async def _spawn(self, index: int) -> None:
        self.shared.reset_slot(index)
        control_r, control_w = os.pipe()
        fds = [self.sockets[index].fileno(), control_r]
        argv = [sys.executable, "-m", "app.worker", "--index", str(index), "--workers", str(self.count),
                "--state", str(self.shared.dir), "--fd", str(fds[0]), "--control-fd", str(control_r)]  # fmt: skip
        if self.health_sockets:
            fds.append(self.health_sockets[index].fileno())
            argv += ["--health-fd", str(fds[-1])]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=fds,
                limit=2**20,
            )
        finally:
            os.close(control_r)
        self.procs[index] = proc
        self._controls[index] = control_w
        relay = LineRelay(f"proxy-worker-{index}", self._write_lines, self._log)
        self._pumps[index] = asyncio.ensure_future(self._pump(proc.stdout, relay))

    @staticmethod
    async def _pump(stream: asyncio.StreamReader | None, relay: LineRelay) -> None:
        if stream is None:
            return
        while data := await stream.read(1 << 16):
            relay.feed(data)
        relay.close()

    def _close_control(self, index: int) -> None:
        fd, self._controls[index] = self._controls[index], None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def supervise(self) -> None:
        """Restart each worker that dies; return (the container then exits) when they keep dying."""
        while True:
            waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(self.procs) if p is not None}
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in waits:
                    fut.cancel()
            for fut in done:
                index = waits[fut]
                proc = self.procs[index]
                assert proc is not None
                code = proc.returncode
                pump = self._pumps[index]
                if pump is not None:
                    await asyncio.wait([pump], timeout=2)
                self._close_control(index)
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
                if len(self._deaths) > RESTARTS:
                    self._log.error(
                        "proxy workers keep dying: stopping so the container is restarted",
                        worker=index,
                        exit_code=code,
                        deaths=len(self._deaths),
                        window_s=RESTART_WINDOW_S,
                    )
                    return
                self._log.error(
                    "a proxy worker died: restarting it", worker=index, pid=proc.pid, exit_code=code
                )
                self.restarts += 1
                await self._spawn(index)

    def signal(self, signum: int) -> None:
        """Pass a signal on to every live worker (SIGHUP: reload the API keys)."""
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    async def stop(self) -> None:
        """Ask every worker to stop (uvicorn's graceful shutdown), kill what is left after
        STOP_TIMEOUT_S, and close the sockets."""
        self.stopping = True
        for index in range(self.count):
            self._close_control(index)  # EOF on its control pipe: stop
        procs = [p for p in self.procs if p is not None and p.returncode is None]
        if procs:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_TIMEOUT_S
            )
            if pending:
                self._log.warning("proxy workers did not stop in time: killing them", left=len(pending))
                for p in procs:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
                await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=5)
        pumps = [p for p in self._pumps if p is not None]
        if pumps:
            await asyncio.wait(pumps, timeout=2)
        for sock in (*self.sockets, *self.health_sockets):
            sock.close()
