"""`LeanRedisStorage`: the `limits` moving window on bastion's lean Redis client.

The strategies stay the library's (`MovingWindowRateLimiter`) and so do the Lua scripts
and keys: the scripts are read from the installed `limits` package (what its own
`RedisStorage` registers), called with the same arguments its coredis bridge passes,
and their replies read the same way. Only the client differs: ~25 µs of CPU per call
instead of coredis's ~140 µs (tests/integration/test_redis_storage.py checks both
storages answer alike on one server).
"""

from __future__ import annotations

import inspect
import time
from typing import cast

from limits.aio.storage import MovingWindowSupport, Storage
from limits.util import get_package_data

from ..redisio import Redis, RedisError, Reply

_SCRIPTS = "resources/redis/lua_scripts/"


class LeanRedisStorage(Storage, MovingWindowSupport):
    """Moving windows (and plain counters) in Redis, keys prefixed `<key_prefix>:` like `limits`' storage."""

    STORAGE_SCHEME = ["async+bastion-redis"]  # noqa: RUF012 (the type `limits` declares)

    def __init__(self, client: Redis, key_prefix: str) -> None:
        super().__init__()  # wrap_exceptions stays False: the methods are unwrapped below
        self.client = client
        self._prefix = key_prefix + ":"
        self.moving_window = client.script(get_package_data(_SCRIPTS + "moving_window.lua").decode())
        self.acquire_moving_window = client.script(get_package_data(_SCRIPTS + "acquire_moving_window.lua").decode())

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return RedisError

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        acquired = await self.acquire_moving_window([self._prefix + key], [time.time(), limit, expiry, amount])
        return bool(acquired)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        timestamp = time.time()
        return _window(await self.moving_window([self._prefix + key], [timestamp - expiry, limit]), timestamp)

    async def acquire_with_window(self, key: str, limit: int, expiry: int, amount: int = 1) -> tuple[bool, float, int]:
        """`acquire_entry` then `get_moving_window` (what `MovingWindowRateLimiter.hit` then `get_window_stats` call,
        with the same arguments) in one round trip: (acquired, window start, entries in the window)."""
        key = self._prefix + key
        hit = self.acquire_moving_window.command([key], [time.time(), limit, expiry, amount])
        timestamp = time.time()
        window = self.moving_window.command([key], [timestamp - expiry, limit])
        acquired, state = await self.client.pipeline([(hit, self.acquire_moving_window), (window, self.moving_window)])
        for reply in (acquired, state):
            if isinstance(reply, RedisError):
                raise reply
        start, count = _window(state, timestamp)
        return bool(acquired), start, count

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        key = self._prefix + key
        value = _int(await self.client.execute(b"INCRBY", key, amount))
        if value == amount:
            await self.client.execute(b"EXPIRE", key, expiry)
        return value

    async def get(self, key: str) -> int:
        return _int(await self.client.execute(b"GET", self._prefix + key))

    async def get_expiry(self, key: str) -> float:
        ttl = _int(await self.client.execute(b"TTL", self._prefix + key))
        return max(ttl, 0) + time.time()

    async def clear(self, key: str) -> None:
        await self.client.execute(b"DEL", self._prefix + key)

    async def check(self) -> bool:
        try:
            return await self.client.execute(b"PING") == b"PONG"
        except RedisError:
            return False

    async def reset(self) -> int | None:
        """Deletes every key under the prefix (SCAN, then DEL in batches): for tests and operators, not requests."""
        cursor, deleted = b"0", 0
        while True:
            reply = await self.client.execute(b"SCAN", cursor, b"MATCH", self._prefix + "*", b"COUNT", 1000)
            cursor, keys = cast(tuple[bytes, list[bytes]], reply)
            if keys:
                deleted += _int(await self.client.execute(b"DEL", *keys))
            if cursor == b"0":
                return deleted


def _window(reply: Reply, timestamp: float) -> tuple[float, int]:
    """The moving window script's reply as the library's bridge reads it: (oldest entry, count), or (now, 0)."""
    if isinstance(reply, list) and reply:
        oldest, count = reply
        return float(cast(bytes, oldest)), _int(count)
    return timestamp, 0


def _int(reply: Reply) -> int:
    """An integer reply (or a nil / bulk string holding one) as an int."""
    return int(cast(int | bytes, reply or 0))


# `limits` wraps each storage method in an error-translating coroutine (one or two extra coroutines per call)
# that only re-raises unless `wrap_exceptions` is set, which bastion never sets: take them back bare.
for _name, _method in list(vars(LeanRedisStorage).items()):
    if inspect.isfunction(_method) and hasattr(_method, "__wrapped__"):
        setattr(LeanRedisStorage, _name, inspect.unwrap(_method))
