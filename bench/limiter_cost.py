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

from bastion.config import Settings
from bastion.limits import RateLimiter


async def measure(limiter: RateLimiter, n: int) -> float:
    for i in range(200):  # warm up (connections, scripts)
        a = await limiter.admit(None, f"10.0.0.{i % 50}")
        await limiter.release(a)
        await limiter.charge(a, 30)
    start = time.perf_counter()
    for i in range(n):
        a = await limiter.admit(None, f"10.0.{i % 200}.{i % 50}")
        await limiter.release(a)
        await limiter.charge(a, 30)
    return (time.perf_counter() - start) / n * 1e6


async def main() -> None:
    base = {"rate_limit_rpm": 1_000_000, "rate_limit_tpm": 1_000_000_000, "rate_limit_max_concurrent": 1000}
    memory = RateLimiter(Settings(_env_file=None, **base))  # type: ignore[call-arg]
    async with memory.service():
        print(f"memory: {await measure(memory, 20_000):.1f} us/request (admit + release + charge)")
    if len(sys.argv) > 1:
        shared = RateLimiter(Settings(_env_file=None, redis_url=SecretStr(sys.argv[1]), **base))  # type: ignore[call-arg]
        async with shared.service():
            print(f"redis:  {await measure(shared, 5_000):.1f} us/request (admit + release + charge)")
            print(f"storage errors: {shared.storage_errors}")


if __name__ == "__main__":
    asyncio.run(main())
