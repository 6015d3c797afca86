"""The engine's own waiting queue, read from its /metrics about once a second over the probe channel.

vLLM exports `vllm:num_requests_waiting` (the simulator too). Scrapes go over a channel of
their own, so they never queue behind client traffic; a failed scrape keeps the last value
for `stale_after` seconds, then counts the queue as empty (the outstanding cap still holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable

import httpx

from ..background import background
from ..engine.probe import HTTP_FAILURES

log = logging.getLogger("bastion.fairness")
_WAITING = re.compile(rb"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)


def waiting_of(text: bytes) -> int | None:
    """The sum of `vllm:num_requests_waiting` over its series, or None if the exposition has none."""
    values = [float(m.group(1)) for m in _WAITING.finditer(text)]
    return round(sum(values)) if values else None


@contextlib.asynccontextmanager
async def watch_waiting(
    client: httpx.AsyncClient,
    base_url: Callable[[], str],
    api_key: Callable[[], str | None],
    report: Callable[[int], None],
    *,
    interval: float = 1.0,
    scrape_timeout: float = 2.0,
    stale_after: float = 5.0,
) -> AsyncIterator[None]:
    """Lifespan service: scrape every `interval` seconds and `report` the engine's waiting count."""

    async def loop() -> None:
        good = time.monotonic()
        warned = False
        while True:
            headers = {"authorization": f"Bearer {key}"} if (key := api_key()) else {}
            value: int | None = None
            try:
                response = await client.get(base_url() + "/metrics", headers=headers, timeout=scrape_timeout)
                if response.status_code == 200:
                    value = waiting_of(response.content)
            except HTTP_FAILURES:
                value = None
            if value is not None:
                good, warned = time.monotonic(), False
                report(value)
            elif time.monotonic() - good > stale_after:
                if not warned:
                    log.warning("the engine's vllm:num_requests_waiting cannot be read; counting its queue as empty")
                    warned = True
                report(0)
            await asyncio.sleep(interval)

    async with background(loop):
        yield
