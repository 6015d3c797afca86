"""What one supervised engine is: its command, its address and how it is watched.

`create_app` builds an `EngineSpec` from the settings; everything below it (the
supervisor, the probes) takes the spec, never the settings. One spec is one
engine: its own child, port, probe channel, backoff and state, so several can
run side by side behind one gateway.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EngineSpec:
    name: str  # the model it serves (log lines, later the routing key)
    command: tuple[str, ...]  # argv, already checked (engine.command.build_command)
    host: str
    port: int  # never 0: a free one is picked before the spec is built
    env: Mapping[str, str] = field(default_factory=dict)  # without the API key: the supervisor adds a fresh one
    command_setting: str = "BASTION_UPSTREAM_COMMAND"  # named when the command cannot be run
    startup_timeout: float = 1800.0
    health_interval: float = 5.0
    health_timeout: float = 5.0
    health_failures: int = 3
    backoff: float = 1.0  # first restart delay; doubles per crash, with jitter
    backoff_max: float = 60.0
    max_restarts: int = 5  # crashes within restart_window after which it stays down
    restart_window: float = 600.0
    stop_timeout: float = 30.0  # SIGTERM, this long, then SIGKILL

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def free_port(host: str) -> int:
    """A port nobody listens on right now (the child binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
