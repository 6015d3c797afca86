"""Which replica of which engine serves a request.

A `Router` maps the model a request names to an `EngineGroup` and picks one of its
replicas: the fewest requests the gateway has in flight there (its own count, exact
and free), the engine's waiting queue (`vllm:num_requests_waiting`, scraped about
once a second) as the tie-breaker, then a rotating start so equal replicas take
turns. A session header or the first bytes of the body may name a preferred
replica (prefix caches stay warm), but only while it is within `affinity_slack` of
the least loaded one, as the SGLang router's cache-aware policy does.

Everything here is plain attribute reads and integer arithmetic on the hot path: no
locks, no tasks. `acquire` counts the request in, `Backend.release` counts it out.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from ..errors import GatewayError
from .state import Phase, Upstream


class Backend:
    """One running server: its state (`Upstream`, kept by its supervisor) and the gateway's count of it.

    A rolling restart replaces a replica's backend: requests in flight keep the old one
    (and release it), new ones get the new one.
    """

    __slots__ = ("draining", "label", "outstanding", "upstream", "waiting")

    def __init__(self, upstream: Upstream, label: str) -> None:
        self.upstream = upstream
        self.label = label  # "<model>/<replica index>": bounded, a metric label as it is
        self.outstanding = 0  # requests the gateway has in flight here
        self.waiting = 0  # the engine's own queue, last scraped
        self.draining = False  # being replaced or restarted: no new requests

    @property
    def usable(self) -> bool:
        return not self.draining and self.upstream.accepting

    def release(self) -> None:
        self.outstanding -= 1


class Replica:
    """A slot of an engine group: its index and the backend serving it now."""

    __slots__ = ("backend", "index")

    def __init__(self, index: int, backend: Backend) -> None:
        self.index = index
        self.backend = backend


class EngineGroup:
    """The replicas of one model: the unit a fair queue in front of the router keys by `name`."""

    __slots__ = ("_turn", "capacity_per_replica", "name", "replicas")

    def __init__(self, name: str, replicas: Sequence[Replica], capacity_per_replica: int | None = None) -> None:
        self.name = name
        self.replicas = tuple(replicas)
        self.capacity_per_replica = capacity_per_replica
        self._turn = 0

    @property
    def outstanding(self) -> int:
        """Requests the gateway has in flight on this model, every replica together."""
        return sum(replica.backend.outstanding for replica in self.replicas)

    @property
    def capacity(self) -> int | None:
        """Requests the usable replicas run at once (None: not configured, unknown)."""
        if self.capacity_per_replica is None:
            return None
        return self.capacity_per_replica * sum(1 for replica in self.replicas if replica.backend.usable)

    @property
    def ready(self) -> bool:
        return any(replica.backend.usable for replica in self.replicas)

    def not_ready_error(self) -> GatewayError:
        """503 + Retry-After, in the words of the replica closest to serving."""
        backends = [replica.backend for replica in self.replicas]
        for backend in backends:
            if backend.draining and backend.upstream.accepting:
                return GatewayError(
                    503,
                    f"The model {self.name!r} is restarting; retry shortly.",
                    code="upstream_not_ready",
                    headers=[(b"retry-after", b"5")],
                )
        best = min(backends, key=lambda b: b.upstream.phase is Phase.FAILED)  # a FAILED one only if all are
        return best.upstream.not_ready_error()

    def pick(self, affinity: int | None, exclude: Backend | None) -> Backend | None:
        """The replica for the next request (not yet counted in), or None if none is usable."""
        replicas = self.replicas
        if len(replicas) == 1:
            only = replicas[0].backend
            return only if only.usable and only is not exclude else None
        best: Backend | None = None
        count = len(replicas)
        start = self._turn = (self._turn + 1) % count
        for step in range(count):
            backend = replicas[(start + step) % count].backend
            if backend is exclude or not backend.usable:
                continue
            if best is None or (backend.outstanding, backend.waiting) < (best.outstanding, best.waiting):
                best = backend
        if best is None or affinity is None:
            return best
        preferred = replicas[affinity % count].backend
        if preferred is not exclude and preferred.usable and preferred.outstanding <= _slack(best.outstanding):
            return preferred
        return best


def _slack(least: int) -> int:
    """How busy a preferred replica may be: 25 % above the least loaded one, and at least one more."""
    return max(least + 1, least + least // 4)


class Router:
    """Model name -> engine group -> replica. With no `groups` named, `default` takes every model (one engine)."""

    def __init__(
        self,
        groups: Sequence[EngineGroup],
        *,
        default: EngineGroup | None = None,
        session_header: bytes = b"x-session-id",
        prefix_bytes: int = 0,
    ) -> None:
        self.groups = tuple(groups)
        self._by_name = {group.name: group for group in self.groups}
        self.default = default
        self.session_header = session_header.lower()
        self.prefix_bytes = prefix_bytes

    @property
    def named(self) -> bool:
        """True when engines are configured by name (BASTION_ENGINES): an unknown model is a 404."""
        return self.default is None

    def group(self, model: str) -> EngineGroup | None:
        """The group serving `model`; a request that names none goes to the first engine."""
        if self.default is not None:
            return self.default
        if not model:
            return self.groups[0]
        return self._by_name.get(model)

    def affinity(self, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> int | None:
        """The preferred replica's hash: the session header's value, else the body's first bytes (if enabled)."""
        for name, value in headers:
            if name == self.session_header:
                return zlib.crc32(value)
        if self.prefix_bytes and body:
            return zlib.crc32(body[: self.prefix_bytes])
        return None

    def acquire(
        self, group: EngineGroup, affinity: int | None = None, exclude: Backend | None = None
    ) -> Backend | None:
        """A replica for one request, counted in (the caller calls `release` when it ends), or None."""
        backend = group.pick(affinity, exclude)
        if backend is not None:
            backend.outstanding += 1
        return backend

    def backends(self) -> list[Backend]:
        groups = self.groups if self.default is None else (self.default,)
        return [replica.backend for group in groups for replica in group.replicas]
