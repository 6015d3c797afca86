"""One engine's admission gate: forward at once while it has room, else queue fairly.

Saturated means the gateway's outstanding requests to the engine reached its limit, or the
engine's own waiting queue (scraped) is above `waiting_threshold`. The limit is `capacity`
(about vLLM's --max-num-seqs) plus `backlog`; classes below the top one stop `reserve` short
of it, so a top-class request is always forwarded at once. With `backlog` above `reserve`, a
few lower-class requests wait inside the engine's own queue: a finished sequence's slot is
refilled in the engine's next step instead of after the round trip through the gateway
(tens of ms on a busy vLLM), and vLLM's priority scheduler still puts a top-class request
ahead of them (it waits for the next sequence to finish, not for the gateway). Then requests
wait here instead of in vLLM's queue:

- strict order between classes: a queued request of a lower class is admitted only when
  none of a higher class waits;
- within a class, deficit round robin between principals on the tokens each request
  reserved (prompt estimate + completion cap), each principal's quantum scaled by its weight;
- a class's deadline bounds the wait (then 429 with a Retry-After from the observed rate at
  which room frees); a full queue sheds the lowest class first.

Cost when nothing is saturated and nobody waits: `enter` is a few comparisons and an
increment (no future, no task, no clock read); `leave` a decrement and a test.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum

from .classes import ClassTable, PriorityClass

QUANTUM = 64  # tokens a principal of weight 1 earns per (computed) round of its class
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATE_SAMPLES = 64  # departures the Retry-After estimate looks back over


class Shed(StrEnum):
    """Why a queued request was refused (a metric label)."""

    DEADLINE = "deadline"  # waited its class's deadline
    FULL = "full"  # the queue was full of requests of its class or higher
    EVICTED = "evicted"  # a higher class needed its place


class Refused(Exception):
    def __init__(self, reason: Shed, retry_after: int) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[None]
    cost: int
    flow: _Flow
    queued: float
    live: bool = True  # counted in its queue's depth and the gate's `queued`


@dataclass(slots=True, eq=False)
class Hold:
    """A forwarded lower-class request whose end the gate predicts (a backlog with a lead)."""

    start: float  # loop time it was forwarded
    due: bool = False  # within `lead` of its predicted end: its successor may be forwarded
    done: bool = False


@dataclass(slots=True, eq=False)
class _Flow:
    """One principal's waiters in one class."""

    key: str
    weight: float
    waiters: collections.deque[_Waiter] = field(default_factory=collections.deque)
    deficit: float = 0.0


@dataclass(slots=True, eq=False)
class ClassStats:
    """What the metrics read, per class."""

    depth: int = 0
    admitted_fast: int = 0
    admitted_queued: int = 0
    shed: dict[Shed, int] = field(default_factory=lambda: dict.fromkeys(Shed, 0))
    wait_buckets: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))
    wait_count: int = 0
    wait_sum: float = 0.0


class _ClassQueue:
    __slots__ = ("cls", "discarded", "flows", "ring", "stats")

    def __init__(self, cls: PriorityClass) -> None:
        self.cls = cls
        self.flows: dict[str, _Flow] = {}
        self.ring: collections.deque[_Flow] = collections.deque()  # flows with waiters, in round-robin order
        self.stats = ClassStats()
        self.discarded = 0  # waiters found gone by `pop` since the gate last looked (its `queued` to correct)

    def push(self, principal: str, cost: int, future: asyncio.Future[None]) -> _Waiter:
        flow = self.flows.get(principal)
        if flow is None:
            flow = self.flows[principal] = _Flow(principal, self.cls.weight)
            self.ring.append(flow)
        waiter = _Waiter(future, cost, flow, time.monotonic())
        flow.waiters.append(waiter)
        self.stats.depth += 1
        return waiter

    def pop(self) -> _Waiter | None:
        """The next waiter by deficit round robin (skipping those that left), or None.

        The rounds of DRR are computed rather than looped: every flow with waiters earns
        `QUANTUM x weight` a round, and the first flow (in ring order) whose deficit covers its
        head's tokens after the fewest rounds is served, then goes to the back of the ring.
        """
        ring = self.ring
        best: _Flow | None = None
        best_rounds = 0
        for flow in list(ring):
            waiters = flow.waiters
            while waiters and waiters[0].future.done():
                self._drop(waiters.popleft())
            if not waiters:
                ring.remove(flow)
                del self.flows[flow.key]
                continue
            short = waiters[0].cost - flow.deficit
            rounds = 0 if short <= 0 else math.ceil(short / (QUANTUM * flow.weight))
            if best is None or rounds < best_rounds:
                best, best_rounds = flow, rounds
        if best is None:
            return None
        if best_rounds:
            for flow in ring:
                flow.deficit += best_rounds * QUANTUM * flow.weight
        head = best.waiters.popleft()
        best.deficit -= head.cost
        ring.remove(best)
        ring.append(best)
        head.live = False
        self.stats.depth -= 1
        return head

    def _drop(self, waiter: _Waiter) -> None:
        if waiter.live:
            waiter.live = False
            self.stats.depth -= 1
            self.discarded += 1

    def remove(self, waiter: _Waiter) -> bool:
        """Take a waiter out (it left, timed out or is shed); False if it was no longer counted."""
        if not waiter.live:
            return False
        waiter.live = False
        self.stats.depth -= 1
        if waiter in waiter.flow.waiters:
            waiter.flow.waiters.remove(waiter)
        return True

    def newest(self) -> _Waiter | None:
        """The most recently queued live waiter (the one shed to make room for a higher class)."""
        best: _Waiter | None = None
        for flow in self.ring:
            for waiter in reversed(flow.waiters):
                if not waiter.future.done():
                    if best is None or waiter.queued > best.queued:
                        best = waiter
                    break
        return best


class Gate:
    """The admission gate of one engine (one engine group, once several replicas share a name)."""

    def __init__(
        self,
        name: str,
        classes: ClassTable,
        *,
        capacity: int = 0,
        reserve: int = 0,
        backlog: int = 0,
        lead: float = 0.0,
        replicas: int = 1,
        waiting_threshold: int | None = None,
        queue_size: int = 1024,
    ) -> None:
        self.name = name
        self.capacity = capacity  # per replica, like `backlog`; `reserve` is the group's
        self.reserve = reserve
        self.backlog = backlog
        self.lead = lead  # 0: the backlog is always open; else only for requests predicted to end within it
        self.replicas = max(1, replicas)
        self.limit = self._lower_limit = self._backlog_room = 0
        self._limits()
        self.due = 0  # outstanding lower-class requests within `lead` of their predicted end
        self.per_token = 0.0  # seconds per completion token, forward to end: the fastest recently seen
        self._rates: collections.deque[float] = collections.deque(maxlen=_RATE_SAMPLES)
        self._learned = 0
        self._dues: list[tuple[float, int, Hold]] = []  # (loop time a hold becomes due, tie-breaker, hold)
        self._numbers = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.waiting_threshold = waiting_threshold
        self.queue_size = queue_size
        self.outstanding = 0
        self.queued = 0
        self.engine_waiting = 0  # the engine's own queue, last scraped
        self._top = classes.classes[0].order
        self._queues = {c.name: _ClassQueue(c) for c in classes.classes}
        self._ordered = [self._queues[c.name] for c in classes.classes]
        self._departures: collections.deque[float] = collections.deque(maxlen=_RATE_SAMPLES)  # while queued

    @property
    def stats(self) -> dict[str, ClassStats]:
        return {name: queue.stats for name, queue in self._queues.items()}

    def _limits(self) -> None:
        room, backlog = self.capacity * self.replicas, self.backlog * self.replicas
        self.limit = room + backlog  # what the top class may fill
        # Lower classes: the room less the reserve (a reserve as large as the room still lets one in), plus the
        # backlog: all of it, or with a lead as many as outstanding requests are due to end (see `_room`).
        self._lower_limit = max(1, room - self.reserve + (0 if self.lead else backlog))
        self._backlog_room = backlog if self.lead else 0

    def set_replicas(self, replicas: int) -> None:
        """The group's ready replicas changed: its room follows (never below one replica's), and grown room
        goes to the queue at once."""
        replicas = max(1, replicas)
        if replicas == self.replicas:
            return
        self.replicas = replicas
        self._limits()
        if self.queued:
            self._dispatch()

    def _room(self, cls: PriorityClass) -> bool:
        if self.capacity:
            if cls.order == self._top:
                limit = self.limit
            else:
                limit = self._lower_limit + (min(self.due, self._backlog_room) if self.due else 0)
            if self.outstanding >= limit:
                return False
        threshold = self.waiting_threshold
        return threshold is None or self.engine_waiting <= threshold

    def enter(self, cls: PriorityClass) -> bool:
        """The fast path: True (and counted outstanding) when it may go now; False: call `wait`."""
        if self.queued or not self._room(cls):
            return False
        self.outstanding += 1
        self._queues[cls.name].stats.admitted_fast += 1
        return True

    async def wait(self, cls: PriorityClass, principal: str, cost: int) -> None:
        """Queue until admitted (then counted outstanding); `Refused` past the deadline or when shed.

        A cancellation (the client left) takes the request out of the queue at once.
        """
        queue = self._queues[cls.name]
        if self.queued >= self.queue_size and not self._evict_below(cls):
            queue.stats.shed[Shed.FULL] += 1
            raise Refused(Shed.FULL, self._retry_after())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = queue.push(principal, max(1, cost), future)
        self.queued += 1
        self._dispatch()
        try:
            async with asyncio.timeout(cls.deadline):
                await future
        except TimeoutError:
            self._forget(queue, waiter)
            queue.stats.shed[Shed.DEADLINE] += 1
            raise Refused(Shed.DEADLINE, self._retry_after()) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.leave()  # admitted in the same instant as cancelled: give the room back
            else:
                self._forget(queue, waiter)
            raise
        except Refused:
            raise  # evicted: already out of the queue
        waited = time.monotonic() - waiter.queued
        stats = queue.stats
        stats.admitted_queued += 1
        stats.wait_count += 1
        stats.wait_sum += waited
        for index, bound in enumerate(WAIT_BUCKETS):
            if waited <= bound:
                stats.wait_buckets[index] += 1
                break

    def forwarded(self, cls: PriorityClass, tokens: int) -> Hold | None:
        """With a backlog lead: a lower-class request is on its way with at most `tokens` to generate. Its end
        is predicted from the fastest recent requests; `lead` seconds before it, its successor may be forwarded
        (it then waits inside the engine, ready for the slot). None when nothing is predicted."""
        if not self._backlog_room or cls.order == self._top:
            return None
        loop = asyncio.get_running_loop()
        hold = Hold(loop.time())
        if self.per_token and tokens > 0:
            at = hold.start + self.per_token * tokens - self.lead
            heapq.heappush(self._dues, (at, next(self._numbers), hold))
            if at < self._timer_at:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer, self._timer_at = loop.call_at(at, self._on_due), at
        return hold

    def _on_due(self) -> None:
        self._timer, self._timer_at = None, math.inf
        loop = asyncio.get_running_loop()
        now, dues = loop.time(), self._dues
        while dues and dues[0][0] <= now:
            hold = heapq.heappop(dues)[2]
            if not hold.done:
                hold.due = True
                self.due += 1
        if dues:
            self._timer_at = dues[0][0]
            self._timer = loop.call_at(self._timer_at, self._on_due)
        if self.queued:
            self._dispatch()

    def leave(self, hold: Hold | None = None, tokens: int = 0) -> None:
        """A forwarded request finished (having generated `tokens`): its room goes to the queue."""
        self.outstanding -= 1
        if hold is not None:
            hold.done = True
            if hold.due:
                self.due -= 1
            if tokens > 0:
                self._learn((asyncio.get_running_loop().time() - hold.start) / tokens)
        if self.queued:
            self._departures.append(time.monotonic())
            self._dispatch()

    def _learn(self, rate: float) -> None:
        """The fastest of the recent requests is one that started at once: the others waited in the engine."""
        self._rates.append(rate)
        self._learned += 1
        if not self.per_token or rate < self.per_token or self._learned % 16 == 0:
            self.per_token = min(self._rates)

    def set_engine_waiting(self, waiting: int) -> None:
        """The engine's own waiting queue, scraped: dispatch if it fell below the threshold."""
        self.engine_waiting = waiting
        if self.queued:
            self._dispatch()

    def _dispatch(self) -> None:
        for queue in self._ordered:
            while queue.stats.depth and self._room(queue.cls):
                waiter = queue.pop()
                self.queued -= queue.discarded
                queue.discarded = 0
                if waiter is None:
                    break
                self.queued -= 1
                self.outstanding += 1
                waiter.future.set_result(None)
            if queue.stats.depth:
                return  # strict order: nothing of a lower class overtakes a waiting higher one

    def _forget(self, queue: _ClassQueue, waiter: _Waiter) -> None:
        if not waiter.future.done():
            waiter.future.cancel()
        if queue.remove(waiter):
            self.queued -= 1
        if not self.queued:
            return
        self._dispatch()  # a departure at the head may let the next class's request in

    def _evict_below(self, cls: PriorityClass) -> bool:
        """Make room for `cls` by shedding the newest waiter of the lowest class below it; False if none."""
        for queue in reversed(self._ordered):
            if queue.cls.order <= cls.order:
                return False
            victim = queue.newest()
            if victim is not None and queue.remove(victim):
                self.queued -= 1
                queue.stats.shed[Shed.EVICTED] += 1
                victim.future.set_exception(Refused(Shed.EVICTED, self._retry_after()))
                return True
        return False

    def _retry_after(self) -> int:
        """Seconds until the queue ahead would have drained at the observed rate (1 to 60)."""
        samples = self._departures
        span = time.monotonic() - samples[0] if len(samples) > 1 else 0.0
        if span <= 0 or span > 60:
            return 5  # no recent measure: a short, honest guess
        rate = len(samples) / span
        return max(1, min(60, math.ceil((self.queued + 1) / rate)))
