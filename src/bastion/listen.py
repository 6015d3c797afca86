"""The listening socket, bound before anything starts.

uvicorn binds only after the application's start-up, which spawns the model server:
a busy port would start vLLM for nothing and end in a traceback-like error after
"upstream started". Binding first turns it into one line naming the setting, and
`Server` says where it listens once it accepts connections.
"""

from __future__ import annotations

import errno
import gc
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from .config import ConfigError

log = logging.getLogger("bastion")


def bind(host: str, port: int, *, host_setting: str, port_setting: str) -> list[socket.socket]:
    """Sockets bound to (host, port), not yet listening; `ConfigError` naming the setting otherwise.

    `::` means every address: an IPv6 socket and an IPv4 one on the same port (so IPv4 clients
    keep their IPv4 addresses for allowlists and the audit log), as asyncio does for host "".
    """
    if host == "::":
        first = _bind_one(socket.AF_INET6, ("::", port, 0, 0), host, port, host_setting, port_setting)
        port = first.getsockname()[1]
        try:
            return [first, _bind_one(socket.AF_INET, ("0.0.0.0", port), host, port, host_setting, port_setting)]
        except ConfigError:
            first.close()
            raise
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise ConfigError([f"cannot listen on {host} ({host_setting}): the name does not resolve"]) from None
    return [_bind_one(family, address, host, port, host_setting, port_setting)]


def _bind_one(
    family: int, address: tuple[Any, ...], host: str, port: int, host_setting: str, port_setting: str
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart while old ones linger
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError([_why(exc, host, port, host_setting, port_setting)]) from None
    return sock


def _why(exc: OSError, host: str, port: int, host_setting: str, port_setting: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} is in use ({port_setting}): stop what listens there (ss -ltnp 'sport = :{port}') "
            f"or choose another port, e.g. {port_setting}={port + 1 if port < 65535 else 8000}"
        )
    if exc.errno == errno.EACCES:
        return f"port {port} needs privileges ({port_setting}): use a port above 1023 and put nginx in front"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host} ({host_setting}): no such address on this machine"
    return f"cannot listen on {host}:{port} ({host_setting}, {port_setting}): {exc.strerror}"


def urls(sockets: list[socket.socket]) -> str:
    """Where the sockets listen, for a log line: `http://127.0.0.1:8000`, or several joined by "and"."""
    found = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        found.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    return " and ".join(found)


class Server(uvicorn.Server):
    """uvicorn's server on a socket bound beforehand; `on_started` runs once it accepts connections.

    (uvicorn logs its "running on" line only for sockets it binds itself.)
    """

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


YOUNG_THRESHOLD = 7_000  # container allocations (net) between young collections; Python's default is 700


def tune_collector() -> None:
    """Once serving starts: freeze what is alive, and collect the young generation less often.

    The ~100,000 objects alive by then (modules, settings, routes, pools) live as long as the
    process, yet every full collection walked them all: ~60 ms each, ~30 µs of CPU per request
    under load. Frozen (after collecting the garbage, so none of it is kept), a full collection
    walks only what requests created since.

    A young collection walks the objects of the requests in flight, whatever the threshold, so at
    Python's 700 it ran every ~25 requests for ~350 µs; at 7,000 it runs a tenth as often. Garbage
    in cycles waits a little longer for it (a few thousand objects at most).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
