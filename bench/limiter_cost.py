"""Per-request cost of the rate limiter: admit + release + charge, memory vs Redis.

    python bench/limiter_cost.py [redis://127.0.0.1:6379/0]

A quick micro-benchmark (one event loop, sequential requests, limits high enough
never to refuse), not a timed test. Prints microseconds per request.
"""

from __future__ import annotations

import asyncio
import sys
import time

from pydantic import SecretStr

from bastion.asgi import Message, Receive, Scope, Send
from bastion.config import Settings
from bastion.exchange import Exchange
from bastion.limits import RateLimiter, RateLimitMiddleware
from bastion.usage import Usage


async def _upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """Stands in for the proxy: answers at once with 30 tokens of usage."""
    scope["bastion.exchange"].usage = Usage(10, 20)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def _send(message: Message) -> None:
    pass


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _loop(app: RateLimitMiddleware, n: int) -> None:
    for i in range(n):
        exchange = Exchange("r", "POST", "/v1/chat/completions", client_ip=f"10.0.{i % 200}.{i % 50}")
        await app({"type": "http", "headers": [], "bastion.exchange": exchange}, _receive, _send)


async def _baseline(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        exchange = Exchange("r", "POST", "/v1/chat/completions", client_ip=f"10.0.{i % 200}.{i % 50}")
        await _upstream({"type": "http", "headers": [], "bastion.exchange": exchange}, _receive, _send)
    return (time.perf_counter() - start) / n * 1e6


async def measure(limiter: RateLimiter, n: int) -> float:
    """Microseconds the middleware (admit + headers + release + charge) adds per request."""
    app = RateLimitMiddleware(_upstream, limiter)
    await _loop(app, 200)  # warm up (connections, scripts)
    start = time.perf_counter()
    await _loop(app, n)
    return (time.perf_counter() - start) / n * 1e6 - await _baseline(n)


async def main() -> None:
    base = {"rate_limit_rpm": 1_000_000, "rate_limit_tpm": 1_000_000_000, "rate_limit_max_concurrent": 1000}
    memory = RateLimiter(Settings(_env_file=None, **base))  # type: ignore[call-arg]
    async with memory.service():
        print(f"memory: {await measure(memory, 20_000):.1f} us/request (admit + headers + release + charge)")
    if len(sys.argv) > 1:
        shared = RateLimiter(Settings(_env_file=None, redis_url=SecretStr(sys.argv[1]), **base))  # type: ignore[call-arg]
        async with shared.service():
            print(f"redis:  {await measure(shared, 5_000):.1f} us/request (admit + headers + release + charge)")
            print(f"storage errors: {shared.storage_errors}")


if __name__ == "__main__":
    asyncio.run(main())
