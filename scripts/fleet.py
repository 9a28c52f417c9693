"""`make fleet`: REPLICAS copies of the stack on one machine, vllm-router in front.

    python -m scripts.fleet          (make fleet sets the CPU engine's environment, as for make dev)

Each replica is a full `scripts/start.sh` (launcher, proxy, engine) on its own loopback ports; the
router (vllm-router, from PyPI) listens on PORT and is started once every replica answers `/health`.
Ctrl-C or SIGTERM stops the router, then every replica (process groups; nothing is left behind).

Environment: REPLICAS (2), PORT (8000, the router), ROUTER_POLICY (consistent_hash: sessions stick),
REPLICA_PORT (first replica's port, PORT+100), ROUTER_METRICS_PORT (29000), FLEET_DIR (.cache/fleet:
logs, Prometheus files), ROUTER_EXTRA_ARGS (more vllm-router flags). MODEL_NAME unset: the tiny text
model from TINY_MODELS_DIR. Every other variable reaches the replicas as it does with make dev.

The router's health check and retry flags and the replicas' DRAIN_GRACE_SECONDS are set together so
that a replica that is told to stop is out of the router's rotation before it refuses anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "scripts" / "start.sh"
PROMETHEUS_CONFIG = ROOT / "monitoring" / "fleet" / "prometheus.yml"

POLICIES = ("consistent_hash", "round_robin", "cache_aware", "power_of_two", "random")
DEFAULT_POLICY = "consistent_hash"
"""Same session key (X-Session-ID header), same replica: its prefix cache holds the conversation."""

# The router's view of a replica. vLLM-router's defaults (a check every 60 s, 3 failures) leave a
# stopping replica in rotation for up to three minutes; these make it 4 s plus one check's time, and
# a replica's DRAIN_GRACE_SECONDS covers that.
HEALTH_CHECK_INTERVAL_S = 2
HEALTH_FAILURE_THRESHOLD = 2
HEALTH_SUCCESS_THRESHOLD = 2
HEALTH_CHECK_TIMEOUT_S = 2
# A failed attempt (503, a refused connection) is retried through the policy again; the backoff
# spans one detection and more (0.25+0.5+1+2+2+2 s, less 20% jitter at worst), so the last attempts
# go to a live replica once the router has marked a dead one unhealthy, instead of five tries at the
# dead one in 0.4 s (its defaults).
RETRY_MAX_ATTEMPTS = 7
RETRY_INITIAL_BACKOFF_MS = 250
RETRY_BACKOFF_MULTIPLIER = 2
RETRY_MAX_BACKOFF_MS = 2000


def detection_seconds() -> float:
    """Longest time the router can keep routing to a replica whose /health turned 503."""
    return HEALTH_CHECK_INTERVAL_S * HEALTH_FAILURE_THRESHOLD


def drain_grace_seconds() -> float:
    """The replicas' DRAIN_GRACE_SECONDS: one detection, plus the longest a check may take."""
    return detection_seconds() + HEALTH_CHECK_TIMEOUT_S


def retry_span_seconds() -> float:
    """Total backoff of one request's retries (no jitter)."""
    delays = [
        min(RETRY_INITIAL_BACKOFF_MS * RETRY_BACKOFF_MULTIPLIER**i, RETRY_MAX_BACKOFF_MS)
        for i in range(RETRY_MAX_ATTEMPTS - 1)
    ]
    return sum(delays) / 1000


def router_flags() -> list[str]:
    """Health-check and retry flags: the same in `make fleet`, compose and the Helm chart."""
    return [
        "--health-check-endpoint",
        "/health",
        "--health-check-interval-secs",
        str(HEALTH_CHECK_INTERVAL_S),
        "--health-failure-threshold",
        str(HEALTH_FAILURE_THRESHOLD),
        "--health-success-threshold",
        str(HEALTH_SUCCESS_THRESHOLD),
        "--health-check-timeout-secs",
        str(HEALTH_CHECK_TIMEOUT_S),
        "--retry-max-retries",
        str(RETRY_MAX_ATTEMPTS),
        "--retry-initial-backoff-ms",
        str(RETRY_INITIAL_BACKOFF_MS),
        "--retry-backoff-multiplier",
        str(RETRY_BACKOFF_MULTIPLIER),
        "--retry-max-backoff-ms",
        str(RETRY_MAX_BACKOFF_MS),
    ]


def router_command(
    worker_urls: list[str],
    *,
    host: str,
    port: int,
    policy: str,
    metrics_port: int,
    metrics_host: str = "127.0.0.1",
    extra: list[str] | None = None,
) -> list[str]:
    """vllm-router's argv for a static list of replicas."""
    if policy not in POLICIES:
        raise ValueError(f"ROUTER_POLICY must be one of {', '.join(POLICIES)}, not {policy!r}")
    return [
        router_executable(),
        "--host",
        host,
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
        "--policy",
        policy,
        "--prometheus-host",
        metrics_host,
        "--prometheus-port",
        str(metrics_port),
        # The replicas are healthy before the router starts; its default check interval is 30 s.
        "--worker-startup-check-interval",
        "1",
        *router_flags(),
        *(extra or []),
    ]


def router_executable() -> str:
    beside = Path(sys.executable).parent / "vllm-router"  # the venv's, when not activated
    if beside.exists():
        return str(beside)
    found = shutil.which("vllm-router")
    if found is None:
        raise FileNotFoundError(
            "vllm-router is not installed: pip install vllm-router (requirements-dev.txt)"
        )
    return found


def prometheus_targets(replicas: list[str], router: str) -> dict[str, list[dict[str, Any]]]:
    """file_sd target files of monitoring/fleet/prometheus.yml: name -> content."""
    return {
        "vllm-api.json": [{"targets": replicas, "labels": {"fleet": "local"}}],
        "vllm-router.json": [{"targets": [router], "labels": {"fleet": "local"}}],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a child: SIGTERM when the fleet runner dies, so no replica or router outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _healthy(url: str, timeout: float = 2) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Process:
    """A child in its own process group, its output written to a file (and echoed, for people)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    echo: Callable[[str], None] | None = None
    proc: subprocess.Popen | None = None
    _pump: threading.Thread | None = None
    _log_start: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._pump = threading.Thread(target=self._copy, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _copy(self, stream: IO[bytes]) -> None:
        with open(self.log_path, "ab", buffering=0) as out:
            for line in iter(stream.readline, b""):
                out.write(line)
                if self.echo is not None:
                    self.echo(f"[{self.name}] {line.decode('utf-8', 'replace').rstrip()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def engine_groups(self) -> list[int]:
        """The engine's process group (the launcher starts it in a session of its own), as this
        run logged it (a restart appends to the same file; an older run's pid may be reused)."""
        groups = []
        with contextlib.suppress(FileNotFoundError), open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            for line in log.read().decode("utf-8", "replace").splitlines():
                if line.startswith("{") and '"engine started"' in line:
                    with contextlib.suppress(ValueError, KeyError):
                        groups.append(int(json.loads(line)["pid"]))
        return groups

    def send(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)  # type: ignore[union-attr]

    def reap(self, timeout: float = 60) -> int | None:
        """Wait for the process, then kill what is left of its group and its engine's."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pgid in [self.proc.pid, *self.engine_groups()]:
            _signal_group(pgid, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(5)
        return self.proc.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        self.send(sig)
        return self.reap(timeout)

    def kill(self) -> None:
        """What a crashed container looks like: every process of the replica gets SIGKILL at once."""
        assert self.proc is not None
        for pgid in [self.proc.pid, *self.engine_groups()]:
            _signal_group(pgid, signal.SIGKILL)
        self.proc.wait()
        if self._pump is not None:
            self._pump.join(5)


@dataclass
class Replica(Process):
    port: int = 0
    engine_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Fleet:
    """REPLICAS stacks and vllm-router in front; usable from tests (free ports) and the CLI."""

    env: Mapping[str, str]
    """The replicas' environment: the CPU engine's settings and the model (the router's too)."""
    workdir: Path
    replicas: int = 2
    port: int = 0
    host: str = "127.0.0.1"
    policy: str = DEFAULT_POLICY
    replica_port: int = 0
    metrics_port: int = 0
    router_extra: list[str] = field(default_factory=list)
    echo: Callable[[str], None] | None = None
    members: list[Replica] = field(default_factory=list)
    router: Process | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        for i in range(self.replicas):
            port = self.replica_port + i if self.replica_port else free_port()
            engine_port = self.replica_port + 100 + i if self.replica_port else free_port()
            self.members.append(
                Replica(
                    name=f"replica-{i}",
                    argv=[str(START)],
                    env=self._replica_env(i, port, engine_port),
                    log_path=self.workdir / f"replica-{i}.log",
                    echo=self.echo,
                    port=port,
                    engine_port=engine_port,
                )
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _replica_env(self, i: int, port: int, engine_port: int) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            HOST="127.0.0.1",  # reached through the router only
            PORT=str(port),
            ENGINE_PORT=str(engine_port),
            LOG_FORMAT="json",  # a file per replica; the tests and people read its request lines
            METRICS_DB_PATH=str(self.workdir / f"replica-{i}-metrics.db"),
            DRAIN_GRACE_SECONDS=env.get("DRAIN_GRACE_SECONDS") or f"{drain_grace_seconds():g}",
        )
        env.pop("PORT_HEALTH", None)
        return env

    # --- life -----------------------------------------------------------------------------------

    def start(self, timeout: float = 600) -> Fleet:
        """Every replica at once, then the router once they all answer /health."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for replica in self.members:
            replica.start()
        self.wait_replicas(timeout)
        self.write_prometheus_files()
        self.router = Process(
            name="router",
            argv=router_command(
                [r.url for r in self.members],
                host=self.host,
                port=self.port,
                policy=self.policy,
                metrics_port=self.metrics_port,
                extra=self.router_extra,
            ),
            env=dict(os.environ),
            log_path=self.workdir / "router.log",
            echo=self.echo,
        )
        self.router.start()
        self._wait(lambda: _healthy(self.url), 60, "the router", [self.router])
        return self

    def wait_replicas(self, timeout: float, members: list[Replica] | None = None) -> None:
        members = members if members is not None else self.members
        self._wait(lambda: all(_healthy(r.url) for r in members), timeout, "the replicas", members)

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, procs: list[Process]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in procs if not p.running]
            if dead:
                tails = "\n".join(f"--- {p.log_path}\n{tail(p.log_path)}" for p in dead)
                raise RuntimeError(f"{', '.join(p.name for p in dead)} exited while starting:\n{tails}")
            if ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"{what} not ready in {timeout:g} s (logs in {self.workdir})")

    def restart(self, i: int, timeout: float = 300) -> None:
        """Start replica i again on its ports (after a drain or a kill); the router finds it by
        its health check."""
        replica = self.members[i]
        assert not replica.running, f"{replica.name} is still running"
        replica.start()
        self.wait_replicas(timeout, [replica])

    def stop(self) -> None:
        """The router first (nothing new arrives), then the replicas with SIGINT: no drain grace,
        since no router is left to notice it."""
        if self.router is not None:
            self.router.stop(signal.SIGTERM, timeout=10)
        for replica in self.members:
            replica.send(signal.SIGINT)  # all at once: they drain side by side
        for replica in self.members:
            replica.reap(timeout=90)

    # --- what it writes -------------------------------------------------------------------------

    def write_prometheus_files(self) -> Path:
        """monitoring/fleet/prometheus.yml, as is, and its target files for this fleet's ports:
        `prometheus --config.file=<the returned path>` scrapes every replica and the router."""
        folder = self.workdir / "prometheus"
        (folder / "targets").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROMETHEUS_CONFIG, folder / "prometheus.yml")
        targets = prometheus_targets([r.address for r in self.members], f"127.0.0.1:{self.metrics_port}")
        for name, content in targets.items():
            (folder / "targets" / name).write_text(json.dumps(content, indent=2) + "\n")
        return folder / "prometheus.yml"


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


def fleet_from_env(environ: Mapping[str, str]) -> Fleet:
    """The CLI's fleet: `make fleet`'s variables, with the tiny text model when MODEL_NAME is unset."""
    env = dict(environ)
    if not env.get("MODEL_NAME"):
        models = Path(env.get("TINY_MODELS_DIR") or ROOT / ".cache" / "models")
        env.update(
            MODEL_NAME=str(models / "tiny-text"),
            SERVED_MODEL_NAME=env.get("SERVED_MODEL_NAME") or "tiny-text",
            MAX_MODEL_LEN=env.get("MAX_MODEL_LEN") or "2048",
            HF_HUB_OFFLINE="1",
        )
    port = int(env.get("PORT") or 8000)
    replicas = int(env.get("REPLICAS") or 2)
    if replicas < 1:
        raise ValueError("REPLICAS must be at least 1")
    return Fleet(
        env=env,
        workdir=Path(env.get("FLEET_DIR") or ROOT / ".cache" / "fleet"),
        replicas=replicas,
        port=port,
        host=env.get("HOST") or "0.0.0.0",
        policy=env.get("ROUTER_POLICY") or DEFAULT_POLICY,
        replica_port=int(env.get("REPLICA_PORT") or port + 100),
        metrics_port=int(env.get("ROUTER_METRICS_PORT") or 29000),
        router_extra=shlex.split(env.get("ROUTER_EXTRA_ARGS") or ""),
        echo=lambda line: print(line, flush=True),
    )


def main() -> int:
    try:
        fleet = fleet_from_env(os.environ)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    say = fleet.echo or print
    try:
        say(f"fleet: starting {fleet.replicas} replicas (logs in {fleet.workdir})")
        fleet.start()
        say(
            f"fleet: ready on {fleet.url} ({fleet.policy}; replicas "
            + ", ".join(r.url for r in fleet.members)
            + f"); router metrics {fleet.metrics_url}; "
            f"prometheus --config.file={fleet.workdir / 'prometheus' / 'prometheus.yml'}"
        )
        while not stopping.is_set():
            time.sleep(1)
            for r in fleet.members:
                if r.proc is not None and r.proc.returncode is None and r.proc.poll() is not None:
                    say(f"fleet: {r.name} exited with {r.proc.returncode}; the router routes around it")
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError, ValueError) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("fleet: stopping")
        fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
