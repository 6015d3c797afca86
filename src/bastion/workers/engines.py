"""The engines the master runs, as the workers see them.

The master's supervisors own each engine's `Upstream` (address, key, phase); a worker
keeps a mirror of it per replica label, updated from the master's snapshots, so its
router, its 503s and its /ready say exactly what one process would. Requests are
counted where they run (in the workers); the master asks for those counts when it
drains a replica during a rolling restart (`InFlight`).

A replica is named by its label (`<model>/<index>`), the same in every process because
every process builds it from the same settings; a running child by its URL (each start
of a child gets a port of its own, so a new URL is a new child).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from ..engine.router import Backend, Router
from ..engine.state import Phase, Upstream

UNSET_URL = "http://127.0.0.1:9"  # a mirror's address until the master's first snapshot (never used: STARTING)


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """One supervised replica as the master sees it now."""

    label: str
    url: str
    api_key: str | None
    phase: str
    detail: str
    restarts: int
    retry_after: int
    draining: bool
    waiting: int

    def as_message(self) -> dict[str, object]:
        return asdict(self)


def snapshot(router: Router) -> tuple[ReplicaState, ...]:
    """The master's supervised replicas (external ones are watched by each worker itself)."""
    return tuple(
        ReplicaState(
            label=backend.label,
            url=backend.upstream.base_url,
            api_key=backend.upstream.api_key,
            phase=backend.upstream.phase.value,
            detail=backend.upstream.detail,
            restarts=backend.upstream.restarts,
            retry_after=backend.upstream.retry_after,
            draining=backend.draining,
            waiting=backend.waiting,
        )
        for backend in router.backends()
        if backend.upstream.phase is not Phase.EXTERNAL
    )


def parse_snapshot(items: object) -> list[ReplicaState]:
    if not isinstance(items, list):
        return []
    return [ReplicaState(**item) for item in items if isinstance(item, dict)]


class EngineMirror:
    """In a worker: one `Upstream` per supervised replica label, kept like the master's.

    `upstream(label)` is called while the app is built (in place of starting a supervisor);
    `attach(router)` once it is; `apply` for each snapshot. When a replica's URL changes (a
    rolling restart started a new child), its replica gets a new `Backend` and the old one is
    kept, draining, until the requests it carries are done: `in_flight` reports them.
    """

    def __init__(self, on_secret: Callable[[str], None] = lambda _: None) -> None:
        self._upstreams: dict[str, Upstream] = {}
        self._router: Router | None = None
        self._retired: list[tuple[str, Backend]] = []  # (its child's URL, backend) of replaced backends
        self._on_secret = [on_secret]

    def tell_keys(self, on_secret: Callable[[str], None]) -> None:
        """One more listener for each engine key the master's snapshots bring (the audit log's redactor)."""
        self._on_secret.append(on_secret)

    def upstream(self, label: str) -> Upstream:
        upstream = self._upstreams.get(label)
        if upstream is None:
            upstream = self._upstreams[label] = Upstream(UNSET_URL, None, Phase.STARTING)
            upstream.detail = "waiting for the master's first word on this engine"
        return upstream

    def attach(self, router: Router) -> None:
        self._router = router

    def apply(self, states: Iterable[ReplicaState]) -> None:
        router = self._router
        if router is None:
            return
        replicas = {
            replica.backend.label: replica
            for group in (router.groups if router.default is None else (router.default,))
            for replica in group.replicas
        }
        for state in states:
            upstream = self._upstreams.get(state.label)
            replica = replicas.get(state.label)
            if upstream is None or replica is None:
                continue
            backend = replica.backend
            if state.url != upstream.base_url:
                if upstream.base_url != UNSET_URL:  # a new child: new requests go to it, the old ones finish
                    backend.draining = True
                    self._retired.append((upstream.base_url, backend))
                    backend = replica.backend = Backend(upstream, state.label)
                upstream.base_url = state.url
            if state.api_key and state.api_key != upstream.api_key:
                for on_secret in self._on_secret:
                    on_secret(state.api_key)
            upstream.api_key = state.api_key
            upstream.phase = Phase(state.phase)
            upstream.detail = state.detail
            upstream.restarts = state.restarts
            upstream.retry_after = state.retry_after
            backend.draining = state.draining
            backend.waiting = state.waiting

    def in_flight(self) -> dict[str, int]:
        """Requests this worker has in flight per child URL (retired backends dropped once done)."""
        counts: dict[str, int] = {}
        if self._router is not None:
            for backend in self._router.backends():
                if backend.upstream.phase is not Phase.EXTERNAL:
                    url = backend.upstream.base_url
                    counts[url] = counts.get(url, 0) + backend.outstanding
        kept = []
        for url, backend in self._retired:
            counts[url] = counts.get(url, 0) + backend.outstanding
            if backend.outstanding > 0:
                kept.append((url, backend))
        self._retired = kept
        return counts

    @property
    def draining(self) -> bool:
        """Some replaced backend still carries requests: the master waits to hear when they are done."""
        return bool(self._retired) or any(b.draining and b.outstanding for b in self._backends())

    def _backends(self) -> Sequence[Backend]:
        return self._router.backends() if self._router is not None else ()
