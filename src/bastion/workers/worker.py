"""One worker process of `bastion serve --workers N`: the gateway app on its own event loop.

The master spawns it (multiprocessing's spawn, as uvicorn's multiprocess supervisor does)
with the listening sockets it bound, so every worker accepts on the same port, and one end
of a socket pair to the master (`link.MasterLink`). The worker never starts an engine: it
mirrors the engines' state from the master and forwards to them as any gateway does.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import prometheus_client

from ..app import create_app
from ..config import Settings
from ..listen import Server, tune_collector
from ..preflight import logging_for
from ..server import server_config
from .engines import EngineMirror
from .link import MasterLink

log = logging.getLogger("bastion")
WORKER_IGNORES = frozenset({signal.SIGHUP, signal.SIGUSR1})  # the master's to act on (see run_worker)
STARTUP_FAILURE = 3  # as uvicorn's: the app could not be built, and would not be on a restart either


def run_worker(settings: Settings, sockets: list[socket.socket], index: int, control: socket.socket) -> None:
    """The spawned process's target: build the gateway, serve on the inherited sockets until stopped."""
    # SIGHUP (the master passes `systemctl reload` on) only means "reload the key file", whose service handles it
    # while it runs; without a key file, or before and after that service, it must not kill the worker.
    # SIGUSR1 asks the master for a rolling restart of the engines; a worker runs none. `systemctl kill -s USR1`
    # signals the whole cgroup: a worker must neither die of it (the default action) nor claim to restart.
    # The master started this process with both blocked; what arrived meanwhile is dropped on unblocking.
    for signum in WORKER_IGNORES:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORES)
    redactor = logging_for(settings)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    link = MasterLink(control, index, EngineMirror(redactor.add_secret))
    try:
        app = create_app(settings, link=link)
    except (ValueError, OSError) as exc:
        log.error("worker %d cannot start: %s", index, exc)
        sys.exit(STARTUP_FAILURE)

    def started() -> None:
        link.started()
        tune_collector()

    server = Server(server_config(app, settings), started)
    server.run(sockets=sockets)
    if not server.started:  # the lifespan failed (its line is above): the master must not retry forever
        sys.exit(STARTUP_FAILURE)
