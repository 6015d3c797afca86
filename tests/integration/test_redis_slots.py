"""Concurrency slots in a real redis-server: shared, and expiring when their gateway dies."""

from __future__ import annotations

import asyncio
import time

from bastion.ratelimit.slots import RedisSlots
from bastion.redisio import Redis
from tests.support import redis_server


async def test_slots_shared_and_crashed_replica_slots_expire() -> None:
    with redis_server() as (_, url):
        alive_client = Redis.from_url(url, 2.0)
        crashed_client = Redis.from_url(url, 2.0)
        alive = RedisSlots(alive_client, ttl=0.6)
        crashed = RedisSlots(crashed_client, ttl=0.6)  # never refreshes: as if its process died
        async with alive.running():
            held = await alive.acquire("p:k", 2)
            assert held is not None
            assert await crashed.acquire("p:k", 2) is not None
            assert await alive.acquire("p:k", 2) is None  # 2 in flight across both "replicas"
            deadline = time.monotonic() + 5
            while await alive.acquire("p:k", 2) is None:  # the dead one's slot expires...
                assert time.monotonic() < deadline, "a crashed replica's slot never expired"
                await asyncio.sleep(0.05)
            # ...while the live one's first slot, refreshed every ttl/3, is still held well past its ttl.
            assert time.monotonic() - (deadline - 5) >= 0.5
            assert await crashed.acquire("p:k", 2) is None
            await alive.release("p:k", held)
            assert await crashed.acquire("p:k", 2) is not None
