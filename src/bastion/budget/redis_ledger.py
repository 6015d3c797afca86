"""The budget ledger in Redis, for several gateways sharing budgets exactly.

One Lua script per request does what the memory ledger does in one step: read
every applicable budget's count, refuse if the reservation does not fit in any
of them, else count it in every period. Redis runs a script alone, so two
gateways can never both take the last tokens. A second script settles (or
releases) and adds the hour roll-up in the same step.

Keys (prefix `bastion:budget:`):
- `p:<principal>:<period>:<start>`, a hash per principal and period: `t` (tokens
  counted, reservations included) and `s` (settled), and `t:<model>`/`s:<model>`
  per model. It expires a day after the period resets.
- `h:<principal>:<utc day>`, a hash of hour roll-ups `<hour>:<model>` -> tokens,
  expiring `retention` after its day: old hours go by themselves.
- `principals`, a sorted set of principals by latest hour with usage (for
  `bastion usage`), trimmed to the retention hourly.

A reservation whose gateway died before settling stays counted until its period
ends (the safe side). Gateways choose periods by their own clock: keep them in
NTP sync. Redis Cluster is not supported (the scripts touch several keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

from ..background import background
from ..redisio import Redis, RedisUnavailable, Reply, Script
from .calendar import Calendar, Windows
from .ledger import (
    PRUNE_EVERY,
    Admitted,
    LedgerUnavailable,
    PeriodUsage,
    Refused,
    Reservation,
    Row,
    Standing,
    UsageReport,
    ready,
)
from .policy import PERIODS, Budget

log = logging.getLogger("bastion.budget")
PREFIX = "bastion:budget:"
PERIOD_GRACE = 86400  # seconds a period's counts outlive its reset (late settles still land)
DAY = 86400

# KEYS: the day, week and month hashes. ARGV: tokens, model, the three hashes' expiry (Unix seconds),
# the number of budgets, then per budget: period (1-3), field, limit. Returns {refused (0/1), used per budget...}.
_RESERVE = """
local n = tonumber(ARGV[1])
local count = tonumber(ARGV[6])
local out = {0}
for i = 1, count do
  local at = 6 + (i - 1) * 3
  local used = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[at + 1])], ARGV[at + 2]) or '0')
  out[i + 1] = used
  if n > 0 and used + n > tonumber(ARGV[at + 3]) then out[1] = 1 end
end
if out[1] == 0 and n > 0 then
  for p = 1, 3 do
    redis.call('HINCRBY', KEYS[p], 't', n)
    redis.call('HINCRBY', KEYS[p], 't:' .. ARGV[2], n)
    redis.call('EXPIREAT', KEYS[p], ARGV[2 + p])
  end
end
return out
"""

# KEYS: the day, week and month hashes, the hour roll-up hash, the principal index.
# ARGV: reserved, used, model, hour, the three hashes' expiry, the roll-up hash's expiry, principal.
_SETTLE = """
local n = tonumber(ARGV[1])
local u = tonumber(ARGV[2])
local d = u - n
local m = ARGV[3]
for p = 1, 3 do
  if d ~= 0 then
    redis.call('HINCRBY', KEYS[p], 't', d)
    local left = redis.call('HINCRBY', KEYS[p], 't:' .. m, d)
    if left == 0 and u == 0 and redis.call('HEXISTS', KEYS[p], 's:' .. m) == 0 then
      redis.call('HDEL', KEYS[p], 't:' .. m)
    end
  end
  if u > 0 then
    redis.call('HINCRBY', KEYS[p], 's', u)
    redis.call('HINCRBY', KEYS[p], 's:' .. m, u)
  end
  if d ~= 0 or u > 0 then redis.call('EXPIREAT', KEYS[p], ARGV[4 + p]) end
end
if u > 0 then
  redis.call('HINCRBY', KEYS[4], ARGV[4] .. ':' .. m, u)
  redis.call('EXPIREAT', KEYS[4], ARGV[8])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[9])
end
return 1
"""

# KEYS: hashes to read. Returns one flat HGETALL array per key.
_READ = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
"""


def connect(url: str, timeout: float) -> Redis:
    """bastion's lean client, which never re-sends a call by itself: a retried script could count a request twice."""
    return Redis.from_url(url, timeout)


class RedisLedger:
    """The `BudgetLedger` contract on Redis (see the module docstring)."""

    def __init__(
        self,
        client: Redis,
        calendar: Calendar,
        *,
        retention: float | None = None,
        prefix: str = PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.calendar = calendar
        self._client = client
        self._retention = retention
        self._prefix = prefix
        self._clock = clock
        self.errors = 0
        self._reserve = client.script(_RESERVE)
        self._settle = client.script(_SETTLE)
        self._read = client.script(_READ)

    def _period_keys(self, principal_id: str, starts: Sequence[int]) -> list[str]:
        base = f"{self._prefix}p:{principal_id}:"
        return [f"{base}{period.value}:{start}" for period, start in zip(PERIODS, starts, strict=True)]

    async def reserve(
        self, principal_id: str, model: str, tokens: int, budgets: Sequence[Budget], now: float
    ) -> Admitted | Refused:
        return await self.reserve_soon(principal_id, model, tokens, budgets, now)

    def reserve_soon(
        self, principal_id: str, model: str, tokens: int, budgets: Sequence[Budget], now: float
    ) -> Awaitable[Admitted | Refused]:
        windows = self.calendar.at(now)
        applied = [b for b in budgets if b.model is None or b.model == model]
        if not applied and tokens <= 0:  # nothing to check, nothing to count
            return ready(Admitted(Reservation(principal_id, model, 0, windows.hour, windows.starts), []))
        args: list[str | int] = [tokens, model, *(r + PERIOD_GRACE for r in windows.resets), len(applied)]
        for budget in applied:
            args += [budget.ordinal + 1, "t" if budget.model is None else "t:" + budget.model, budget.tokens]
        command = self._reserve.command(self._period_keys(principal_id, windows.starts), args)
        issued = self._client.issue(command)
        return self._reserved(issued, command, principal_id, model, tokens, applied, windows)

    async def _reserved(
        self,
        issued: asyncio.Future[Reply] | None,
        command: bytes,
        principal_id: str,
        model: str,
        tokens: int,
        applied: list[Budget],
        windows: Windows,
    ) -> Admitted | Refused:
        reply = cast(list[int], await self._guard(self._reserve.reply(issued, command)))
        refused, used = reply[0], reply[1:]
        if refused:
            return self._refusal(applied, used, tokens, windows)
        standings = [
            Standing(b, b.tokens - u - tokens, windows.resets[b.ordinal], windows.reset_texts[b.ordinal])
            for b, u in zip(applied, used, strict=True)
        ]
        return Admitted(Reservation(principal_id, model, tokens, windows.hour, windows.starts), standings)

    def _refusal(self, applied: list[Budget], used: list[int], tokens: int, windows: Windows) -> Refused:
        refusing = [(b, u) for b, u in zip(applied, used, strict=True) if u + tokens > b.tokens]
        budget, spent = min(refusing, key=lambda r: r[0].tokens - r[1])
        reset = max(windows.resets[b.ordinal] for b, _ in refusing)
        return Refused(budget, spent, tokens, reset, self.calendar.text(reset))

    async def settle(self, reservation: Reservation, used: int) -> None:
        waiting = self.settle_soon(reservation, used)
        if waiting is not None:
            await waiting

    def settle_soon(self, reservation: Reservation, used: int) -> Awaitable[None] | None:
        """Queue the settle on the shared connection now (it leaves with whatever else this loop iteration
        queues: the limiter's settle, at the end of the same request); the awaitable waits for its reply.
        Redis unreachable: logged as a lost settle (counted in `errors`), as `settle` always did."""
        r = reservation
        used = max(0, used)
        if not used and not r.tokens:
            return None
        resets = self.calendar.at(r.hour).resets
        day = r.hour - r.hour % DAY
        keys = [
            *self._period_keys(r.principal_id, r.starts),
            f"{self._prefix}h:{r.principal_id}:{day}",
            self._prefix + "principals",
        ]
        keep_until = day + DAY + int(self._retention) if self._retention is not None else day + 400 * DAY
        args: list[str | int] = [r.tokens, used, r.model, r.hour, *(x + PERIOD_GRACE for x in resets), keep_until]
        args.append(r.principal_id)
        command = self._settle.command(keys, args)
        return self._settled(self._client.issue(command), command)

    async def _settled(self, issued: asyncio.Future[Reply] | None, command: bytes) -> None:
        try:
            await self._guard(self._settle.reply(issued, command))
        except LedgerUnavailable as exc:
            log.error("budget settle lost (Redis unreachable): %s", exc.__cause__ or exc)

    async def release(self, reservation: Reservation) -> None:
        await self.settle(reservation, 0)

    async def usage(self, principal_id: str, budgets: Sequence[Budget], now: float) -> UsageReport:
        windows = self.calendar.at(now)
        keys = self._period_keys(principal_id, windows.starts)
        counts = [_pairs(reply) for reply in cast(list[list[bytes]], await self._call(self._read, keys, []))]
        periods: list[PeriodUsage] = []
        for period in PERIODS:
            p = period.ordinal
            scopes: list[str | None] = [None, *sorted({b.model for b in budgets if b.period is period and b.model})]
            for scope in scopes:
                limit = next((b.tokens for b in budgets if b.period is period and b.model == scope), None)
                suffix = "" if scope is None else ":" + scope
                settled = counts[p].get("s" + suffix, 0)
                total = counts[p].get("t" + suffix, 0)
                periods.append(
                    PeriodUsage(period, scope, windows.starts[p], windows.resets[p], settled, total - settled, limit)
                )
        day, week, month = counts
        models = sorted({f[2:] for c in counts for f in c if f.startswith("s:")})
        by_model = {m: (day.get("s:" + m, 0), week.get("s:" + m, 0), month.get("s:" + m, 0)) for m in models}
        return UsageReport(principal_id, tuple(periods), by_model)

    async def rows(self, since: int, principal: str | None = None, now: float | None = None) -> list[Row]:
        """Hour roll-ups at or after `since` (`bastion usage`), one round trip per principal."""
        now = self._clock() if now is None else now
        index = self._prefix + "principals"
        if principal is None:
            members = await self._guard(self._client.execute(b"ZRANGEBYSCORE", index, since, b"+inf"))
            principals = sorted(m.decode() for m in cast(list[bytes], members))
        else:
            principals = [principal]
        days = range(since - since % DAY, int(now) + 1, DAY)
        out: list[Row] = []
        for pid in principals:
            keys = [f"{self._prefix}h:{pid}:{day}" for day in days]
            replies = cast(list[list[bytes]], await self._call(self._read, keys, []))
            for reply in replies:
                for field, tokens in _pairs(reply).items():
                    hour_text, _, model = field.partition(":")
                    if int(hour_text) >= since:
                        out.append((pid, model, int(hour_text), tokens))
        return sorted(out, key=lambda row: (row[2], row[0], row[1]))

    async def prune_index(self, now: float) -> int:
        if self._retention is None:
            return 0
        before = int(now - self._retention)
        index = self._prefix + "principals"
        return int(await self._guard(self._client.execute(b"ZREMRANGEBYSCORE", index, b"-inf", before)))

    async def _call(self, script: Script, keys: list[str], args: list[str | int]) -> Any:
        # EVALSHA, loading the script on NOSCRIPT (first use, a restarted Redis): an error reply leaves the
        # shared connection and the calls in flight on it alone.
        return await self._guard(script(keys, args))

    async def _guard(self, call: Awaitable[Reply]) -> Any:
        """Redis out of reach is `LedgerUnavailable` (the fail mode decides); an error reply to a script
        (`ReplyError`: a key of the wrong type, a script bug) is a bug and propagates, as in the limiter."""
        try:
            return await call
        except (TimeoutError, RedisUnavailable, OSError) as exc:
            self.errors += 1
            # The client's own words (they never hold the URL or its password): what an operator can act on.
            reason = str(exc) if isinstance(exc, RedisUnavailable) and str(exc) else type(exc).__name__
            raise LedgerUnavailable(f"budget storage (Redis) unreachable: {reason}") from exc

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._running()

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """The index trimmer. The client is not closed here: it is its builder's (the gateway shares one
        connection between the ledger and the rate limiter, and closes it once both have stopped)."""
        async with background(self._maintain):
            yield

    async def _maintain(self) -> None:
        while True:
            try:
                await self.prune_index(self._clock())
            except LedgerUnavailable as exc:
                log.debug("usage index not trimmed: %s", exc)
            await asyncio.sleep(PRUNE_EVERY)


def _pairs(flat: list[bytes]) -> dict[str, int]:
    """A flat HGETALL reply as {field: int}."""
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
