"""The one shared upstream client and the mapping of its failures to statuses.

httpx is the API; the transport under it is aiohttp's (via httpx-aiohttp),
chosen by measurement: httpx's native pool costs milliseconds of CPU per proxied
request under load, the aiohttp transport a fraction of that (docs/architecture.md).
Tests pass their own transport (e.g. respx's) to `create_app`.
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from ..config import Settings
from ..errors import GatewayError


def build_client(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """One client for the gateway's whole life: explicit timeouts and pool limits.

    The read timeout bounds the silence between two reads, not the whole
    response, so a long generation is never cut while tokens keep coming.
    """
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=settings.upstream_write_timeout,
        pool=settings.upstream_pool_timeout,
    )
    limits = httpx.Limits(
        max_connections=settings.upstream_max_connections,
        max_keepalive_connections=settings.upstream_max_connections,
        keepalive_expiry=settings.upstream_keepalive_expiry,
    )
    if transport is None:
        transport = AiohttpTransport(limits=limits, trust_env=False)
    return httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits, trust_env=False)


def upstream_failure(exc: BaseException) -> GatewayError:
    """Map a transport failure to the status the client sees (502 or 504).

    httpx-aiohttp maps aiohttp's connection errors loosely (a refused connection
    arrives as ConnectTimeout), so the aiohttp cause decides where there is one.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError):
        return _unreachable()
    if isinstance(cause, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return _timed_out()
    if isinstance(exc, httpx.PoolTimeout):
        return GatewayError(
            503,
            "The gateway has no free upstream connection; retry shortly.",
            code="upstream_busy",
            headers=[(b"retry-after", b"1")],
        )
    if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError):
        return _timed_out()
    return _unreachable()


def _unreachable() -> GatewayError:
    return GatewayError(502, "The model server could not be reached or failed mid-request.")


def _timed_out() -> GatewayError:
    return GatewayError(504, "The model server did not answer in time.")
