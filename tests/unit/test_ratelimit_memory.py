"""bastion's memory storage: the same answers as `limits`' own under one clock, bounded memory, wiring."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage as LibraryStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from bastion.ratelimit import RateLimiter
from bastion.ratelimit.memory import SWEEP_EVERY, MemoryStorage
from bastion.ratelimit.redis_storage import LeanRedisStorage
from bastion.redisio import Redis

START = 1_700_000_000.0  # a whole minute
# Steps of a quarter second (exact in binary), so hits land exactly on window edges too.
STEP_CHOICES = [0, 0, 0.25, 0.5, 0.5, 1, 1, 2, 2.25, 29.75, 30, 60, 60.25, 120]
STEPS = st.sampled_from(STEP_CHOICES)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def run_with_clock(scenario: Callable[[Clock], Coroutine[Any, Any, None]]) -> None:
    """Runs `scenario` in a fresh event loop with `time.time` (read by both storages) under its control."""
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", clock)
        asyncio.run(scenario(clock))


# Each key always keeps its limit, as the rate limiter's keys do (the key names the limit).
ITEMS: dict[str, RateLimitItem] = {
    "small": RateLimitItemPerSecond(3, 2),
    "minute": RateLimitItemPerMinute(5),
    "one": RateLimitItemPerSecond(1, 1),
}
KINDS = ["moving", "sliding"]
CALLS = ["hit", "hit", "test", "stats", "stats", "clear"]
COSTS = [1, 1, 1, 2, 4]
STRATEGY_OPS = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.sampled_from(CALLS),
        st.sampled_from(sorted(ITEMS)),
        st.sampled_from(COSTS),
        STEPS,  # time passing before the call
    ),
    max_size=80,
)


async def compare_strategies(clock: Clock, ops: list[tuple[str, str, str, int, float]]) -> None:
    """Runs `ops` through `limits`' strategies on both storages; every answer must agree."""
    ours, theirs = MemoryStorage(), LibraryStorage()
    limiters = {
        "moving": (MovingWindowRateLimiter(ours), MovingWindowRateLimiter(theirs)),
        "sliding": (SlidingWindowCounterRateLimiter(ours), SlidingWindowCounterRateLimiter(theirs)),
    }
    for kind, op, name, cost, step in ops:
        clock.now += step
        item = ITEMS[name]
        mine, reference = limiters[kind]
        where = (kind, op, name, cost, clock.now - START)
        if op == "hit":
            assert await mine.hit(item, name, cost=cost) == await reference.hit(item, name, cost=cost), where
        elif op == "test":
            assert await mine.test(item, name, cost=cost) == await reference.test(item, name, cost=cost), where
        elif op == "stats":
            got, expected = await mine.get_window_stats(item, name), await reference.get_window_stats(item, name)
            assert got.remaining == expected.remaining, where
            # An empty moving window: the library starts it at whichever hit it has not trimmed yet.
            if kind == "sliding" or expected.remaining < item.amount:
                assert got.reset_time == expected.reset_time, where
        else:
            await mine.clear(item, name)
            await reference.clear(item, name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STRATEGY_OPS)
def test_strategies_answer_the_same_on_both_storages(ops: list[tuple[str, str, str, int, float]]) -> None:
    async def scenario(clock: Clock) -> None:
        await compare_strategies(clock, ops)

    run_with_clock(scenario)


def test_a_long_random_sequence_answers_the_same() -> None:
    rng = random.Random(20240601)
    names = sorted(ITEMS)
    ops = [
        (rng.choice(KINDS), rng.choice(CALLS), rng.choice(names), rng.choice(COSTS), rng.choice(STEP_CHOICES[:7]))
        for _ in range(20_000)
    ]

    async def scenario(clock: Clock) -> None:
        await compare_strategies(clock, ops)

    run_with_clock(scenario)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(["both", "both", "hit"]), st.sampled_from(sorted(ITEMS)), STEPS), max_size=80)
)
def test_acquire_with_window_answers_as_hit_then_window_stats(ops: list[tuple[str, str, float]]) -> None:
    """The limiter's one call per request answers what `limits`' `hit` then `get_window_stats` answer."""

    async def scenario(clock: Clock) -> None:
        ours, theirs = MemoryStorage(), MovingWindowRateLimiter(LibraryStorage())
        for op, name, step in ops:
            clock.now += step
            item = ITEMS[name]
            where = (op, name, clock.now - START)
            if op == "hit":  # another request's plain hit, on both
                assert await MovingWindowRateLimiter(ours).hit(item, name) == await theirs.hit(item, name), where
                continue
            acquired, start, count = ours.acquire_with_window(item.key_for(name), item.amount, item.get_expiry())
            assert acquired == await theirs.hit(item, name), where
            expected = await theirs.get_window_stats(item, name)
            assert item.amount - count == expected.remaining, where
            if expected.remaining < item.amount:  # an empty window: see compare_strategies
                assert start + item.get_expiry() == expected.reset_time, where

    run_with_clock(scenario)


COUNTER_OPS = st.lists(
    st.tuples(
        st.sampled_from(["incr", "decr", "get", "get_expiry", "clear"]),
        st.sampled_from(["a", "b"]),
        st.integers(0, 3),  # amount
        st.sampled_from([1, 2, 60]),  # expiry
        STEPS,
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(COUNTER_OPS)
def test_counters_answer_the_same_on_both_storages(ops: list[tuple[str, str, int, int, float]]) -> None:
    async def scenario(clock: Clock) -> None:
        ours, theirs = MemoryStorage(), LibraryStorage()
        for op, key, amount, expiry, step in ops:
            clock.now += step
            where = (op, key, amount, expiry, clock.now - START)
            if op == "incr":
                assert await ours.incr(key, expiry, amount) == await theirs.incr(key, expiry, amount), where
            elif op == "decr":
                assert await ours.decr(key, amount) == await theirs.decr(key, amount), where
            elif op == "get":
                assert await ours.get(key) == await theirs.get(key), where
            elif op == "get_expiry":
                expected = await theirs.get_expiry(key)
                # The library returns an expired counter's old expiry until it trims it; that is "now".
                assert await ours.get_expiry(key) == max(expected, clock.now), where
            else:
                await ours.clear(key)
                await theirs.clear(key)

    run_with_clock(scenario)


async def test_moving_window_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    storage = MemoryStorage()
    assert await storage.acquire_entry("k", 2, 60)
    clock.now += 30
    assert await storage.acquire_entry("k", 2, 60)
    assert not await storage.acquire_entry("k", 2, 60)
    assert await storage.get_moving_window("k", 2, 60) == (START, 2)
    clock.now += 30  # the first hit is exactly a minute old: still blocks, no longer counted
    assert not await storage.acquire_entry("k", 2, 60)
    assert await storage.get_moving_window("k", 2, 60) == (START + 30, 1)
    clock.now += 0.25
    assert await storage.acquire_entry("k", 2, 60)
    assert not await storage.acquire_entry("k", 3, 60, amount=2)
    assert not await storage.acquire_entry("k", 1, 60, amount=2)  # more than the limit: never
    assert await storage.get_moving_window("nobody", 2, 60) == (clock.now, 0)


async def test_a_full_window_only_keeps_the_last_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    storage = MemoryStorage()
    for _ in range(1000):
        assert await storage.acquire_entry("busy", 10**9, 60)
        clock.now += 0.1  # 10 hits per second
    start, count = await storage.get_moving_window("busy", 10**9, 60)
    assert count == 600 and start == pytest.approx(clock.now - 59.9)
    assert len(storage._windows["busy"]) <= 601  # older hits were dropped, not just skipped


async def test_idle_keys_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    storage = MemoryStorage()
    for i in range(500):
        await storage.acquire_entry(f"ip:{i}", 10, 60)
        await storage.acquire_sliding_window_entry(f"ip:{i}", 1000, 60, 7)
    assert storage.size() == 1000
    clock.now += 59
    await storage.acquire_entry("busy", 10, 60)
    assert storage.size() == 1001  # nothing idle for a whole window yet
    clock.now += 60 + SWEEP_EVERY  # windows idle for over a minute, counters past their expiry (2 minutes)
    await storage.get("anything")
    assert storage.size() == 0
    assert not storage.has_window("ip:1")


async def test_registered_scheme_and_no_error_wrapper() -> None:
    assert isinstance(storage_from_string("async+bastion-memory://"), MemoryStorage)
    assert not hasattr(MemoryStorage.acquire_entry, "__wrapped__")
    assert not hasattr(MemoryStorage.incr, "__wrapped__")
    storage = MemoryStorage()
    await storage.incr("c", 60)
    assert await storage.check() and await storage.reset() == 1 and storage.size() == 0


def test_rate_limiter_uses_it_in_memory_mode_only() -> None:
    memory = RateLimiter(rpm=1, tpm=1, max_concurrent=1)
    assert isinstance(memory.storage, MemoryStorage) and isinstance(memory.failures.storage, MemoryStorage)
    shared = RateLimiter(rpm=1, tpm=1, max_concurrent=1, redis=Redis.from_url("redis://127.0.0.1:1/0", 1))
    assert isinstance(shared.storage, LeanRedisStorage) and isinstance(shared.failures.storage, MemoryStorage)


async def test_a_busy_window_is_compacted_and_holds_nothing_the_collector_walks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    storage = MemoryStorage()
    for _ in range(20_000):
        assert await storage.acquire_entry("busy", 10**9, 60)
        clock.now += 0.01  # 100 hits per second: 6,000 in a minute
    start, count = await storage.get_moving_window("busy", 10**9, 60)
    assert count == 6000 and start == pytest.approx(clock.now - 59.99)
    hits = storage._windows["busy"]
    assert len(hits.times) <= 2 * 6001  # dropped hits are let go once they are half of the array
    assert len(gc.get_referents(hits.times)) <= 1  # plain doubles: a full collection does not walk 6,000 floats
