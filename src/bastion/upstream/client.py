"""The one connection pool to the upstream, and the mapping of its failures to statuses.

The hot path (`Proxy`) calls `UpstreamClient.open`, which sends on the lean
HTTP/1.1 pool in `http1`; everything else (health probes, /ready, the metrics
passthrough) uses httpx's API on top of the same pool (`transport.PoolTransport`).
Measured on the 2-core reference machine, CPU per proxied request on the client
side: httpx.AsyncClient over its native pool ~2-3 ms, over httpx-aiohttp 440 µs,
aiohttp itself 168 µs in isolation and ~110 µs inside the running gateway, this
pool ~25 µs (docs/architecture.md). The hot path cannot afford the difference.
"""

from __future__ import annotations

import ssl
from types import TracebackType
from urllib.parse import urlsplit

import httpx

from ..config import Settings
from ..errors import GatewayError
from . import http1
from .http1 import Headers, Response, Timeouts
from .pool import Pool
from .transport import PoolTransport

# What a probe or side request through `UpstreamClient.http` can raise when the upstream misbehaves.
HTTP_FAILURES: tuple[type[BaseException], ...] = (httpx.HTTPError, http1.UpstreamError, TimeoutError, OSError)


class UpstreamClient:
    """Owns the pools (one per upstream origin); an async context manager closed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.timeouts = Timeouts(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,
            write=settings.upstream_write_timeout,
            pool=settings.upstream_pool_timeout,
        )
        self._max_connections = settings.upstream_max_connections
        self._keepalive_expiry = settings.upstream_keepalive_expiry
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._bases: dict[str, tuple[Pool, bytes]] = {}  # base URL -> its pool and path prefix
        t = self.timeouts
        self.http = httpx.AsyncClient(
            transport=PoolTransport(self),
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
            trust_env=False,
        )

    def pool(self, scheme: str, host: str, port: int | None) -> Pool:
        """The pool for an origin (no port: the scheme's), created on first use (inside the running event loop)."""
        port = port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is None:
            if scheme not in ("http", "https"):
                raise ValueError(f"unsupported upstream scheme {scheme!r}")
            pool = self._pools[key] = Pool(
                host,
                port,
                ssl_context=ssl.create_default_context() if scheme == "https" else None,  # verified, system CAs
                timeouts=self.timeouts,
                max_connections=self._max_connections,
                keepalive_expiry=self._keepalive_expiry,
            )
        return pool

    async def open(self, method: str, base_url: str, target: bytes, headers: Headers, body: bytes) -> Response:
        """Send `method base_url+target` and return once the response head is in (see `Pool.open`)."""
        found = self._bases.get(base_url)
        if found is None:
            parts = urlsplit(base_url)
            found = self._bases[base_url] = (
                self.pool(parts.scheme, parts.hostname or "", parts.port),
                parts.path.rstrip("/").encode("latin-1"),
            )
        pool, prefix = found
        return await pool.open(method.encode("ascii"), prefix + target if prefix else target, headers, body)

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()
        for pool in self._pools.values():
            pool.close()


async def answers_health(client: httpx.AsyncClient, url: str, seconds: float) -> bool:
    """Does the upstream's health endpoint answer 200 within `seconds`? Any failure is a no."""
    try:
        response = await client.get(url, timeout=seconds)
    except HTTP_FAILURES:
        return False
    return response.status_code == 200


def upstream_failure(exc: BaseException) -> GatewayError:
    """Map a failure talking to the upstream to the status the client sees (502, 503 or 504).

    Accepts the pool's exceptions and httpx's (whose cause, where it is one of the pool's, decides).
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None else exc
    if isinstance(cause, http1.PoolTimeout | httpx.PoolTimeout):
        return GatewayError(
            503,
            "Every connection to the model server is busy; retry shortly.",
            code="upstream_busy",
            headers=[(b"retry-after", b"1")],
        )
    if isinstance(cause, http1.ConnectTimeout | httpx.ConnectTimeout):
        return GatewayError(502, "The model server could not be reached in time.", code="upstream_unavailable")
    if isinstance(cause, http1.ReadTimeout | http1.WriteTimeout | TimeoutError | httpx.TimeoutException):
        return GatewayError(504, "The model server did not answer in time.", code="upstream_timeout")
    return GatewayError(
        502, "The model server could not be reached or failed mid-request.", code="upstream_unavailable"
    )
