"""One proxy worker process (PROXY_WORKERS > 1): the app on uvicorn, on a listening socket the
launcher bound and handed over, reporting to the launcher through the shared state and its output
pipe (app/workers.py). Started only by the launcher:

    python -m app.worker --index I --workers N --state DIR --fd FD --control-fd FD [--health-fd FD]

It serves until the launcher closes its control pipe (a stop, or the launcher gone), then lets
uvicorn finish what is in flight. SIGTERM and SIGINT are ignored: the launcher decides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys

from app import metrics, promlite, workers
from app.health_port import health_only
from app.logs import configure_logging, get_logger
from app.main import create_app
from app.runtime import run_reloaders
from app.server import ProxyServer, server_config
from app.settings import load_settings

log = get_logger("app.worker")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--state", required=True, help="the shared state's directory")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket of PORT")
    parser.add_argument("--control-fd", type=int, required=True, help="EOF on it: stop")
    parser.add_argument("--health-fd", type=int, help="the listening socket of PORT_HEALTH")
    return parser.parse_args(argv)


async def _serve(app, settings, args, shared: workers.SharedState, runtime: workers.WorkerRuntime) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(args.control_fd, stop.set)  # readable: a byte, or EOF when the launcher closes it
    # The launcher forwards SIGHUP: this process's API keys reload (a reload never stops the server).
    loop.add_signal_handler(signal.SIGHUP, lambda: run_reloaders(runtime.reloaders, log, worker=args.index))
    main = ProxyServer(
        server_config(
            app,
            settings.HOST,
            settings.PORT,
            settings.CLIENT_TIMEOUT,
            send_timeout=settings.CLIENT_SEND_TIMEOUT,
        )
    )
    servers = [(main, socket.socket(fileno=args.fd))]
    if args.health_fd is not None:
        config = server_config(
            health_only(app), settings.HOST, settings.PORT_HEALTH, settings.CLIENT_TIMEOUT, lifespan="off"
        )
        servers.append((ProxyServer(config), socket.socket(fileno=args.health_fd)))
    tasks = [asyncio.ensure_future(server.serve(sockets=[sock])) for server, sock in servers]
    while not all(server.started for server, _ in servers):
        if any(task.done() for task in tasks):
            log.error("proxy worker could not start", worker=args.index)
            return 1
        await asyncio.sleep(0.01)
    # As the launcher does for its own process once the engine is ready: what lives now lives as
    # long as the process, out of the collector's full passes.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    slot = shared.slot(args.index)
    shared.q[slot + 0] = os.getpid()
    shared.q[slot + 1] = workers.READY
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    code = 0 if stopped.done() else 1
    if code:
        log.error("proxy worker's server stopped unexpectedly", worker=args.index)
    stopped.cancel()
    loop.remove_reader(args.control_fd)
    for server, _ in servers:
        server.should_exit = True
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.gather(*tasks)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's handler reloads the keys
    settings = load_settings()
    if settings is None:
        return 2
    configure_logging(settings.LOG_LEVEL, "json")  # lines to the launcher, which writes them out
    workers.set_current(args.index, args.workers)
    shared = workers.SharedState.attach(args.state)
    promlite.use_shared(promlite.SharedValues(args.state, f"worker-{args.index}"))
    metrics.REGISTRY.unregister(metrics.PROCESS)
    runtime = workers.WorkerRuntime(shared, args.index, args.workers)
    app = create_app(settings, runtime)  # type: ignore[arg-type]
    try:
        import uvloop

        return uvloop.run(_serve(app, settings, args, shared, runtime))
    except ImportError:
        return asyncio.run(_serve(app, settings, args, shared, runtime))


if __name__ == "__main__":
    sys.exit(main())
