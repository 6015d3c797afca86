"""The rate limiter: requests/min, tokens/min and concurrent requests per principal.

Windows and counters come from the `limits` library (the engine under slowapi):
its strategies, on Redis when gateways share counts (`redis_storage.py`: the library's
own Lua scripts, run through bastion's lean client `bastion.redisio`, which costs
~25 µs of CPU per call where coredis cost ~150), or in one process on bastion's own
memory storage (`memory.py`, which says why).

- requests/min: `MovingWindowRateLimiter`, one hit per admitted request (exact:
  two gateways on one Redis admit exactly `rpm` requests per rolling minute).
- tokens/min: the library's sliding window counter (two counters per key, so a
  charge of 5 000 tokens is one increment, not 5 000 window entries), driven by
  `tokens.py`: a request reserves its prompt estimate plus its completion cap at
  admission and is refused when that does not fit; when it ends the reservation is
  settled to what it really used (refund or extra charge, on the reservation's window).
- concurrency: `slots.py`, a slot per in-flight request, always given back.

A storage failure (Redis unreachable) fails open (serve, log once per incident,
count it in `storage_errors` and each request served unlimited in `fail_open`, both
exported as `bastion_ratelimit_*_total`) or closed (503 with Retry-After), per
settings. Only the storage's own failures count as one (`STORAGE_ERRORS`): any other
exception is a bug, answered 500 with its traceback in the log, never "limits off".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, cast

from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import GatewayError
from ..redisio import Redis, RedisUnavailable, Script
from .memory import MemoryStorage
from .redis_storage import LeanRedisStorage
from .slots import MemorySlots, RedisSlots, Slots
from .tokens import MemoryTokens, RedisTokens, TokenWindows
from .tokens import Reservation as TokenReservation

log = logging.getLogger("bastion.ratelimit")

Headers = list[tuple[bytes, bytes]]
MINUTE = 60
REDIS_PREFIX = "bastion:limits"

# "The storage is unavailable": what the Redis client raises when Redis cannot be reached, answers too late,
# refuses us (a wrong password is not a bug of ours) or is a read-only replica mid-failover (`RedisUnavailable`;
# an error reply to a script is a `ReplyError`: a bug); the `limits` library's wrapped storage errors; and the
# socket's own (OSError, TimeoutError).
STORAGE_ERRORS: tuple[type[BaseException], ...] = (RedisUnavailable, StorageError, OSError, TimeoutError)


class LimitedPrincipal(Protocol):
    """What the limiter reads from the auth stage's Principal (None = the settings' default)."""

    @property
    def id(self) -> str: ...
    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def max_concurrent(self) -> int | None: ...


class PerMinute(RateLimitItemPerMinute):
    """`amount` per minute, whose `key_for(key)` is one concatenation.

    The strategies build a storage key on every call (four times per request); the
    library's `key_for` joins a list of normalised parts each time. The keys are the
    same strings, so Redis keys do not change.
    """

    __slots__ = ("_suffix",)

    def __init__(self, amount: int) -> None:
        super().__init__(amount)
        self._suffix = super().key_for()[len(self.namespace) :]  # "/600/1/minute"

    def key_for(self, *identifiers: bytes | str | int | float) -> str:
        if len(identifiers) == 1 and isinstance(identifiers[0], str):
            return self.namespace + "/" + identifiers[0] + self._suffix
        return super().key_for(*identifiers)


@lru_cache(maxsize=1024)
def per_minute(amount: int) -> PerMinute:
    return PerMinute(amount)


def reset_duration(seconds: float) -> str:
    """OpenAI's reset format: "0s", "250ms", "17s", "6m0s", "1h2m3s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(round(seconds, 3))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after(reset_time: float, now: float) -> int:
    """Whole seconds until `reset_time`, at least 1 (what `Retry-After` carries)."""
    return max(1, math.ceil(reset_time - now))


_HEADER_NAMES = {
    kind: tuple(b"x-ratelimit-" + part + b"-" + kind.encode() for part in (b"limit", b"remaining", b"reset"))
    for kind in ("requests", "tokens")
}


def limit_headers(kind: str, limit: int, remaining: int, reset_in: float) -> Headers:
    """`x-ratelimit-{limit,remaining,reset}-{kind}` (kind: requests or tokens) as OpenAI sends them."""
    limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
    return [
        (limit_name, b"%d" % limit),
        (remaining_name, b"%d" % max(0, remaining)),
        # A window with nothing counted in it has nothing to reset.
        (reset_name, _reset_bytes(reset_in) if remaining < limit else b"0s"),
    ]


def _reset_bytes(seconds: float) -> bytes:
    """`reset_duration(seconds)` as bytes; the two forms every request's headers carry (under a second, under a
    minute) made directly, without the hour and minute arithmetic."""
    if 0 < seconds < 1:
        return b"%dms" % math.ceil(seconds * 1000)
    if 1 <= seconds < 59:  # rounded up, still under a minute
        return b"%ds" % math.ceil(round(seconds, 3))
    return reset_duration(seconds).encode()


def _tokens_left(tpm: int, left: int, reset_in: float) -> Headers:
    """A refusal's tokens headers: what is left once its reservation is given back (none without a limit)."""
    return limit_headers("tokens", tpm, left, reset_in) if tpm > 0 else []


@dataclass(slots=True)
class Admission:
    """An admitted request: what to release and settle when it ends, and its response headers."""

    key: str
    tpm: int
    slot: str | None
    headers: Headers
    reserved: int = 0  # tokens reserved against the tokens/min window
    ticket: int = 0  # which window counter holds them (see tokens.py)
    window: str = ""  # that window's storage key (tpm > 0), kept for the settle


class RateLimited(GatewayError):
    """A 429 (or, failing closed, a 503) with the reason word for the exchange."""

    def __init__(self, status: int, message: str, reason: str, headers: Headers, code: str | None = None) -> None:
        super().__init__(status, message, code=code, headers=headers)
        self.reason = reason


class RateLimiter:
    """Per-principal limits on one storage (memory, or Redis when a `redis` client is given); 0 = unlimited.

    The client is the caller's (the process's one connection, shared with the budget ledger): the caller
    closes it, after this limiter's service has stopped."""

    def __init__(
        self,
        *,
        rpm: int,
        tpm: int,
        max_concurrent: int,
        auth_failure_limit: int = 0,
        redis: Redis | None = None,
        fail_open: bool = True,
        slot_ttl: float = 60.0,
    ) -> None:
        self.default_rpm = rpm
        self.default_tpm = tpm
        self.default_concurrent = max_concurrent
        self.auth_failure_limit = auth_failure_limit
        self._auth_item = per_minute(auth_failure_limit) if auth_failure_limit > 0 else None
        self.fail_open = fail_open
        # Storage incidents seen (each failed storage call) and requests served without limits because of one;
        # exported by `collector()`.
        self.storage_errors = 0
        self.fail_open_admissions = 0
        self._degraded = False
        self.shared = redis is not None
        self.slots: Slots
        self.token_windows: TokenWindows
        if redis is not None:
            client = redis
            slots = RedisSlots(client, slot_ttl)
            tokens = RedisTokens(client, REDIS_PREFIX)
            windows = LeanRedisStorage(client, REDIS_PREFIX)
            self.slots, self.token_windows = slots, tokens
            self.storage: Storage = windows
            self._redis: Redis | None = client
            self._memory: MemoryStorage | None = None
            self._local: tuple[MemorySlots, MemoryTokens] | None = None
            # The Redis parts again, by their own types: the paths that save round trips (`admit`, `finish`).
            self._redis_parts: tuple[LeanRedisStorage, RedisSlots, RedisTokens] | None = (windows, slots, tokens)
            self._scripts: list[Script] = [
                windows.moving_window,
                windows.acquire_moving_window,
                *slots.scripts(),
                *tokens.scripts(),
            ]
        else:
            self._redis = None
            self._redis_parts = None
            self._scripts = []
            memory = self._memory = MemoryStorage()
            local = MemorySlots(), MemoryTokens(memory)
            self.slots, self.token_windows = local
            self.storage = memory
            # The memory parts by their own types: `admit` and `finish` call them plainly (nothing waits).
            self._local = local
        self.requests = MovingWindowRateLimiter(self.storage)
        # Failed logins are counted per process, even with Redis: slowing a key guesser needs no exact
        # cross-replica count, and the check runs before every credential, so it must cost no round trip.
        self._failure_log = MemoryStorage()
        self.failures = MovingWindowRateLimiter(self._failure_log)

    # --- lifetime ---------------------------------------------------------------------
    def service(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered at start-up: keeps this process's concurrency slots alive in Redis."""
        return self._service()

    @contextlib.asynccontextmanager
    async def _service(self) -> AsyncIterator[None]:
        await self._load_scripts()
        async with self.slots.running():
            yield

    async def _load_scripts(self) -> None:
        """Redis: load every script before the first request (else the first burst of calls all miss the script
        cache: each would load it and run again, correct but slower)."""
        if self._redis is None:
            return
        try:
            for script in self._scripts:
                await script.load()
        except Exception as exc:  # unreachable: the fail mode applies until it answers (scripts load on use)
            self._storage_failed(exc)

    # --- per request ------------------------------------------------------------------
    def limits_for(self, principal: LimitedPrincipal | None, client_ip: str) -> tuple[str, int, int, int]:
        """(storage key, rpm, tpm, max_concurrent); 0 means unlimited."""
        if principal is None:
            return "ip:" + client_ip, self.default_rpm, self.default_tpm, self.default_concurrent
        rpm = self.default_rpm if principal.rpm is None else principal.rpm
        tpm = self.default_tpm if principal.tpm is None else principal.tpm
        conc = self.default_concurrent if principal.max_concurrent is None else principal.max_concurrent
        return "p:" + principal.id, rpm, tpm, conc

    async def admit(
        self,
        principal: LimitedPrincipal | None,
        client_ip: str,
        tokens: int = 0,
        alongside: Callable[[], object] | None = None,
    ) -> Admission:
        """Reserve `tokens` (at most the whole tokens/min limit), take a concurrency slot and a request-window
        hit, or raise `RateLimited` having taken nothing.

        On Redis, `alongside` is called just before the request-window hit (the last write, once the tokens and
        the slot are admitted) so that what it queues on the shared connection leaves in the same write; it is
        not called otherwise (the caller then knows nothing was issued)."""
        key, rpm, tpm, conc = self.limits_for(principal, client_ip)
        admission = Admission(key, tpm, None, [])
        local = self._local
        try:
            now = time.time()
            token_headers: Headers = []  # for a response: what is left with this request's reservation
            # For a refusal after the reservation: what is left without it (it is given back), made only then.
            refused_left, reset = 0, 0.0
            slot_asked = False
            if tpm > 0:
                amount = min(max(tokens, 0), tpm)  # a request larger than the limit waits for an empty window
                window_key = admission.window = per_minute(tpm).key_for(key)
                if conc > 0 and self._redis_parts is not None:  # the reservation and the slot in one round trip
                    reservation = await self._reserve_with_slot(admission, window_key, tpm, amount, conc)
                    slot_asked = True
                elif local is not None:
                    reservation = local[1].reserve_now(window_key, tpm, MINUTE, amount)
                else:
                    reservation = await self.token_windows.reserve(window_key, tpm, MINUTE, amount)
                window = reservation.window
                left, reset = window.remaining(tpm, MINUTE), window.reset_in(MINUTE)
                token_headers = limit_headers("tokens", tpm, left, reset)
                if reservation.admitted:
                    refused_left = min(tpm, left + amount)
                else:
                    wait = window.fits_in(amount, tpm, MINUTE)
                    raise self._refused(
                        "tokens",
                        f"{tpm} tokens per minute (this request needs {amount})",
                        now + wait,
                        now,
                        [],
                        token_headers,
                    )
                admission.reserved, admission.ticket = amount, reservation.ticket
            if conc > 0:
                if local is not None:
                    admission.slot = local[0].acquire_now(key, conc)
                elif not slot_asked:
                    admission.slot = await self.slots.acquire(key, conc)
                if admission.slot is None:
                    request_headers = await self._request_headers(key, rpm, now) if rpm > 0 else []
                    plural = "request" if conc == 1 else "requests"
                    raise RateLimited(
                        429,
                        f"Rate limit reached: at most {conc} concurrent {plural}; retry when one finishes.",
                        "rate_limit_concurrency",
                        [(b"retry-after", b"1"), *request_headers, *_tokens_left(tpm, refused_left, reset)],
                    )
            headers: Headers = []
            if rpm > 0:
                item = per_minute(rpm)
                if self._redis_parts is not None:  # the strategy's hit and window stats, in one round trip
                    if alongside is not None:
                        alongside()
                    expiry = item.get_expiry()
                    admitted, start, count = await self._redis_parts[0].acquire_with_window(
                        item.key_for(key), rpm, expiry
                    )
                    reset_time, remaining = start + expiry, rpm - count
                else:
                    expiry = item.get_expiry()
                    if self._memory is not None:  # hit and window stats in one plain call
                        admitted, start, count = self._memory.acquire_with_window(item.key_for(key), rpm, expiry)
                        reset_time, remaining = start + expiry, rpm - count
                    else:
                        admitted = await self.requests.hit(item, key)
                        stats = await self.requests.get_window_stats(item, key)
                        reset_time, remaining = stats.reset_time, stats.remaining
                headers = limit_headers("requests", rpm, remaining, reset_time - now)
                if not admitted:
                    raise self._refused(
                        "requests",
                        f"{rpm} requests per minute",
                        reset_time,
                        now,
                        headers,
                        _tokens_left(tpm, refused_left, reset),
                    )
            self._recovered()
            admission.headers = headers + token_headers
            return admission
        except RateLimited:
            await self._undo(admission)
            raise
        except STORAGE_ERRORS as exc:
            await self._undo(admission)
            self._storage_failed(exc)
            if self.fail_open:
                self.fail_open_admissions += 1
                return Admission(key, 0, None, [])
            raise RateLimited(
                503,
                "Rate limiting is temporarily unavailable; retry shortly.",
                "rate_limit_storage",
                [(b"retry-after", b"1")],
                code="rate_limit_unavailable",
            ) from None
        except Exception:
            # A bug, not an unavailable storage: never serve it as "limits off". 500, with the traceback logged.
            log.exception("rate limiter failed on %s (a bug, not the storage): answering 500", key)
            await self._undo(admission)
            raise RateLimited(
                500, "The gateway failed to apply its rate limits.", "rate_limit_internal", [], code="internal_error"
            ) from None

    async def _reserve_with_slot(
        self, admission: Admission, window_key: str, tpm: int, amount: int, conc: int
    ) -> TokenReservation:
        """Redis: the tokens reservation and the concurrency slot, issued together (one write, one round trip).
        Whatever either took is recorded on `admission` before anything is raised, so that a refusal or a
        failure of the other gives it back (`_undo`), as when they were asked one after the other."""
        _, slots, tokens = cast(tuple[LeanRedisStorage, RedisSlots, RedisTokens], self._redis_parts)
        slot_call, slot = slots.acquire_call(admission.key, conc)
        try:
            reserved, taken = await cast(Redis, self._redis).pipeline(
                [tokens.reserve_call(window_key, tpm, MINUTE, amount), slot_call]
            )
        except BaseException:  # cancelled: whether the slot was taken is unknown; it expires unrefreshed
            slots.forget(admission.key, slot)
            raise
        if slots.acquired(admission.key, slot, taken):
            admission.slot = slot
        if isinstance(reserved, BaseException):
            raise reserved
        reservation = tokens.reservation(reserved)
        if reservation.admitted:
            admission.reserved, admission.ticket = amount, reservation.ticket
        if isinstance(taken, BaseException):
            raise taken
        return reservation

    async def _request_headers(self, key: str, rpm: int, now: float) -> Headers:
        stats = await self.requests.get_window_stats(per_minute(rpm), key)
        return limit_headers("requests", rpm, stats.remaining, stats.reset_time - now)

    async def _undo(self, admission: Admission) -> None:
        """Give back what a refused (or failed) admission took: its slot and its reservation (on Redis in one
        round trip, as a finished request's)."""
        await self.finish(admission, 0)
        admission.slot = None
        admission.reserved = 0

    @staticmethod
    def _refused(
        kind: str, what: str, reset_time: float, now: float, headers: Headers, token_headers: Headers
    ) -> RateLimited:
        wait = retry_after(reset_time, now)
        return RateLimited(
            429,
            f"Rate limit reached: {what}. Retry in {reset_duration(reset_time - now)}.",
            "rate_limit_" + kind,
            [(b"retry-after", str(wait).encode()), *headers, *token_headers],
        )

    async def finish(self, admission: Admission, tokens: int) -> None:
        """When a request ends: give its slot back and settle its reservation to `tokens` (on Redis, in one
        round trip; each call's failure counted as `release` and `settle` count it)."""
        delta = tokens - admission.reserved
        local = self._local
        if local is not None:  # memory: the same steps as `release` then `settle`, as plain calls
            try:
                if admission.slot is not None:
                    local[0].release_now(admission.key, admission.slot)
            finally:
                if admission.tpm > 0 and delta != 0:
                    key = admission.window or per_minute(admission.tpm).key_for(admission.key)
                    local[1].settle_now(key, MINUTE, admission.ticket, delta, tokens)
            return
        parts = self._redis_parts
        if parts is None or admission.slot is None or admission.tpm <= 0 or delta == 0 or self._redis is None:
            try:
                await self.release(admission)
            finally:
                await self.settle(admission, tokens)
            return
        _, slots, windows = parts
        key = per_minute(admission.tpm).key_for(admission.key)
        calls = [
            slots.release_call(admission.key, admission.slot),
            windows.settle_call(key, MINUTE, admission.ticket, delta, tokens),
        ]
        for reply in await self._redis.pipeline(calls):
            if isinstance(reply, Exception):
                self._storage_failed(reply)

    async def release(self, admission: Admission) -> None:
        if admission.slot is not None:
            try:
                await self.slots.release(admission.key, admission.slot)
            except Exception as exc:  # with Redis the slot expires by itself
                self._storage_failed(exc)

    async def settle(self, admission: Admission, tokens: int) -> None:
        """Settle a finished request's reservation to the `tokens` it used: refund the rest, or charge the excess."""
        delta = tokens - admission.reserved
        if admission.tpm <= 0 or delta == 0:
            return
        key = per_minute(admission.tpm).key_for(admission.key)
        try:
            await self.token_windows.settle(key, MINUTE, admission.ticket, delta, tokens)
        except Exception as exc:
            self._storage_failed(exc)

    # --- failed authentication (the auth stage calls this) ------------------------------
    async def hit_auth_failure(self, client: str) -> GatewayError | None:
        """After a refused credential from `client` (an address, an IPv6 /64): count it, or, once the
        budget is spent, the 429 to answer instead.

        Only refused credentials come here: a valid one is admitted whatever the address's record
        (many people share one address behind NAT), and a request without any credential is no guess.
        Failed logins are counted in this process only (`_failure_log`), so the check costs no round trip.
        """
        item = self._auth_item
        if item is None:
            return None
        key = "authfail/" + client
        if await self.failures.hit(item, key):
            return None
        stats = await self.failures.get_window_stats(item, key)
        return self._auth_refusal(stats.reset_time)

    def _auth_refusal(self, reset_time: float) -> GatewayError:
        now = time.time()
        return RateLimited(
            429,
            f"Too many failed authentication attempts from this address. Retry in {reset_duration(reset_time - now)}.",
            "rate_limit_auth_failures",
            [(b"retry-after", str(retry_after(reset_time, now)).encode())],
        )

    # --- storage incidents --------------------------------------------------------------
    def _storage_failed(self, exc: BaseException) -> None:
        """Count and log a storage incident; anything that is not one (a bug) is raised again, as it was."""
        if not isinstance(exc, STORAGE_ERRORS):
            raise exc
        self.storage_errors += 1
        if not self._degraded:
            self._degraded = True
            mode = "serving without limits (fail open)" if self.fail_open else "refusing with 503 (fail closed)"
            # bastion's own Redis errors say why in words that hold no secret ("cannot connect to Redis:
            # Connection refused"); other storages' may quote their URL, so only their type is shown.
            why = str(exc) if isinstance(exc, RedisUnavailable) else type(exc).__name__
            log.error("rate-limit storage unreachable, %s: %s (check BASTION_REDIS_URL)", mode, why)

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.warning("rate-limit storage reachable again; limits enforced")

    def collector(self) -> Collector:
        """The storage's health for the metrics registry, read at scrape time."""
        return _StorageCollector(self)


class _StorageCollector(Collector):
    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "bastion_ratelimit_storage_errors",
            "Rate-limit storage calls that failed (Redis unreachable, timed out, refusing).",
            self._limiter.storage_errors,
        )
        yield CounterMetricFamily(
            "bastion_ratelimit_fail_open",
            "Requests served without rate limits because the storage failed (BASTION_REDIS_FAIL_MODE=open).",
            self._limiter.fail_open_admissions,
        )


class RedisCollector(Collector):
    """The process's one Redis connection (the limiter's and the ledger's): sends and commands, read at scrape
    time. Sends are round trips: their rate over the request rate is what a request costs in Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "bastion_redis_writes",
            "Sends on this process's Redis connection: each is one round trip for the commands in it.",
            self._redis.writes,
        )
        yield CounterMetricFamily(
            "bastion_redis_commands", "Commands sent on this process's Redis connection.", self._redis.commands
        )
