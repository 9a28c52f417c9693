"""One node of a multi-node replica (the Helm chart's LeaderWorkerSet): a model sharded over the GPUs
of several nodes with vLLM's Ray executor.

    python3 /app/scripts/ray_node.py leader --nodes 2     Ray head; once every node has joined,
                                                          exec scripts/start.sh (proxy + vLLM)
    python3 /app/scripts/ray_node.py worker --leader HOST Ray worker joining HOST, in the foreground

vLLM places its workers when it starts, so the leader waits (against a deadline) until the whole
group is in the Ray cluster before it starts the engine; a worker waits for the head to listen.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

START = Path(__file__).resolve().parent / "start.sh"


def head_command(port: int) -> list[str]:
    return ["ray", "start", "--head", f"--port={port}", "--disable-usage-stats"]


def worker_command(leader: str, port: int) -> list[str]:
    return ["ray", "start", f"--address={leader}:{port}", "--block", "--disable-usage-stats"]


def alive_nodes() -> int:
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="ERROR")
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def wait_for(
    ready: Callable[[], bool], timeout: float, what: str, interval: float = 5, sleep=time.sleep
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        sleep(interval)


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None, execv=os.execv) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="role", required=True)
    leader = sub.add_parser("leader")
    leader.add_argument("--nodes", type=int, required=True, help="nodes in the group, the leader included")
    leader.add_argument("--port", type=int, default=6379)
    leader.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the group")
    worker = sub.add_parser("worker")
    worker.add_argument("--leader", required=True, help="the leader's address (LWS_LEADER_ADDRESS)")
    worker.add_argument("--port", type=int, default=6379)
    worker.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the head")
    args = parser.parse_args(argv)
    try:
        if args.role == "leader":
            subprocess.run(head_command(args.port), check=True)
            wait_for(lambda: alive_nodes() >= args.nodes, args.timeout, f"{args.nodes} Ray nodes")
            print(f"ray_node: {args.nodes} nodes in the cluster: starting the stack", flush=True)
            execv(str(START), [str(START)])
        else:
            wait_for(lambda: listening(args.leader, args.port), args.timeout, f"Ray head {args.leader}")
            command = worker_command(args.leader, args.port)
            execv(_which(command[0]), command)
    except (TimeoutError, subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"ray_node: {exc}", file=sys.stderr)
        return 1
    return 0


def _which(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed in this image")
    return found


if __name__ == "__main__":
    sys.exit(main())
