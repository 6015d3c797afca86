"""Token reservations in a real redis-server: settled on the right window after it rotated, exact under load."""

from __future__ import annotations

import asyncio
import contextlib
import random

from bastion.ratelimit import RateLimiter
from bastion.ratelimit.tokens import RedisTokens
from bastion.redisio import Redis
from tests.support import redis_server

KEY = "LIMITER/p:k/100/1/minute"


async def test_settle_lands_on_the_reservations_window_after_it_rotated_or_expired() -> None:
    with redis_server() as (_, url):
        tokens = RedisTokens(Redis.from_url(url, 2.0), "bastion:limits")
        first = await tokens.reserve(KEY, 100, 1, 60)  # a one-second window, so it rotates quickly
        assert first.admitted and first.ticket > 0 and first.window.current == 60
        assert not (await tokens.reserve(KEY, 100, 1, 41)).admitted
        await asyncio.sleep(1.1)  # the current window has become the previous one
        rotated = await tokens.reserve(KEY, 100, 1, 0)
        assert (rotated.window.previous, rotated.window.current) == (60, 0)
        await tokens.settle(KEY, 1, first.ticket, -50, 10)  # used 10 of 60: the refund goes to the previous one
        after = await tokens.reserve(KEY, 100, 1, 30)
        assert (after.window.previous, after.window.current) == (10, 30)
        await asyncio.sleep(2.2)  # both windows expired: what it used is charged now
        await tokens.settle(KEY, 1, after.ticket, -10, 20)
        late = await tokens.reserve(KEY, 100, 1, 0)
        assert (late.window.previous, late.window.current) == (0, 20)


async def test_two_gateways_reserving_and_settling_at_once_end_exact() -> None:
    """The count ends at the sum of what was used, whatever the interleaving, on the client the limiter builds.

    (Without the scripts loaded first, coredis dropped connections when 200 calls missed the script cache at
    once, and with its default retries re-sent commands that had already counted.)
    """
    with redis_server() as (_, url):
        # (A generous timeout: 200 scripts at once on a busy 2-core machine can take longer than the default.)
        clients = [Redis.from_url(url, 10) for _ in range(2)]
        limiters = [RateLimiter(rpm=0, tpm=0, max_concurrent=0, redis=client) for client in clients]
        gateways = [limiter.token_windows for limiter in limiters]
        rng = random.Random(7)
        used: list[int] = []

        async def request(i: int) -> None:
            amount = rng.randint(1, 50)
            reservation = await gateways[i % 2].reserve(KEY, 10**6, 60, amount)
            assert reservation.admitted
            await asyncio.sleep(rng.random() / 100)
            actual = rng.randint(0, 80)
            used.append(actual)
            await gateways[(i + 1) % 2].settle(KEY, 60, reservation.ticket, actual - amount, actual)

        async with contextlib.AsyncExitStack() as stack:
            for client in clients:  # closed last, as the gateway does
                stack.push_async_callback(client.aclose)
            for limiter in limiters:
                await stack.enter_async_context(limiter.service())  # loads the scripts, as at the gateway's start
            await asyncio.gather(*(request(i) for i in range(200)))
            final = await gateways[0].reserve(KEY, 10**6, 60, 0)
        assert final.window.previous + final.window.current == sum(used)
