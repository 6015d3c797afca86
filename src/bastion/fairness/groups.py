"""One gate per engine group: the router's groups, each with a gate whose room follows its ready replicas.

A request's gate is the one of the group the router sends its model to (one engine: the
default group, whatever the model), so a flood of one model never queues another model's
requests. A group's room is its per-replica capacity (the engine entry's `capacity`, else
BASTION_ENGINE_CAPACITY) and backlog times its ready replicas, read about once a second: a
replica that dies or drains for a restart stops counting, and the queue does not pile its
share onto the others. With a waiting threshold, the group's waiting count is the sum of its
replicas' (the fleet scrapes them).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from ..background import background
from ..context import Exchange
from ..engine.router import EngineGroup, Router
from .classes import ClassTable
from .gate import Gate

FOLLOW_INTERVAL = 1.0  # seconds between reads of the groups' ready replicas (and scraped waiting counts)


@dataclass(frozen=True, slots=True)
class GateLimits:
    """The gate settings every group shares (capacity is a default a group's own entry overrides)."""

    capacity: int = 0
    reserve: int = 0
    backlog: int = 0
    lead: float = 0.0
    waiting_threshold: int | None = None
    queue_size: int = 1024


def group_gates(router: Router, classes: ClassTable, limits: GateLimits) -> dict[str, Gate]:
    """A gate per engine group, keyed by the group's name."""
    groups = router.groups if router.default is None else (router.default,)
    return {
        group.name: Gate(
            group.name,
            classes,
            capacity=group.capacity_per_replica or limits.capacity,
            reserve=limits.reserve,
            backlog=limits.backlog,
            lead=limits.lead,
            replicas=_ready(group),
            waiting_threshold=limits.waiting_threshold,
            queue_size=limits.queue_size,
        )
        for group in groups
    }


def group_of(router: Router) -> Callable[[Exchange], str]:
    """`engine_name_for` of `FairShare`: the name of the group serving the request's model ("" if none: no gate,
    the proxy answers 404)."""

    def engine_name_for(exchange: Exchange) -> str:
        group = router.group(exchange.model)
        return group.name if group is not None else ""

    return engine_name_for


def _ready(group: EngineGroup) -> int:
    return sum(1 for replica in group.replicas if replica.backend.usable)


@contextlib.asynccontextmanager
async def follow_groups(
    router: Router, gates: Mapping[str, Gate], *, waiting: bool, interval: float = FOLLOW_INTERVAL
) -> AsyncIterator[None]:
    """Lifespan service: every `interval`, each gate's replicas (and, with `waiting`, its engines' queue)."""
    groups = [(group, gates[group.name]) for group in router.groups if group.name in gates]

    async def loop() -> None:
        while True:
            for group, gate in groups:
                gate.set_replicas(_ready(group))
                if waiting:
                    gate.set_engine_waiting(sum(replica.backend.waiting for replica in group.replicas))
            await asyncio.sleep(interval)

    async with background(loop):
        yield
