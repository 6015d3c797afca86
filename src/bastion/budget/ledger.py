"""The budget ledger: reserve before forwarding, settle from real usage, release on error.

`reserve` checks every budget that applies (each period, all models and the
request's model) and counts the tokens in one step, so concurrent requests can
never overshoot: a reservation that does not fit is refused, with the time the
binding budget resets. `settle` replaces the reservation by the tokens the
engine reported; `release` drops it. Tokens count in the periods and hour where
they were reserved, so a request admitted at 23:59:59 is day 1's, however long
it runs.

`Ledger` keeps every principal's period totals in memory, so a check costs no
I/O and no await (one event loop: nothing can interleave between the check and
the count). With a `Journal` (SQLite, `sqlite.py`) the totals are loaded at
start, and settled usage is batched as (principal, model, hour) roll-ups and
written off the event loop every `flush_interval` seconds and at shutdown. The
Redis ledger (`redis.py`) keeps the same contract for several gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .calendar import Calendar, Windows
from .policy import PERIODS, Budget, Period

log = logging.getLogger("bastion.budget")

Row = tuple[str, str, int, int]
"""A roll-up: principal id, model, local hour start (Unix seconds), tokens."""
Scope = str | None  # None: all models; else one model
PRUNE_EVERY = 3600.0  # seconds between retention passes
_ZERO = (0, 0, 0)


# Built on every request: plain slots dataclasses (a frozen one costs three times as much to create).
@dataclass(slots=True)
class Reservation:
    """Tokens held for one request, and where they count (its hour and period starts)."""

    principal_id: str
    model: str
    tokens: int
    hour: int
    starts: tuple[int, int, int]


@dataclass(slots=True)
class Standing:
    """An enforced budget right after a reservation: what is left and when it resets."""

    budget: Budget
    remaining: int
    reset: int
    reset_text: str


@dataclass(slots=True)
class Admitted:
    reservation: Reservation
    standings: list[Standing]  # one per enforced budget; empty when none applies

    @property
    def tightest(self) -> Standing | None:
        """The budget closest to running out (on a tie, the one that resets last)."""
        best: Standing | None = None
        for s in self.standings:
            if best is None or s.remaining < best.remaining or (s.remaining == best.remaining and s.reset > best.reset):
                best = s
        return best


@dataclass(frozen=True, slots=True)
class Refused:
    """No room: `budget` has `used` of its tokens counted and the request wanted `tokens` more."""

    budget: Budget
    used: int
    tokens: int
    reset: int  # when every refusing budget has reset
    reset_text: str


@dataclass(slots=True)
class EarlyReservation:
    """A reservation issued by the stage before the budget stage (so it shares that stage's last Redis write),
    at `now`; the budget stage claims it (takes it off the exchange) and awaits its verdict instead of asking."""

    now: float
    verdict: Awaitable[Admitted | Refused]


async def ready(verdict: Admitted | Refused) -> Admitted | Refused:
    """A verdict already known, as the awaitable `reserve_soon` returns."""
    return verdict


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    period: Period
    model: str | None  # None: all models
    start: int
    reset: int
    used: int  # settled from real usage
    reserved: int  # held by requests in flight
    limit: int | None  # None: no budget

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class UsageReport:
    principal_id: str
    periods: tuple[PeriodUsage, ...]
    by_model: dict[str, tuple[int, int, int]]  # settled tokens per model: day, week, month


class LedgerUnavailable(Exception):
    """The ledger's storage did not answer (Redis down): the caller fails open or closed."""


class BudgetLedger(Protocol):
    """What the request path and `GET /v1/usage` need; memory/SQLite and Redis ledgers provide it."""

    calendar: Calendar

    async def reserve(
        self, principal_id: str, model: str, tokens: int, budgets: Sequence[Budget], now: float
    ) -> Admitted | Refused: ...

    def reserve_soon(
        self, principal_id: str, model: str, tokens: int, budgets: Sequence[Budget], now: float
    ) -> Awaitable[Admitted | Refused]:
        """`reserve` issued now (on Redis: queued on the shared connection, leaving with whatever else this loop
        iteration queues); its verdict awaited later. The awaitable must be awaited."""
        ...

    async def settle(self, reservation: Reservation, used: int) -> None: ...

    def settle_soon(self, reservation: Reservation, used: int) -> Awaitable[None] | None:
        """`settle` started now: done (None), or issued to the storage, the awaitable waiting for it (so that
        another stage's call can leave in the same write before either is awaited)."""
        ...

    async def release(self, reservation: Reservation) -> None: ...

    async def usage(self, principal_id: str, budgets: Sequence[Budget], now: float) -> UsageReport: ...

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered for the gateway's lifetime: loads state, flushes in the background and at the end."""
        ...


class Journal(Protocol):
    """Where roll-ups persist (SQLite); every call runs off the event loop."""

    async def open(self, since: int) -> list[Row]:
        """Open the store and return the roll-ups of hours at or after `since`."""
        ...

    async def write(self, rows: list[Row]) -> None:
        """Add these tokens to the stored roll-ups (in one transaction)."""
        ...

    async def prune(self, before: int) -> int:
        """Delete roll-ups of hours before `before`; how many."""
        ...

    async def close(self) -> None: ...


class _Account:
    """One principal's counts in the current periods, per scope (all models: None, or a model) as
    [day, week, month] lists: `totals` include reservations, `settled` only what the engine reported."""

    __slots__ = ("settled", "starts", "totals")

    def __init__(self, starts: tuple[int, int, int]) -> None:
        self.starts = starts
        self.totals: dict[Scope, list[int]] = {None: [0, 0, 0]}
        self.settled: dict[Scope, list[int]] = {None: [0, 0, 0]}

    def roll(self, starts: tuple[int, int, int]) -> None:
        """Start afresh in every period that has changed since the last request."""
        for p in range(3):
            if starts[p] != self.starts[p]:
                for counts in (*self.totals.values(), *self.settled.values()):
                    counts[p] = 0
        self.starts = starts


class Ledger:
    """Period totals in memory, optionally journaled (see the module docstring)."""

    def __init__(
        self,
        calendar: Calendar,
        journal: Journal | None = None,
        *,
        flush_interval: float = 1.0,
        retention: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.calendar = calendar
        self._journal = journal
        self._flush_interval = flush_interval
        self._retention = retention  # seconds of roll-ups kept; None: all
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self._dirty: dict[tuple[str, str, int], int] = {}  # settled roll-ups not yet written
        self.flush_errors = 0

    # --- the request path -----------------------------------------------------------------
    async def reserve(
        self, principal_id: str, model: str, tokens: int, budgets: Sequence[Budget], now: float
    ) -> Admitted | Refused:
        return self.reserve_now(principal_id, model, tokens, budgets, now)

    def reserve_soon(
        self, principal_id: str, model: str, tokens: int, budgets: Sequence[Budget], now: float
    ) -> Awaitable[Admitted | Refused]:
        return ready(self.reserve_now(principal_id, model, tokens, budgets, now))

    def reserve_now(
        self, principal_id: str, model: str, tokens: int, budgets: Sequence[Budget], now: float
    ) -> Admitted | Refused:
        """`reserve` without the coroutine: check and count in one synchronous step."""
        windows = self.calendar.at(now)
        account = self._account(principal_id, windows)
        totals = account.totals
        everything = totals[None]
        mine = totals.get(model)
        if mine is None:
            mine = totals[model] = [0, 0, 0]
        standings: list[Standing] = []
        refusing: list[tuple[Budget, int, int]] | None = None
        for budget in budgets:
            scope = budget.model
            if scope is None:
                counts = everything
            elif scope == model:
                counts = mine
            else:
                continue
            p = budget.ordinal
            left = budget.tokens - counts[p]
            if tokens > left and tokens > 0:
                refusing = refusing or []
                refusing.append((budget, counts[p], windows.resets[p]))
            elif refusing is None:
                standings.append(Standing(budget, left - tokens, windows.resets[p], windows.reset_texts[p]))
        if refusing is not None:
            if mine == [0, 0, 0] and model not in account.settled:
                del totals[model]  # made-up model names leave nothing behind
            return self._refusal(refusing, tokens)
        if tokens:
            everything[0] += tokens
            everything[1] += tokens
            everything[2] += tokens
            mine[0] += tokens
            mine[1] += tokens
            mine[2] += tokens
        return Admitted(Reservation(principal_id, model, tokens, windows.hour, windows.starts), standings)

    def _refusal(self, refusing: list[tuple[Budget, int, int]], tokens: int) -> Refused:
        """The budget furthest from fitting names the refusal; the request fits again once all have reset."""
        budget, used, _ = min(refusing, key=lambda r: r[0].tokens - r[1])
        reset = max(r[2] for r in refusing)
        return Refused(budget, used, tokens, reset, self.calendar.text(reset))

    async def settle(self, reservation: Reservation, used: int) -> None:
        self.settle_now(reservation, used)

    async def release(self, reservation: Reservation) -> None:
        self.settle_now(reservation, 0)

    def settle_soon(self, reservation: Reservation, used: int) -> Awaitable[None] | None:
        self.settle_now(reservation, used)
        return None

    def settle_now(self, reservation: Reservation, used: int) -> None:
        """Replace the reservation by `used` tokens, in the periods where it was made."""
        used = max(0, used)
        r = reservation
        account = self._accounts.get(r.principal_id)
        if account is not None:
            delta = used - r.tokens
            starts = account.starts
            current = (0, 1, 2) if starts == r.starts else [p for p in range(3) if starts[p] == r.starts[p]]
            everything = account.totals[None]
            mine = account.totals.get(r.model)
            if mine is None:
                mine = account.totals[r.model] = [0, 0, 0]
            for p in current:  # a period that has ended since the reservation has no counts left
                everything[p] += delta
                mine[p] += delta
            if used:
                settled_all = account.settled[None]
                settled_mine = account.settled.get(r.model)
                if settled_mine is None:
                    settled_mine = account.settled[r.model] = [0, 0, 0]
                for p in current:
                    settled_all[p] += used
                    settled_mine[p] += used
            elif mine == [0, 0, 0] and r.model not in account.settled:
                del account.totals[r.model]  # made-up model names leave nothing behind
        if used and self._journal is not None:
            key = (r.principal_id, r.model, r.hour)
            self._dirty[key] = self._dirty.get(key, 0) + used

    # --- reading --------------------------------------------------------------------------
    async def usage(self, principal_id: str, budgets: Sequence[Budget], now: float) -> UsageReport:
        windows = self.calendar.at(now)
        account = self._account(principal_id, windows)
        periods: list[PeriodUsage] = []
        for period in PERIODS:
            p = period.ordinal
            scopes: list[Scope] = [None, *sorted({b.model for b in budgets if b.period is period and b.model})]
            for scope in scopes:
                limit = next((b.tokens for b in budgets if b.period is period and b.model == scope), None)
                settled = account.settled.get(scope, _ZERO)[p]
                total = account.totals.get(scope, _ZERO)[p]
                periods.append(
                    PeriodUsage(period, scope, windows.starts[p], windows.resets[p], settled, total - settled, limit)
                )
        by_model = {m: (c[0], c[1], c[2]) for m, c in account.settled.items() if m is not None and any(c)}
        return UsageReport(principal_id, tuple(periods), dict(sorted(by_model.items())))

    def _account(self, principal_id: str, windows: Windows) -> _Account:
        account = self._accounts.get(principal_id)
        if account is None:
            account = self._accounts[principal_id] = _Account(windows.starts)
        elif account.starts != windows.starts:
            account.roll(windows.starts)
        return account

    # --- persistence ----------------------------------------------------------------------
    def load(self, rows: Sequence[Row], now: float) -> None:
        """Count stored roll-ups into the current periods (at start, before any request)."""
        windows = self.calendar.at(now)
        for principal_id, model, hour, tokens in rows:
            account = self._account(principal_id, windows)
            for counts in (account.totals, account.settled):
                for scope in (None, model):
                    found = counts.get(scope)
                    if found is None:
                        found = counts[scope] = [0, 0, 0]
                    for p in range(3):
                        if windows.starts[p] <= hour < windows.resets[p]:
                            found[p] += tokens

    async def flush(self) -> None:
        """Write the settled roll-ups gathered since the last flush; kept for the next one on failure."""
        if self._journal is None or not self._dirty:
            return
        batch, self._dirty = self._dirty, {}
        try:
            await self._journal.write([(p, m, h, t) for (p, m, h), t in batch.items()])
        except Exception as exc:
            for key, tokens in batch.items():
                self._dirty[key] = self._dirty.get(key, 0) + tokens
            self.flush_errors += 1
            log.error("usage not written (kept in memory, retried in %.0fs): %s", self._flush_interval, exc)

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._running()

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        journal = self._journal
        if journal is None:
            yield
            return
        windows = self.calendar.at(self._clock())
        try:
            rows = await journal.open(min(windows.starts))
        except BaseException:
            await journal.close()
            raise
        self.load(rows, self._clock())
        await self._prune(journal)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._flusher(journal, stop))
        try:
            yield
        finally:
            stop.set()
            await task
            await self.flush()
            await journal.close()

    async def _flusher(self, journal: Journal, stop: asyncio.Event) -> None:
        pruned = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._flush_interval)
            await self.flush()
            if time.monotonic() - pruned >= PRUNE_EVERY:
                pruned = time.monotonic()
                await self._prune(journal)

    async def _prune(self, journal: Journal) -> None:
        if self._retention is None:
            return
        try:
            gone = await journal.prune(self.calendar.hour_of(self._clock()) - int(self._retention))
        except Exception as exc:
            log.error("usage retention pass failed: %s", exc)
            return
        if gone:
            log.info("usage retention: %d hourly roll-ups deleted", gone)
