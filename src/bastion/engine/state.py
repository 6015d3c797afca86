"""What the proxy needs to know about the upstream, and who may change it.

The supervisor updates one `Upstream` per engine (in external mode the phase stays
EXTERNAL and its watch keeps `detail` current); the proxy reads it on every request.
Reads are plain attribute loads: no locks on the hot path.
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import GatewayError

# Retry-After once bastion stopped restarting the engine: nothing changes until a person acts, so
# clients (and SDK retry loops) are told to come back in minutes, not to hammer every second.
OPERATOR_RETRY_AFTER = 300


class Phase(StrEnum):
    EXTERNAL = "external"  # not ours: always forwarded, failures surface as 502/504
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"  # crash loop, or supervision itself failed: stays down until an operator acts
    STOPPING = "stopping"


class Upstream:
    """Where requests go and whether they may go there now."""

    __slots__ = ("api_key", "base_url", "detail", "phase", "restarts", "retry_after")

    def __init__(self, base_url: str, api_key: str | None, phase: Phase = Phase.EXTERNAL) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.phase = phase
        self.detail = ""
        self.retry_after = 5
        self.restarts = 0  # times the supervisor restarted a dead or hung child

    @property
    def accepting(self) -> bool:
        return self.phase in (Phase.READY, Phase.EXTERNAL)

    def set(self, phase: Phase, detail: str = "") -> None:
        self.phase = phase
        self.detail = detail

    def not_ready_error(self) -> GatewayError:
        if self.phase is Phase.FAILED:
            return GatewayError(
                503,
                f"The model server is stopped: {self.detail or 'it keeps crashing'}. "
                "An operator must fix it and restart bastion.",
                code="upstream_not_ready",
                headers=[(b"retry-after", b"%d" % OPERATOR_RETRY_AFTER)],
            )
        messages = {
            Phase.STARTING: "The model is loading; retry shortly.",
            Phase.RESTARTING: "The model server is restarting; retry shortly.",
            Phase.STOPPING: "The gateway is shutting down.",
        }
        return GatewayError(
            503,
            messages.get(self.phase, "The model server is not ready."),
            code="model_loading" if self.phase is Phase.STARTING else "upstream_not_ready",
            headers=[(b"retry-after", str(self.retry_after).encode())],
        )
