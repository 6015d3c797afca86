"""The moving window on bastion's lean client answers exactly as `limits`' own RedisStorage (coredis) on one server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from bastion.ratelimit import RateLimiter
from bastion.ratelimit.redis_storage import LeanRedisStorage
from bastion.redisio import Redis
from tests.support import redis_server

START = 1_700_000_000.0
STEPS = st.sampled_from([0, 0, 0.25, 0.5, 1, 1, 2, 2.25, 29.75, 30, 60, 60.25, 120])
ITEMS: dict[str, RateLimitItem] = {
    "small": RateLimitItemPerSecond(3, 2),
    "minute": RateLimitItemPerMinute(5),
    "one": RateLimitItemPerSecond(1, 1),
}
OPS = st.lists(
    st.tuples(
        st.sampled_from(["hit", "hit", "hit+stats", "hit+stats", "test", "stats", "clear"]),
        st.sampled_from(sorted(ITEMS)),
        st.sampled_from([1, 1, 1, 2, 4, 6]),  # 6: more than any item allows
        STEPS,
    ),
    max_size=60,
)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (_, url):
        yield url


async def compare(url: str, clock: Clock, ops: list[tuple[str, str, int, float]]) -> None:
    """Runs `ops` through `MovingWindowRateLimiter` on both storages (own key prefixes, one server)."""
    client = Redis.from_url(url, 5.0)
    await client.execute("FLUSHDB")
    storage = LeanRedisStorage(client, "ours")
    ours = MovingWindowRateLimiter(storage)
    theirs = MovingWindowRateLimiter(RedisStorage("async+" + url, key_prefix="theirs"))
    try:
        for op, name, cost, step in ops:
            clock.now += step
            item = ITEMS[name]
            where = (op, name, cost, clock.now - START)
            if op == "hit":
                assert await ours.hit(item, name, cost=cost) == await theirs.hit(item, name, cost=cost), where
            elif op == "hit+stats":  # the limiter's one-round-trip path against the strategy's two calls
                acquired, start, count = await storage.acquire_with_window(
                    item.key_for(name), item.amount, item.get_expiry(), cost
                )
                hit = await theirs.hit(item, name, cost=cost)
                expected = await theirs.get_window_stats(item, name)
                assert (acquired, start + item.get_expiry(), item.amount - count) == (hit, *expected), where
            elif op == "test":
                assert await ours.test(item, name, cost=cost) == await theirs.test(item, name, cost=cost), where
            elif op == "stats":
                got, expected = await ours.get_window_stats(item, name), await theirs.get_window_stats(item, name)
                assert got == expected, where
            else:
                await ours.clear(item, name)
                await theirs.clear(item, name)
        # The windows themselves hold the same entries.
        for name, item in ITEMS.items():
            key = item.key_for(name)
            mine = await client.execute("LRANGE", "ours:" + key, 0, -1)
            assert mine == await client.execute("LRANGE", "theirs:" + key, 0, -1), name
    finally:
        await client.aclose()


def run(url: str, ops: list[tuple[str, str, int, float]]) -> None:
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", clock)  # read by both storages for the scripts' timestamps
        asyncio.run(compare(url, clock, ops))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(OPS)
def test_moving_window_answers_as_the_librarys_redis_storage(
    redis_url: str, ops: list[tuple[str, str, int, float]]
) -> None:
    run(redis_url, ops)


def test_a_long_sequence_answers_the_same(redis_url: str) -> None:
    import random

    rng = random.Random(18)
    steps = [0, 0, 0.25, 0.5, 1, 2]
    ops = [
        (
            rng.choice(["hit", "hit", "hit+stats", "test", "stats"]),
            rng.choice(sorted(ITEMS)),
            rng.choice([1, 1, 2]),
            rng.choice(steps),
        )
        for _ in range(1500)
    ]
    run(redis_url, ops)


async def test_the_limiter_runs_its_requests_window_on_the_lean_storage(redis_url: str) -> None:
    """Two limiters (two gateways) on one Redis admit exactly `rpm` requests, on the library's keys."""
    clients = [Redis.from_url(redis_url, 5) for _ in range(2)]  # two gateways: a connection each
    limiters = [RateLimiter(rpm=5, tpm=0, max_concurrent=0, redis=client) for client in clients]
    assert all(isinstance(limiter.storage, LeanRedisStorage) for limiter in limiters)
    assert not hasattr(LeanRedisStorage.acquire_entry, "__wrapped__")  # no pass-through wrapper per call
    admitted = refused = 0
    for i in range(12):
        try:
            await limiters[i % 2].admit(None, "10.9.9.9")
            admitted += 1
        except Exception as exc:
            assert getattr(exc, "status", None) == 429
            refused += 1
    assert (admitted, refused) == (5, 7)
    probe = Redis.from_url(redis_url, 5.0)
    try:
        assert await probe.execute("LLEN", "bastion:limits:LIMITER/ip:10.9.9.9/5/1/minute") == 5
    finally:
        await probe.aclose()
        for client in clients:
            await client.aclose()
