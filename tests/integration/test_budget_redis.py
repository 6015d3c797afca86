"""The Redis budget ledger on a real redis-server: two gateways' ledgers share one budget exactly, and a gateway
shares its one Redis connection between its ledger and its rate limiter."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion.budget.calendar import Calendar, zone
from bastion.budget.ledger import Admitted, LedgerUnavailable, Refused
from bastion.budget.policy import Budget, Period
from bastion.budget.redis_ledger import RedisLedger, connect
from bastion.redisio import Redis, ReplyError
from tests.support import AUTH, Proc, budget_hashes, free_port, gateway, redis_server

DAY = 86400
DAILY = (Budget(Period.DAY, 1000),)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# Years ahead: Redis expires period keys by the real clock, at their reset plus a day.
NOW = ts("2030-06-04T10:20:00+00:00")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (_, url):
        yield url


def ledger(url: str, prefix: str, retention_days: int = 400) -> RedisLedger:
    return RedisLedger(connect(url, 2.0), Calendar(zone("UTC")), retention=retention_days * DAY, prefix=prefix)


async def test_two_ledgers_share_one_budget_exactly(redis_url: str) -> None:
    gateways = [ledger(redis_url, "t1:"), ledger(redis_url, "t1:")]  # two gateways, their own connections

    async def one(i: int) -> bool:
        verdict = await gateways[i % 2].reserve("k1", "qwen", 30, DAILY, NOW)
        if isinstance(verdict, Refused):
            return False
        await asyncio.sleep(0.01)
        await gateways[(i + 1) % 2].settle(verdict.reservation, 30)  # either may settle
        return True

    admitted = sum(await asyncio.gather(*(one(i) for i in range(50))))
    assert admitted == 33  # 33 x 30 = 990 <= 1000 < 34 x 30
    report = await gateways[0].usage("k1", DAILY, NOW)
    day = report.periods[0]
    assert (day.used, day.reserved, day.limit, day.remaining) == (990, 0, 1000, 10)
    refused = await gateways[1].reserve("k1", "qwen", 11, DAILY, NOW)
    assert isinstance(refused, Refused)
    assert (refused.used, refused.reset_text) == (990, "2030-06-05T00:00:00+00:00")


async def test_settle_release_model_budgets_and_the_day_boundary(redis_url: str) -> None:
    led = ledger(redis_url, "t2:")
    budgets = (*DAILY, Budget(Period.DAY, 100, "qwen"), Budget(Period.MONTH, 1500))
    last_second, midnight = ts("2030-06-04T23:59:59+00:00"), ts("2030-06-05T00:00:00+00:00")
    held = await led.reserve("k1", "qwen", 90, budgets, last_second)
    assert isinstance(held, Admitted)
    assert held.tightest is not None and (held.tightest.budget, held.tightest.remaining) == (budgets[1], 10)
    refused = await led.reserve("k1", "qwen", 20, budgets, last_second)
    assert isinstance(refused, Refused) and refused.budget == budgets[1]
    other = await led.reserve("k1", "llama", 900, budgets, last_second)
    assert isinstance(other, Admitted)
    await led.release(other.reservation)
    await led.settle(held.reservation, 60)  # after midnight, still day 1's
    report = await led.usage("k1", budgets, last_second)
    assert [(p.model, p.used, p.reserved) for p in report.periods if p.period is Period.DAY] == [
        (None, 60, 0),
        ("qwen", 60, 0),
    ]
    early = await led.reserve("k1", "qwen", 100, budgets, midnight)  # day 2: the whole day again
    assert isinstance(early, Admitted)
    month = next(s for s in early.standings if s.budget.period is Period.MONTH)
    assert month.remaining == 1500 - 60 - 100
    await led.settle(early.reservation, 100)
    report = await led.usage("k1", budgets, midnight)
    assert report.by_model == {"qwen": (100, 160, 160)}
    rows = await led.rows(int(last_second - DAY), now=midnight)
    assert rows == [
        ("k1", "qwen", int(ts("2030-06-04T23:00:00+00:00")), 60),
        ("k1", "qwen", int(midnight), 100),
    ]
    assert await led.rows(int(midnight), principal="k1", now=midnight) == [("k1", "qwen", int(midnight), 100)]


async def test_keys_expire_rollups_by_retention_and_counts_after_the_period(redis_url: str) -> None:
    client = Redis.from_url(redis_url, 2.0)
    led = ledger(redis_url, "t3:", retention_days=40)
    verdict = await led.reserve("k1", "qwen", 10, DAILY, NOW)
    assert isinstance(verdict, Admitted)
    await led.settle(verdict.reservation, 10)
    day_key = f"t3:p:k1:day:{int(ts('2030-06-04T00:00:00+00:00'))}"
    hours_key = f"t3:h:k1:{int(ts('2030-06-04T00:00:00+00:00'))}"
    now = time.time()
    assert abs(await client.execute("TTL", day_key) - (ts("2030-06-05T00:00:00+00:00") + DAY - now)) < 5
    assert abs(await client.execute("TTL", hours_key) - (ts("2030-06-05T00:00:00+00:00") + 40 * DAY - now)) < 5
    # Made-up model names leave nothing behind once released.
    for i in range(20):
        made_up = await led.reserve("k1", f"nonsense-{i}", 5, DAILY, NOW)
        assert isinstance(made_up, Admitted)
        await led.release(made_up.reservation)
    assert sorted(await client.execute("HKEYS", day_key)) == [b"s", b"s:qwen", b"t", b"t:qwen"]
    # Old hours are gone by expiry, and the principal index forgets principals past retention.
    await client.execute("ZADD", "t3:principals", NOW - 41 * DAY, "gone")
    assert await led.prune_index(NOW) == 1


async def test_unreachable_redis_raises_ledger_unavailable() -> None:
    led = ledger(f"redis://127.0.0.1:{free_port()}/0", "t4:")
    with pytest.raises(LedgerUnavailable, match="Redis"):
        await led.reserve("k1", "qwen", 10, DAILY, NOW)


async def test_an_error_reply_is_a_bug_not_an_unreachable_ledger(redis_url: str) -> None:
    """A period key of the wrong type makes the script fail with an error reply: a bug (answered 500 upstream of
    here, with its traceback), never "budget storage unreachable", which the fail mode may turn into budgets off."""
    client = Redis.from_url(redis_url, 2.0)
    await client.execute("SET", f"t5:p:k1:day:{int(ts('2030-06-04T00:00:00+00:00'))}", "not a hash")
    led = ledger(redis_url, "t5:")
    with pytest.raises(ReplyError, match="WRONGTYPE"):
        await led.reserve("k1", "qwen", 10, DAILY, NOW)
    assert led.errors == 0


async def _clients(url: str) -> list[str]:
    """CLIENT LIST's lines, less the connection asking."""
    probe = Redis.from_url(url, 5.0)
    try:
        listed = await probe.execute("CLIENT", "LIST")
    finally:
        await probe.aclose()
    assert isinstance(listed, bytes)
    return [line for line in listed.decode().splitlines() if "cmd=client|list" not in line]


SIM_4_TOKENS = "{python} -m bastion simulate --host {host} --port {port} --tokens 4"


def _limits_and_budget(url: str, *, rpm: int, tpm: int, day: int, **extra: str) -> dict[str, str]:
    """Every limit and a daily budget on the Redis at `url` (four requests at once per key)."""
    return {
        "BASTION_REDIS_URL": url,
        "BASTION_RATE_LIMIT_RPM": str(rpm),
        "BASTION_RATE_LIMIT_TPM": str(tpm),
        "BASTION_RATE_LIMIT_MAX_CONCURRENT": "4",
        "BASTION_BUDGET_DAY": str(day),
        "BASTION_AUDIT_LOG": "off",
        **extra,
    }


def test_a_gateway_with_redis_limits_and_budgets_opens_one_connection() -> None:
    """The limiter and the ledger each opened their own client (two connections per gateway process, per
    worker); one pipelined connection is shared by every user of BASTION_REDIS_URL."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with redis_server() as (_, url):
        env = _limits_and_budget(url, rpm=100, tpm=100000, day=100000)
        with gateway("--upstream-command", SIM_4_TOKENS, env=env) as (_, base):
            for _ in range(3):  # limits (window, tokens, slot) and the budget (reserve, settle) all ask Redis
                reply = httpx.post(base + "/v1/chat/completions", json=chat, headers=AUTH, timeout=10)
                assert reply.status_code == 200, reply.text
                assert "x-budget-remaining-tokens" in reply.headers, reply.headers
                assert "x-ratelimit-remaining-requests" in reply.headers, reply.headers
            clients = asyncio.run(_clients(url))
            assert len(clients) == 1, clients


def _redis_counts(url: str, base: str) -> tuple[float, float, int]:
    """(the gateway's writes and commands on its Redis connection, the server's EVALSHA calls so far)."""
    page = httpx.get(base + "/metrics", headers={"authorization": "Bearer scrape-token"}, timeout=5).text
    counts = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            counts[sample.name] = sample.value
    info = asyncio.run(_info(url))
    line = next((line for line in info.splitlines() if line.startswith("cmdstat_evalsha:")), "cmdstat_evalsha:calls=0")
    evalsha = int(line.split(":", 1)[1].split(",")[0].removeprefix("calls="))
    return counts["bastion_redis_writes_total"], counts["bastion_redis_commands_total"], evalsha


async def _info(url: str) -> str:
    probe = Redis.from_url(url, 5.0)
    try:
        return cast(bytes, await probe.execute("INFO", "commandstats")).decode()
    finally:
        await probe.aclose()


def test_a_request_with_every_limit_and_a_budget_makes_three_round_trips() -> None:
    """Every limit and a budget on Redis: admission's tokens reserve and concurrency slot leave in one write,
    the requests/min hit (last: it cannot be undone) and the budget's reserve in a second; at the end the
    limiter's release and settle and the ledger's settle leave in one write. Sequential requests, so no
    request shares a write with another: 3 round trips (was 6) for the same 8 commands (7 EVALSHA, 1 ZREM)."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    n = 20
    with redis_server() as (_, url):
        env = _limits_and_budget(url, rpm=1000, tpm=1000000, day=1000000, BASTION_METRICS_TOKEN="scrape-token")
        with gateway("--upstream-command", SIM_4_TOKENS, env=env) as (_, base), httpx.Client(base_url=base) as http:
            for _ in range(2):  # warm: scripts loaded, connection open
                assert http.post("/v1/chat/completions", json=chat, headers=AUTH, timeout=10).status_code == 200
            writes, commands, evalsha = _redis_counts(url, base)
            for _ in range(n):
                reply = http.post("/v1/chat/completions", json=chat, headers=AUTH, timeout=10)
                assert reply.status_code == 200, reply.text
            after = _redis_counts(url, base)
    # The slots' refresher (every 20 s) may add one write and one command in the window.
    assert 3 * n <= after[0] - writes <= 3 * n + 1, (after[0] - writes) / n
    assert 8 * n <= after[1] - commands <= 8 * n + 1, (after[1] - commands) / n
    assert 7 * n <= after[2] - evalsha <= 7 * n + 1, (after[2] - evalsha) / n


def test_a_budget_reservation_issued_with_the_requests_window_is_given_back_when_not_used() -> None:
    """The budget's reservation leaves with the requests/min hit: a request the requests window refuses, and
    one the usage endpoint answers, must leave nothing reserved (counted `t` == settled `s` in every budget
    hash), as when the budget was asked only after the limits admitted."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    with redis_server() as (_, url):
        env = _limits_and_budget(url, rpm=3, tpm=1000000, day=1000000)
        with gateway("--upstream-command", SIM_4_TOKENS, env=env) as (_, base), httpx.Client(base_url=base) as http:
            assert http.get("/v1/usage", headers=AUTH, timeout=10).status_code == 200
            for status in (200, 200, 429):
                reply = http.post("/v1/chat/completions", json=chat, headers=AUTH, timeout=10)
                assert reply.status_code == status, reply.text
            assert reply.json()["error"]["code"] == "rate_limit_exceeded"
            # The release is queued as the 429 is answered and awaited by the gateway after it: give it a moment.
            deadline = time.monotonic() + 5
            while True:
                hashes = asyncio.run(budget_hashes(url))
                if all(h[b"t"] == h[b"s"] for h in hashes) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    assert hashes and all(h[b"t"] == h[b"s"] for h in hashes), hashes
    assert all(int(h[b"s"]) < 100 for h in hashes), hashes  # two requests' real usage, not a reservation of 50+


async def test_a_settle_left_for_the_gateway_and_lost_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """`settle_soon` queues the settle and returns; awaited later (by the gateway), a Redis that no longer answers
    is a lost settle logged and counted as `settle` always did, never an exception out of the request."""
    with redis_server() as (proc, url):
        client = connect(url, 0.5)
        dead = RedisLedger(client, Calendar(zone("UTC")))
        verdict = await dead.reserve("p", "m", 10, DAILY, NOW)
        assert isinstance(verdict, Admitted)
        proc.signal(signal.SIGSTOP)  # frozen: the settle is written, its reply never comes
        try:
            waiting = dead.settle_soon(verdict.reservation, 7)
            assert waiting is not None
            await waiting
        finally:
            proc.signal(signal.SIGCONT)
            await client.aclose()
    assert dead.errors == 1
    assert "budget settle lost (Redis unreachable)" in caplog.text


def test_an_error_reply_to_an_unclaimed_reservation_still_answers_the_refusal() -> None:
    """A budget hash of the wrong type makes the ledger's script answer an error reply (a bug: 500 where the
    budget stage claims its reservation). A reservation issued with the requests/min hit that the requests
    window then refuses is never claimed: giving it back must not turn the 429 into an exception out of the
    application (uvicorn's bare 500)."""
    with _budget_broken_after_one_request(rpm=2) as (proc, http):
        reply = http.post("/v1/chat/completions", json=_CHAT, headers=AUTH, timeout=10)
        assert (reply.status_code, reply.json()["error"]["code"]) == (500, "internal_error"), reply.text
        refused = http.post("/v1/chat/completions", json=_CHAT, headers=AUTH, timeout=10)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        output = proc.output()
    assert "Exception in ASGI application" not in output, output
    assert "WRONGTYPE" in output  # the bug is shown (logged with its traceback), not swallowed


_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@contextlib.contextmanager
def _budget_broken_after_one_request(rpm: int) -> Iterator[tuple[Proc, httpx.Client]]:
    """A gateway with every limit and a budget on a Redis whose budget hashes, once one request made them, are
    replaced by strings: every budget script then answers an error reply (WRONGTYPE)."""
    with redis_server() as (_, url):
        env = _limits_and_budget(url, rpm=rpm, tpm=1000000, day=1000000)
        with gateway("--upstream-command", SIM_4_TOKENS, env=env) as (proc, base), httpx.Client(base_url=base) as http:
            assert http.post("/v1/chat/completions", json=_CHAT, headers=AUTH, timeout=10).status_code == 200
            asyncio.run(_break_budget_hashes(url))
            yield proc, http


async def _break_budget_hashes(url: str) -> None:
    probe = Redis.from_url(url, 5.0)
    try:
        reply = cast(list[Any], await probe.execute("SCAN", 0, "MATCH", "bastion:budget:p:*", "COUNT", 1000))
        for key in reply[1]:
            if b":day:" in key:
                await probe.execute("DEL", key)
                await probe.execute("SET", key, "not a hash")
    finally:
        await probe.aclose()


def test_a_bug_in_a_stage_is_an_openai_shaped_500_with_the_request_id() -> None:
    """Broken budget hashes make `/v1/usage`'s read fail with an error reply, which no stage answers: the client
    gets the gateway's JSON error with its request id (the one in the log line with the traceback), not the
    server's plain-text "Internal Server Error"; the next request is served."""
    with _budget_broken_after_one_request(rpm=100) as (proc, http):
        reply = http.get("/v1/usage", headers=AUTH, timeout=10)
        assert reply.status_code == 500 and reply.headers["content-type"] == "application/json", reply.text
        assert reply.json()["error"]["code"] == "internal_error", reply.text
        request_id = reply.headers["x-request-id"]
        assert http.get("/health", timeout=10).status_code == 200
        output = proc.output()
    assert f"request {request_id} failed inside the gateway" in output and "WRONGTYPE" in output, output
    assert "Exception in ASGI application" not in output, output
