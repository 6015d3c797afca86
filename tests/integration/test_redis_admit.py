"""Admission on a real redis-server: the tokens reservation and the concurrency slot leave in one write, the
requests/min hit after them; whichever of the pair refuses or fails, the other is given back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bastion.ratelimit import RateLimited, RateLimiter
from bastion.redisio import Redis
from tests.support import redis_server

IP = "192.0.2.7"
SLOTS = "bastion:slots:ip:" + IP


def tokens_key(tpm: int) -> str:
    return "bastion:limits:{LIMITER/ip:" + IP + f"/{tpm}/1/minute}}"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    with redis_server() as (_, url):
        client = Redis.from_url(url, 5.0)
        try:
            yield client
        finally:
            await client.aclose()


async def _count(redis: Redis, key: str) -> int:
    return int(await redis.execute("GET", key) or 0)  # type: ignore[arg-type]


async def test_admission_is_two_round_trips_and_the_end_one(redis: Redis) -> None:
    limiter = RateLimiter(rpm=10, tpm=100, max_concurrent=2, redis=redis)
    await limiter._load_scripts()
    writes, commands = redis.writes, redis.commands
    admission = await limiter.admit(None, IP, 30)
    assert (redis.writes - writes, redis.commands - commands) == (2, 4)  # tokens + slot, then the rpm hit + window
    await limiter.finish(admission, 12)
    assert (redis.writes - writes, redis.commands - commands) == (3, 6)  # the release and the settle together
    assert await redis.execute("ZCARD", SLOTS) == 0 and await _count(redis, tokens_key(100)) == 12


async def test_a_tokens_refusal_gives_the_slot_back(redis: Redis) -> None:
    limiter = RateLimiter(rpm=10, tpm=100, max_concurrent=2, redis=redis)
    held = await limiter.admit(None, IP, 80)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(None, IP, 30)  # the slot was free, the tokens were not: taken together, slot given back
    assert refused.value.reason == "rate_limit_tokens"
    assert await redis.execute("ZCARD", SLOTS) == 1 and await _count(redis, tokens_key(100)) == 80
    await limiter.finish(held, 80)
    assert await redis.execute("ZCARD", SLOTS) == 0


async def test_a_concurrency_refusal_gives_the_reservation_back_and_takes_no_hit(redis: Redis) -> None:
    limiter = RateLimiter(rpm=10, tpm=100, max_concurrent=1, redis=redis)
    held = await limiter.admit(None, IP, 20)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(None, IP, 30)
    assert refused.value.reason == "rate_limit_concurrency"
    assert await _count(redis, tokens_key(100)) == 20  # the 30 reserved with it were given back
    assert (b"x-ratelimit-remaining-requests", b"9") in refused.value.headers  # no request-window hit taken
    await limiter.finish(held, 20)


async def test_when_the_reservation_fails_the_slot_taken_with_it_is_given_back(redis: Redis) -> None:
    """The tokens key holds the wrong type (a script error reply: a bug, answered 500): the slot, taken in the
    same write, must not stay taken."""
    limiter = RateLimiter(rpm=10, tpm=100, max_concurrent=2, redis=redis)
    await redis.execute("HSET", tokens_key(100), "x", 1)
    with pytest.raises(RateLimited) as failed:
        await limiter.admit(None, IP, 30)
    assert failed.value.status == 500
    assert await redis.execute("ZCARD", SLOTS) == 0
    assert not limiter.slots._mine  # type: ignore[attr-defined]  (nothing left to refresh)


async def test_alongside_leaves_with_the_requests_hit_and_only_once_the_rest_is_admitted(redis: Redis) -> None:
    """What `alongside` queues (the budget stage's reservation) shares the requests window's write; it is not
    called when the tokens or the slot refuse (the budget is then never asked, as before)."""
    limiter = RateLimiter(rpm=10, tpm=100, max_concurrent=1, redis=redis)
    await limiter._load_scripts()
    issued: list[object] = []

    def alongside() -> None:
        issued.append(redis.issue(b"*1\r\n$4\r\nPING\r\n"))

    writes = redis.writes
    held = await limiter.admit(None, IP, 20, alongside)
    assert len(issued) == 1 and redis.writes - writes == 2  # the PING rode with the requests/min hit
    assert await issued[0] == b"PONG"  # type: ignore[misc]
    for tokens in (200, 20):  # over the tokens limit; then the slot is full
        with pytest.raises(RateLimited):
            await limiter.admit(None, IP, tokens, alongside)
    assert len(issued) == 1
    await limiter.finish(held, 20)


async def test_a_requests_refusal_gives_back_slot_and_reservation_in_one_round_trip(redis: Redis) -> None:
    limiter = RateLimiter(rpm=1, tpm=100, max_concurrent=2, redis=redis)
    await limiter._load_scripts()
    held = await limiter.admit(None, IP, 10)
    writes = redis.writes
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(None, IP, 20)
    assert refused.value.reason == "rate_limit_requests"
    assert redis.writes - writes == 3  # tokens + slot; the requests hit; the slot and the 20 tokens given back
    assert await redis.execute("ZCARD", SLOTS) == 1 and await _count(redis, tokens_key(100)) == 10
    await limiter.finish(held, 10)
