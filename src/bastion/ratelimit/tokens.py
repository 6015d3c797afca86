"""Tokens per minute: reserved at admission, settled to real usage at the end, exactly.

The window is `limits`' sliding window counter (two counters per key: this minute and
the previous one, weighted by how much of it still overlaps the rolling minute), on the
same keys as the library's, but with the two operations the library lacks:

- `reserve(amount)`: admit only if `weighted count + amount <= limit`, and add `amount`,
  in one atomic step (memory: synchronous in the event loop; Redis: one Lua script);
- `settle(ticket, delta)`: add `actual - reserved` (negative: a refund) to the counter
  the reservation went into, even after that counter became the previous window. The
  ticket names it: the window index in memory; in Redis the current counter's expiry
  time, which a rotation (RENAME to the previous key) keeps, so it identifies the window.
  A reservation whose window expired (a request longer than two minutes) is settled by
  charging the actual usage into the current window.

A charge may take the window past its limit (usage above the reservation is charged in
full); the next reservations then wait until enough of it has aged out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, cast

from ..redisio import Redis, Reply, Script
from .memory import MemoryStorage


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window counter's state: the two counts, and their TTLs in seconds (as `limits` reports them)."""

    previous: int
    previous_ttl: float
    current: int
    current_ttl: float

    def weighted(self, expiry: int) -> float:
        return self.previous * self.previous_ttl / expiry + self.current

    def remaining(self, limit: int, expiry: int) -> int:
        return max(0, limit - math.floor(self.weighted(expiry)))

    def reset_in(self, expiry: int) -> float:
        """Seconds until the weighted count next decreases (as `limits` reports it); 0 when empty."""
        candidates = []
        if self.previous:
            candidates.append(self.previous_ttl % (expiry / self.previous))
        if self.current:
            candidates.append(self.current_ttl % expiry)
        return min(candidates, default=0.0)

    def fits_in(self, amount: int, limit: int, expiry: int) -> float:
        """Seconds until `amount` more fits under `limit`, if nothing else is counted meanwhile."""
        room = limit - amount
        if room < 0:
            return float(expiry) * 2  # never: callers clamp reservations to the limit
        if self.current <= room:
            if self.previous == 0 or self.weighted(expiry) <= room:
                return 0.0
            return max(0.0, self.previous_ttl - (room - self.current) * expiry / self.previous)
        # The current minute alone is too full: wait until it has become the previous one and faded enough.
        rotation = max(0.0, self.current_ttl - expiry)
        return rotation + expiry * (1 - room / self.current)


@dataclass(frozen=True, slots=True)
class Reservation:
    admitted: bool
    ticket: int  # which counter the amount went into (0: none)
    window: Window  # after the reservation


class TokenWindows(Protocol):
    async def reserve(self, key: str, limit: int, expiry: int, amount: int) -> Reservation: ...

    async def settle(self, key: str, expiry: int, ticket: int, delta: int, actual: int) -> None: ...


class MemoryTokens:
    """Token windows in this process, on bastion's memory storage (one event loop: atomic)."""

    def __init__(self, storage: MemoryStorage) -> None:
        self._storage = storage

    async def reserve(self, key: str, limit: int, expiry: int, amount: int) -> Reservation:
        return self.reserve_now(key, limit, expiry, amount)

    async def settle(self, key: str, expiry: int, ticket: int, delta: int, actual: int) -> None:
        self._storage.settle_sliding_window(key, expiry, ticket, delta, actual)

    # The same, as plain calls: the limiter's memory path (no coroutine per request for what never waits).
    def reserve_now(self, key: str, limit: int, expiry: int, amount: int) -> Reservation:
        admitted, window, counts = self._storage.reserve_sliding_window(key, limit, expiry, amount)
        return Reservation(admitted, window, Window(*counts))

    def settle_now(self, key: str, expiry: int, ticket: int, delta: int, actual: int) -> None:
        self._storage.settle_sliding_window(key, expiry, ticket, delta, actual)


# KEYS: previous and current counters; ARGV: limit, expiry seconds, amount. Rotates like `limits`'
# scripts, then admits and adds if the weighted count leaves room. Returns {admitted, ticket (the
# current counter's expiry time, ms), previous count, previous ttl ms, current count, current ttl ms}.
_RESERVE = """
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2]) * 1000
local amount = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
  redis.call('rename', KEYS[2], KEYS[1])
  redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local previous_count = tonumber(redis.call('get', KEYS[1])) or 0
local previous_ttl = math.max(tonumber(redis.call('pttl', KEYS[1])), 0)
local current_count = tonumber(redis.call('get', KEYS[2])) or 0
current_ttl = math.max(tonumber(redis.call('pttl', KEYS[2])), 0)
local admitted = 0
if math.floor(previous_count * previous_ttl / expiry) + current_count + amount <= limit then
  admitted = 1
  if amount > 0 then
    if current_ttl > 0 then
      current_count = redis.call('incrby', KEYS[2], amount)
    else
      redis.call('set', KEYS[2], amount, 'PX', expiry * 2)
      current_count = amount
      current_ttl = expiry * 2
    end
  end
end
local ticket = 0
if current_ttl > 0 then
  ticket = now + current_ttl
end
return {admitted, ticket, previous_count, previous_ttl, current_count, current_ttl}
"""

# KEYS: previous and current counters; ARGV: expiry seconds, ticket, delta, actual. Adds delta to the
# counter whose expiry time is the ticket's (windows' expiry times are a whole window apart), never
# below 0; with neither alive, charges `actual` into the current window.
_SETTLE = """
local expiry = tonumber(ARGV[1]) * 1000
local ticket = tonumber(ARGV[2])
local delta = tonumber(ARGV[3])
local actual = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
  redis.call('rename', KEYS[2], KEYS[1])
  redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
  current_ttl = current_ttl + expiry
end
local previous_ttl = tonumber(redis.call('pttl', KEYS[1]))
for i, pair in ipairs({{KEYS[2], current_ttl}, {KEYS[1], previous_ttl}}) do
  if ticket > 0 and pair[2] > 0 and math.abs(now + pair[2] - ticket) < expiry / 2 then
    if redis.call('incrby', pair[1], delta) < 0 then
      redis.call('set', pair[1], 0, 'KEEPTTL')
    end
    return i
  end
end
if actual > 0 then
  if current_ttl > 0 then
    redis.call('incrby', KEYS[2], actual)
  else
    redis.call('set', KEYS[2], actual, 'PX', expiry * 2)
  end
end
return 0
"""


class RedisTokens:
    """Token windows shared through Redis, on the keys `limits`' Redis storage uses for the same window."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._prefix = prefix
        self._reserve = client.script(_RESERVE)
        self._settle = client.script(_SETTLE)

    def scripts(self) -> list[Script]:
        return [self._reserve, self._settle]

    def _keys(self, key: str) -> list[str]:
        current = f"{self._prefix}:{{{key}}}"
        return [current + "/-1", current]

    async def reserve(self, key: str, limit: int, expiry: int, amount: int) -> Reservation:
        return self.reservation(await self._reserve(self._keys(key), [limit, expiry, amount]))

    def reserve_call(self, key: str, limit: int, expiry: int, amount: int) -> tuple[bytes, Script]:
        """The reservation as a command for `Redis.pipeline` (its reply read by `reservation`)."""
        return self._reserve.command(self._keys(key), [limit, expiry, amount]), self._reserve

    @staticmethod
    def reservation(reply: Reply) -> Reservation:
        admitted, ticket, previous, previous_ttl, current, current_ttl = cast(list[int], reply)
        window = Window(previous, previous_ttl / 1000, current, current_ttl / 1000)
        return Reservation(bool(admitted), ticket, window)

    async def settle(self, key: str, expiry: int, ticket: int, delta: int, actual: int) -> None:
        await self._settle(self._keys(key), [expiry, ticket, delta, actual])

    def settle_call(self, key: str, expiry: int, ticket: int, delta: int, actual: int) -> tuple[bytes, Script]:
        """The settlement as a command for `Redis.pipeline`."""
        return self._settle.command(self._keys(key), [expiry, ticket, delta, actual]), self._settle
