"""Per-request cost of the rate limiter: admit (with a token reservation) + release + settle, memory vs Redis.

    python bench/limiter_cost.py [redis://127.0.0.1:6379/0]

A quick micro-benchmark (one event loop, sequential requests, limits high enough
never to refuse), not a timed test. Prints microseconds per request for:

- spread: requests from 200 client IPs, so each window holds few entries;
- one key, full window: every request on one key that already has `FULL` hits in
  its requests/min window (what ~2,000 requests/s on one key keep there), the case
  where a window's cost grows with its size;
- the failed-login count `hit_auth_failure` (it runs only for a refused credential:
  a valid one never touches the failure log).

Each request yields to the event loop once, as a server does between requests, so
work a storage schedules in the background is paid for inside the measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from bastion.asgi import Message, Receive, Scope, Send
from bastion.context import Exchange, exchange_of
from bastion.ratelimit import RateLimiter, RateLimitMiddleware
from bastion.usage import Usage

FULL = 100_000  # prior hits in the one-key window


async def _upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """Stands in for the proxy: answers at once with 30 tokens of usage."""
    exchange_of(scope).usage = Usage(10, 20)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def _send(message: Message) -> None:
    pass


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _ip(i: int, spread: bool) -> str:
    return f"10.0.{i % 200}.{i % 50}" if spread else "10.9.9.9"


def _scope(exchange: Exchange) -> dict[str, object]:
    scope: dict[str, object] = {"type": "http", "headers": []}
    exchange.attach(scope)
    return scope


def _exchange(i: int, spread: bool) -> Exchange:
    # A typical chat request: ~300 prompt tokens estimated from its body, max_tokens 256 reserved.
    return Exchange(
        "r", "POST", "/v1/chat/completions", client_ip=_ip(i, spread), prompt_estimate=300, completion_cap=256
    )


async def _loop(app: RateLimitMiddleware, n: int, spread: bool, pause: bool = True) -> None:
    for i in range(n):
        exchange = _exchange(i, spread)
        await app(_scope(exchange), _receive, _send)
        if pause:
            await asyncio.sleep(0)


async def _baseline(n: int, spread: bool) -> float:
    start = time.perf_counter()
    for i in range(n):
        exchange = _exchange(i, spread)
        await _upstream(_scope(exchange), _receive, _send)
        await asyncio.sleep(0)
    return (time.perf_counter() - start) / n * 1e6


async def measure(limiter: RateLimiter, n: int, spread: bool = True, prefill: int = 200) -> float:
    """Microseconds the middleware (admit + reserve + headers + release + settle) adds per request."""
    app = RateLimitMiddleware(_upstream, limiter)
    await _loop(app, prefill, spread, pause=False)  # warm up (connections, scripts), fill the window
    start = time.perf_counter()
    await _loop(app, n, spread)
    return (time.perf_counter() - start) / n * 1e6 - await _baseline(n, spread)


async def auth_check(limiter: RateLimiter, n: int) -> float:
    """Microseconds per `hit_auth_failure` call (one refused credential), spread over many addresses."""
    ips = [f"10.{i // 250 % 250}.{i % 250}.1" for i in range(n)]
    start = time.perf_counter()
    for ip in ips:
        await limiter.hit_auth_failure(ip)
    return (time.perf_counter() - start) / n * 1e6


async def report(name: str, limits: dict[str, Any], n: int, full: int) -> None:
    """Each scenario on a fresh limiter, so one's windows do not weigh on the next."""
    what = "us/request (admit + reserve + headers + release + settle)"
    async with _fresh(limits) as limiter:
        print(f"{name}: spread:               {await measure(limiter, n):6.1f} {what}")
    async with _fresh(limits) as limiter:
        print(f"{name}: one key, full window: {await measure(limiter, n // 4, False, full):6.1f} {what}")
    async with _fresh(limits) as limiter:
        print(f"{name}: hit_auth_failure, refused credential: {await auth_check(limiter, n):.2f} us/call")


@contextlib.asynccontextmanager
async def _fresh(limits: dict[str, Any]) -> AsyncIterator[RateLimiter]:
    limiter = RateLimiter(**limits)
    async with limiter.service():
        yield limiter
    if limiter.storage_errors:
        print(f"storage errors: {limiter.storage_errors}")


async def main() -> None:
    base: dict[str, Any] = {"rpm": 100_000_000, "tpm": 1_000_000_000, "max_concurrent": 1000, "auth_failure_limit": 20}
    await report("memory", base, 20_000, FULL)
    if len(sys.argv) > 1:
        await report("redis ", {**base, "redis_url": sys.argv[1]}, 4_000, 20_000)


if __name__ == "__main__":
    asyncio.run(main())
