"""Every engine replica's lifetime: started with the gateway, restarted one at a time, stopped with it.

Each supervised replica is its own `Supervisor` (own child, port, probe channel, backoff,
state), so one crashing never touches another; external replicas get an `ExternalWatch`.
The fleet also scrapes each replica's `vllm:num_requests_waiting` about once a second
over a channel of its own (the router's tie-breaker) and runs rolling restarts:

    start a new child on a new port -> wait until it is ready -> new requests go to it
    -> the old one drains (its in-flight count reaches 0, bounded) -> stop the old one.

A group of one replica cannot do that without a gap: it drains first, then restarts,
and says so (log and the restart's answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

from .external import ExternalWatch
from .probe import HTTP_FAILURES, ProbeChannel
from .router import Backend, EngineGroup, Replica, Router
from .spec import EngineSpec
from .state import Phase, Upstream
from .supervisor import Supervisor, supervise

log = logging.getLogger("bastion.engines")
SCRAPE_INTERVAL = 1.0
# SIGHUP already reloads the key file (auth/keys.py): a key rotation must never restart every GPU server,
# so the rolling restart of every engine has a signal of its own.
RESTART_SIGNAL = signal.SIGUSR1
_SCRAPE_TIMEOUT = 2.0
_READY_POLL = 0.1
_WAITING = b"vllm:num_requests_waiting"


class RestartOutcome(StrEnum):
    RESTARTED = "restarted"  # a new child serves; the old one drained and stopped
    WITH_DOWNTIME = "restarted_with_downtime"  # one replica: drained, stopped, started again
    FAILED = "failed"  # the new child never became ready: the old one keeps serving
    NOT_SUPERVISED = "not_supervised"  # an external URL: bastion does not run it


@dataclass(frozen=True, slots=True)
class RestartReport:
    engine: str
    outcome: RestartOutcome
    detail: str


@dataclass(frozen=True, slots=True)
class Carried:
    """What a draining child still carries: the requests counted on it, and who could not say yet (with
    `bastion serve --workers N`: a live worker that has not heard of the switch; a dead one carries nothing).
    A worker that never answers is named as such, not counted as a request that was cut."""

    requests: int
    unheard: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.requests <= 0 and not self.unheard

    def left(self) -> str:
        """What the drain timeout cut, for the restart's line ("" when nothing was left)."""
        parts = []
        if self.requests > 0:
            parts.append(f"{self.requests} request(s) still running were cut after the drain timeout")
        if self.unheard:
            parts.append(f"{', '.join(self.unheard)} did not answer before the drain timeout")
        return "".join("; " + part for part in parts)


@dataclass(slots=True)
class ReplicaPlan:
    """How a replica runs: `make_spec` builds a fresh spec (a new port) per start; None for an external one."""

    replica: Replica
    make_spec: Callable[[], EngineSpec] | None
    health_timeout: float = 5.0
    health_interval: float = 5.0
    supervisor: Supervisor | None = None
    channel: ProbeChannel | None = None


class Fleet:
    """An async context manager over every replica; `restart` rolls one model (or all) through new children."""

    def __init__(
        self,
        router: Router,
        plans: list[ReplicaPlan],
        *,
        drain_timeout: float,
        scrape_waiting: bool,
        in_flight: Callable[[Backend], Carried] | None = None,
        restart_signal: bool = True,
        on_key: Callable[[str], None] | None = None,
    ) -> None:
        self.router = router
        self._on_key = on_key  # told each internal key a restart mints (the audit log's redactor)
        self._restart_signal = restart_signal  # SIGUSR1 restarts the engines (not in a worker: its master does)
        # Requests a backend carries: its own count, or (`bastion serve --workers N`) what the workers report.
        self._in_flight = in_flight or _outstanding
        self._plans = plans
        self._drain_timeout = drain_timeout
        self._scrape_waiting = scrape_waiting
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()
        self._scraper: ProbeChannel | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._signal = False

    def group_of(self, plan: ReplicaPlan) -> EngineGroup:
        groups: list[EngineGroup] = list(self.router.groups)
        if self.router.default is not None:
            groups.append(self.router.default)
        for group in groups:
            if plan.replica in group.replicas:
                return group
        raise LookupError(plan.replica.backend.label)

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        stack = self._stack
        for plan in self._plans:
            upstream = plan.replica.backend.upstream
            if plan.make_spec is None and upstream.phase is Phase.EXTERNAL:
                channel = await stack.enter_async_context(ProbeChannel(plan.health_timeout))
                await stack.enter_async_context(ExternalWatch(upstream, channel, plan.health_interval))
            else:  # its supervisor and channel are stopped in __aexit__ (a restart replaces them)
                if plan.channel is not None:
                    await plan.channel.__aenter__()
                if plan.supervisor is not None:
                    await plan.supervisor.__aenter__()
        if self._scrape_waiting:
            self._scraper = await stack.enter_async_context(ProbeChannel(_SCRAPE_TIMEOUT, max_connections=4))
            self._spawn(self._scrape_loop(), "bastion-engines-scrape")
        if self._restart_signal:
            with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
                asyncio.get_running_loop().add_signal_handler(RESTART_SIGNAL, self._on_restart_signal)
                self._signal = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._signal:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(RESTART_SIGNAL)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Every child at once: a slow one (vLLM takes seconds to exit) does not hold the others up.
        await asyncio.gather(*(_stop(plan.supervisor, plan.channel) for plan in self._plans), return_exceptions=True)
        await self._stack.__aexit__(exc_type, exc, tb)

    def _spawn(self, coroutine: Coroutine[object, None, object], name: str) -> None:
        task: asyncio.Task[object] = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_restart_signal(self) -> None:
        log.info("SIGUSR1: rolling restart of every engine")
        self._spawn(self.restart(None), "bastion-engines-restart")

    # --- waiting queues -----------------------------------------------------------------

    async def _scrape_loop(self) -> None:
        assert self._scraper is not None
        http = self._scraper.http
        while True:
            for backend in self.router.backends():
                upstream = backend.upstream
                if not upstream.accepting:
                    continue
                headers = {"authorization": "Bearer " + upstream.api_key} if upstream.api_key else {}
                try:
                    response = await http.get(upstream.base_url + "/metrics", headers=headers)
                except HTTP_FAILURES:
                    continue
                if response.status_code == 200:
                    backend.waiting = waiting_of(response.content)
            await asyncio.sleep(SCRAPE_INTERVAL)

    # --- restarts -----------------------------------------------------------------------

    async def restart(self, model: str | None) -> list[RestartReport]:
        """Restart `model`'s replicas (every engine's when None; one replica when named `<model>/<index>`),
        one at a time; LookupError if unknown."""
        plans = [
            p
            for p in self._plans
            if model is None or self.group_of(p).name == model or p.replica.backend.label == model
        ]
        if not plans and model is not None and (self.router.named or self.router.group(model) is None):
            raise LookupError(model)
        reports = []
        async with self._lock:  # one restart at a time, whoever asked (CLI, SIGUSR1)
            for plan in plans:
                report = await self._restart_one(plan)
                log.info("engine %s: %s (%s)", report.engine, report.outcome.value, report.detail)
                reports.append(report)
        return reports

    async def _restart_one(self, plan: ReplicaPlan) -> RestartReport:
        old = plan.replica.backend
        if plan.make_spec is None:
            return RestartReport(old.label, RestartOutcome.NOT_SUPERVISED, "an external URL: bastion does not run it")
        group = self.group_of(plan)
        others = [r.backend for r in group.replicas if r is not plan.replica and r.backend.usable]
        if not others:
            return await self._restart_in_place(plan, group)
        started = time.monotonic()
        spec = plan.make_spec()
        upstream, supervisor, channel = await self._start(spec)
        if not await _ready(upstream, spec.startup_timeout):
            await _stop(supervisor, channel)
            detail = f"the new child did not become ready ({upstream.detail}); the old one keeps serving"
            return RestartReport(old.label, RestartOutcome.FAILED, detail)
        new = Backend(upstream, old.label)
        old.draining = True
        plan.replica.backend = new  # new requests go to the new child from here on
        left = await self._drain(old)
        await _stop(plan.supervisor, plan.channel)
        plan.supervisor, plan.channel = supervisor, channel
        took = time.monotonic() - started
        detail = f"new child ready, old one drained and stopped in {took:.1f}s{left.left()}"
        return RestartReport(old.label, RestartOutcome.RESTARTED, detail)

    async def _restart_in_place(self, plan: ReplicaPlan, group: EngineGroup) -> RestartReport:
        assert plan.make_spec is not None
        old = plan.replica.backend
        log.warning(
            "engine %s: %s has no other ready replica: this restart has downtime (draining, then restarting); "
            'give it "replicas": 2 for restarts without a gap',
            old.label,
            group.name,
        )
        old.draining = True
        left = await self._drain(old)
        await _stop(plan.supervisor, plan.channel)
        spec = plan.make_spec()
        upstream, supervisor, channel = await self._start(spec)
        plan.supervisor, plan.channel = supervisor, channel
        plan.replica.backend = Backend(upstream, old.label)
        ready = await _ready(upstream, spec.startup_timeout)
        state = "ready" if ready else f"not ready: {upstream.detail}"
        outcome = RestartOutcome.WITH_DOWNTIME if ready else RestartOutcome.FAILED
        detail = f"one replica only, so requests got 503 meanwhile; {state}{left.left()}"
        return RestartReport(old.label, outcome, detail)

    async def _start(self, spec: EngineSpec) -> tuple[Upstream, Supervisor, ProbeChannel]:
        channel = ProbeChannel(spec.health_timeout)
        await channel.__aenter__()
        upstream, supervisor = supervise(spec, channel, self._on_key)
        await supervisor.__aenter__()
        return upstream, supervisor, channel

    async def _drain(self, backend: Backend) -> Carried:
        """Wait (at most the drain timeout) until `backend` carries nothing; what it still carries then."""
        deadline = time.monotonic() + self._drain_timeout
        while not (carried := self._in_flight(backend)).done and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_READY_POLL)
        return carried


def _outstanding(backend: Backend) -> Carried:
    return Carried(backend.outstanding)


async def _ready(upstream: Upstream, startup_timeout: float) -> bool:
    deadline = time.monotonic() + startup_timeout
    while upstream.phase is not Phase.READY:
        if upstream.phase is Phase.FAILED or time.monotonic() > deadline:
            return False
        await asyncio.sleep(_READY_POLL)
    return True


async def _stop(supervisor: Supervisor | None, channel: ProbeChannel | None) -> None:
    if supervisor is not None:
        await supervisor.__aexit__(None, None, None)
    if channel is not None:
        await channel.__aexit__(None, None, None)


def waiting_of(text: bytes) -> int:
    """The sum of `vllm:num_requests_waiting` samples in a Prometheus text page (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(_WAITING) and line[len(_WAITING) : len(_WAITING) + 1] in (b"{", b" "):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(None, 1)[1])
    return int(total)
