"""Does an engine answer? The one health check, used by the supervisor, /ready and the metrics."""

from __future__ import annotations

import httpx

from .. import http

# What a probe or side request through httpx over our pools can raise when the upstream misbehaves.
HTTP_FAILURES: tuple[type[BaseException], ...] = (httpx.HTTPError, http.HTTPError, TimeoutError, OSError)


async def answers_health(client: httpx.AsyncClient, url: str, seconds: float) -> bool:
    """Does the upstream's health endpoint answer 200 within `seconds`? Any failure is a no."""
    try:
        response = await client.get(url, timeout=seconds)
    except HTTP_FAILURES:
        return False
    return response.status_code == 200
