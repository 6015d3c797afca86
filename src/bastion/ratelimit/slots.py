"""Concurrency slots: how many requests of one principal are in flight right now.

Not a window: a slot is taken when a request is admitted and given back when it
ends. In memory that is a plain counter. In Redis each key is a sorted set whose
members are slot ids scored by their expiry time (Redis server clock); a running
gateway pushes the expiry of its own live slots forward every `ttl / 3` seconds,
so the slots of a replica that crashed (and never released them) expire after
at most `ttl` seconds instead of leaking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Protocol

from ..background import background
from ..redisio import Redis, Script
from ..redisio.resp import encode

log = logging.getLogger("bastion.ratelimit")

# KEYS[1]: the slot set; ARGV: limit, ttl seconds, slot id. 1 = taken, 0 = full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return 1
"""

# KEYS[1]: the slot set; ARGV: ttl seconds, slot ids still running here.
_REFRESH = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


class Slots(Protocol):
    async def acquire(self, key: str, limit: int) -> str | None:
        """A slot id, or None when `limit` requests of `key` are already in flight."""

    async def release(self, key: str, slot: str) -> None: ...

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered for the gateway's lifetime (Redis: keeps this process's slots alive)."""


class MemorySlots:
    """One process: a counter per key."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    async def acquire(self, key: str, limit: int) -> str | None:
        return self.acquire_now(key, limit)

    async def release(self, key: str, slot: str) -> None:
        self.release_now(key, slot)

    # The same, as plain calls: the limiter's memory path (no coroutine per request for what never waits).
    def acquire_now(self, key: str, limit: int) -> str | None:
        count = self._counts.get(key, 0)
        if count >= limit:
            return None
        self._counts[key] = count + 1
        return key

    def release_now(self, key: str, slot: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _nothing()


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


class RedisSlots:
    """Shared between gateways: one sorted set per key, slots expiring unless refreshed."""

    def __init__(self, client: Redis, ttl: float, prefix: str = "bastion:slots:") -> None:
        self._client = client
        self._ttl = ttl
        self._prefix = prefix
        self._acquire = client.script(_ACQUIRE)
        self._refresh = client.script(_REFRESH)
        self._mine: defaultdict[str, set[str]] = defaultdict(set)
        self._next = 0
        self._tag = os.urandom(6).hex()

    def scripts(self) -> list[Script]:
        return [self._acquire, self._refresh]

    async def acquire(self, key: str, limit: int) -> str | None:
        self._next += 1
        slot = f"{self._tag}:{self._next}"
        full_key = self._prefix + key
        # Registered before the await so a refresh running meanwhile cannot miss it.
        self._mine[full_key].add(slot)
        try:
            taken = await self._acquire([full_key], [limit, self._ttl, slot])
        except BaseException:
            self._forget(full_key, slot)
            raise
        if not taken:
            self._forget(full_key, slot)
            return None
        return slot

    def acquire_call(self, key: str, limit: int) -> tuple[tuple[bytes, Script], str]:
        """`acquire` as a command for `Redis.pipeline`, and the slot it asks for (registered here at once, like
        `acquire`): pass the reply to `acquired`, or call `forget` if it never comes."""
        self._next += 1
        slot = f"{self._tag}:{self._next}"
        full_key = self._prefix + key
        self._mine[full_key].add(slot)
        return (self._acquire.command([full_key], [limit, self._ttl, slot]), self._acquire), slot

    def acquired(self, key: str, slot: str, reply: object) -> bool:
        """Whether `acquire_call`'s reply took the slot (a failure did not: forgotten, like a full set)."""
        if isinstance(reply, BaseException) or not reply:
            self.forget(key, slot)
            return False
        return True

    def forget(self, key: str, slot: str) -> None:
        self._forget(self._prefix + key, slot)

    async def release(self, key: str, slot: str) -> None:
        await self._client.send(self.release_call(key, slot)[0])

    def release_call(self, key: str, slot: str) -> tuple[bytes, None]:
        """The release as a command for `Redis.pipeline` (forgotten here at once, like `release`)."""
        full_key = self._prefix + key
        self._forget(full_key, slot)
        return encode((b"ZREM", full_key, slot)), None

    def _forget(self, full_key: str, slot: str) -> None:
        live = self._mine.get(full_key)
        if live is not None:
            live.discard(slot)
            if not live:
                del self._mine[full_key]

    async def refresh(self) -> None:
        """Push the expiry of every slot this process still holds `ttl` seconds ahead."""
        for full_key, live in list(self._mine.items()):
            if live:
                await self._refresh([full_key], [self._ttl, *live])

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return background(self._refresher)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self.refresh()
            except Exception as exc:  # Redis away: the slots will expire, nothing to do here
                log.debug("refreshing concurrency slots failed: %s", exc)
