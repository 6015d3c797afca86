"""The limiter without a network: header values, window edges (with a controlled clock), slots, hooks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import coredis.exceptions
import pytest
from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from bastion.config import Settings
from bastion.context import Exchange, Outcome
from bastion.ratelimit import RateLimited, RateLimiter, reset_duration
from bastion.ratelimit.limiter import PerMinute, limit_headers, per_minute
from bastion.ratelimit.memory import MemoryStorage
from bastion.ratelimit.middleware import tokens_used
from bastion.usage import Usage


class Clock:
    """Controls `time.time`, which the `limits` memory storage reads for its windows."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1_700_000_000.0  # a whole minute: window keys start here
        monkeypatch.setattr(time, "time", lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


def limiter(**values: object) -> RateLimiter:
    base: dict[str, object] = {"rate_limit_rpm": 0, "rate_limit_tpm": 0, "rate_limit_max_concurrent": 0}
    return RateLimiter(Settings(_env_file=None, **{**base, **values}))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Principal:
    id: str
    name: str = "someone"
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-1, "0s"), (0, "0s"), (0.25, "250ms"), (1, "1s"), (17.2, "18s"), (60.0001, "1m0s"), (360, "6m0s"),
     (3723, "1h2m3s")],
)  # fmt: skip
def test_reset_duration_like_openai(seconds: float, text: str) -> None:
    assert reset_duration(seconds) == text


def test_limit_headers() -> None:
    assert limit_headers("requests", 60, 59, 1.0) == [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
    ]
    assert dict(limit_headers("tokens", 100, -5, 3))[b"x-ratelimit-remaining-tokens"] == b"0"
    assert dict(limit_headers("tokens", 100, 100, 30))[b"x-ratelimit-reset-tokens"] == b"0s"


async def test_requests_window_edges(clock: Clock) -> None:
    limits = limiter(rate_limit_rpm=2)
    first = await limits.admit(None, "10.0.0.1")
    assert dict(first.headers)[b"x-ratelimit-remaining-requests"] == b"1"
    assert dict(first.headers)[b"x-ratelimit-reset-requests"] == b"1m0s"
    clock.advance(30)
    await limits.admit(None, "10.0.0.1")
    clock.advance(29.5)
    with pytest.raises(RateLimited) as refused:
        await limits.admit(None, "10.0.0.1")
    assert refused.value.status == 429 and refused.value.reason == "rate_limit_requests"
    headers = dict(refused.value.headers)
    assert headers[b"retry-after"] == b"1"  # the first hit leaves the window in 0.5 s
    assert headers[b"x-ratelimit-reset-requests"] == b"500ms"
    assert "2 requests per minute" in refused.value.message
    await limits.admit(None, "10.0.0.2")  # another client has its own window
    clock.advance(0.51)  # the first hit is over a minute old: one request fits again (moving window)
    await limits.admit(None, "10.0.0.1")
    with pytest.raises(RateLimited):
        await limits.admit(None, "10.0.0.1")


async def test_tokens_refused_up_front_and_charged_afterwards(clock: Clock) -> None:
    limits = limiter(rate_limit_tpm=100)
    admission = await limits.admit(None, "ip")
    await limits.charge(admission, 60)
    second = await limits.admit(None, "ip")  # 40 left: admitted although it will overshoot
    assert dict(second.headers)[b"x-ratelimit-remaining-tokens"] == b"40"
    await limits.charge(second, 500)  # more than the limit: exhausts the window
    with pytest.raises(RateLimited) as refused:
        await limits.admit(None, "ip")
    assert refused.value.reason == "rate_limit_tokens"
    assert dict(refused.value.headers)[b"x-ratelimit-remaining-tokens"] == b"0"
    clock.advance(120)  # both sliding-window counters have aged out
    again = await limits.admit(None, "ip")
    assert dict(again.headers)[b"x-ratelimit-remaining-tokens"] == b"100"


async def test_concurrency_slots_are_given_back() -> None:
    limits = limiter(rate_limit_max_concurrent=2)
    held = [await limits.admit(None, "ip"), await limits.admit(None, "ip")]
    with pytest.raises(RateLimited) as refused:
        await limits.admit(None, "ip")
    assert refused.value.reason == "rate_limit_concurrency"
    assert dict(refused.value.headers)[b"retry-after"] == b"1"
    await limits.release(held.pop())
    held.append(await limits.admit(None, "ip"))


async def test_refused_request_does_not_keep_its_slot(clock: Clock) -> None:
    limits = limiter(rate_limit_rpm=1, rate_limit_max_concurrent=1)
    await limits.release(await limits.admit(None, "ip"))
    with pytest.raises(RateLimited) as refused:
        await limits.admit(None, "ip")
    assert refused.value.reason == "rate_limit_requests"
    clock.advance(61)
    await limits.admit(None, "ip")  # would be a concurrency refusal if the refused one had leaked its slot


async def test_principal_overrides_and_keys() -> None:
    limits = limiter(rate_limit_rpm=5, rate_limit_tpm=50, rate_limit_max_concurrent=3)
    assert limits.limits_for(None, "1.2.3.4") == ("ip:1.2.3.4", 5, 50, 3)
    assert limits.limits_for(Principal("k1"), "1.2.3.4") == ("p:k1", 5, 50, 3)
    assert limits.limits_for(Principal("k1", rpm=1, tpm=0, max_concurrent=9), "ip") == ("p:k1", 1, 0, 9)
    admitted = await limits.admit(Principal("k2", rpm=1), "ip")
    assert dict(admitted.headers)[b"x-ratelimit-limit-requests"] == b"1"
    with pytest.raises(RateLimited):
        await limits.admit(Principal("k2", rpm=1), "ip")
    await limits.admit(Principal("k3", rpm=1), "ip")  # a different principal from the same IP


async def test_unlimited_sends_no_headers() -> None:
    admission = await limiter().admit(None, "ip")
    assert admission.headers == [] and admission.slot is None


async def test_auth_failure_limit_per_client(clock: Clock) -> None:
    limits = limiter(auth_failure_limit=3)
    for _ in range(3):
        assert await limits.hit_auth_failure("6.6.6.6") is None
    blocked = await limits.hit_auth_failure("6.6.6.6")
    assert blocked is not None and blocked.status == 429
    assert dict(blocked.headers)[b"retry-after"] == b"60"
    assert await limits.hit_auth_failure("7.7.7.7") is None
    clock.advance(60.5)
    assert await limits.hit_auth_failure("6.6.6.6") is None
    assert await limiter(auth_failure_limit=0).hit_auth_failure("6.6.6.6") is None


class _BrokenStorage(MemoryStorage):
    """A storage whose every call fails with `error`: a storage outage, or a bug."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    async def acquire_entry(self, *args: object, **kwargs: object) -> bool:
        raise self.error

    async def get_moving_window(self, *args: object, **kwargs: object) -> tuple[float, int]:
        raise self.error

    async def get_sliding_window(self, *args: object, **kwargs: object) -> tuple[int, float, int, float]:
        raise self.error


def _broken(error: BaseException, **values: object) -> RateLimiter:
    limits = limiter(rate_limit_rpm=10, rate_limit_tpm=100, **values)
    limits.storage = _BrokenStorage(error)
    limits.requests = MovingWindowRateLimiter(limits.storage)
    limits.tokens = SlidingWindowCounterRateLimiter(limits.storage)
    return limits


@pytest.mark.parametrize(
    "error", [ConnectionRefusedError(), TimeoutError(), coredis.exceptions.ConnectionError("gone")], ids=type
)
async def test_storage_outage_fails_open_counted_and_exported(error: BaseException) -> None:
    limits = _broken(error)
    admission = await limits.admit(None, "10.0.0.1")
    assert admission.headers == [] and admission.tpm == 0, "served without limits"
    assert (limits.storage_errors, limits.fail_open_admissions) == (1, 1)
    samples = {s.name: s.value for family in limits.collector().collect() for s in family.samples}
    assert samples == {"bastion_ratelimit_storage_errors_total": 1, "bastion_ratelimit_fail_open_total": 1}
    closed = _broken(error, redis_fail_mode="closed")
    with pytest.raises(RateLimited) as refused:
        await closed.admit(None, "10.0.0.1")
    assert refused.value.status == 503 and closed.fail_open_admissions == 0


@pytest.mark.parametrize("error", [KeyError("bug"), TypeError("bug"), coredis.exceptions.WrongTypeError("x")], ids=type)
async def test_a_bug_is_a_500_with_a_traceback_never_limits_off(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    limits = _broken(error)
    with pytest.raises(RateLimited) as failed:
        await limits.admit(None, "10.0.0.1")
    assert failed.value.status == 500 and failed.value.reason == "rate_limit_internal"
    assert (limits.storage_errors, limits.fail_open_admissions) == (0, 0)
    [record] = [r for r in caplog.records if r.name == "bastion.ratelimit"]
    assert record.exc_info is not None and record.exc_info[0] is type(error)


def test_storage_keys_are_the_librarys() -> None:
    """`PerMinute.key_for` is a shortcut: the keys (in Redis too) stay what `limits` builds."""
    for amount in (1, 600, 10**9):
        ours, theirs = per_minute(amount), RateLimitItemPerMinute(amount)
        assert isinstance(ours, PerMinute) and ours == theirs and hash(ours) == hash(theirs)
        assert ours.key_for("ip:10.0.0.1") == theirs.key_for("ip:10.0.0.1") == f"LIMITER/ip:10.0.0.1/{amount}/1/minute"
        assert ours.key_for("p:key-1") == theirs.key_for("p:key-1")
        assert ours.key_for("authfail/::1") == theirs.key_for("authfail", "::1")
        assert ours.key_for("a", b"b", 3) == theirs.key_for("a", b"b", 3)


def test_token_estimate_without_usage() -> None:
    scope = {"headers": [(b"content-length", b"400")]}
    done = Exchange("r", "POST", "/v1/chat/completions", usage=Usage(10, 20))
    assert tokens_used(done, scope) == 30
    refused = Exchange("r", "POST", "/v1/chat/completions", outcome=Outcome.REJECTED)
    assert tokens_used(refused, scope) == 0
    cut = Exchange("r", "POST", "/v1/chat/completions", outcome=Outcome.CLIENT_DISCONNECT, stream=True, events=7)
    assert tokens_used(cut, scope) == 100 + 7
    plain = Exchange("r", "POST", "/v1/chat/completions", outcome=Outcome.CLIENT_DISCONNECT, max_tokens=50)
    assert tokens_used(plain, scope) == 100 + 50
    broken = Exchange(
        "r", "POST", "/v1/chat/completions", outcome=Outcome.UPSTREAM_ERROR, reason="midstream", stream=True
    )
    assert tokens_used(broken, {"headers": []}) == 0


def test_redis_password_stays_secret() -> None:
    settings = Settings(_env_file=None, redis_url="redis://:hunter2@127.0.0.1:6379/0")  # type: ignore[arg-type]
    assert "hunter2" not in repr(settings)
