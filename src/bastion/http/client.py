"""The pools to every origin a gateway talks to, and httpx's API over the same pools.

The hot path calls `Client.open`, which sends on the lean HTTP/1.1 pool in `http1`;
callers that want httpx's conveniences use `Client.http` (`transport.PoolTransport`).
Measured on the 2-core reference machine, CPU per proxied request on the client
side: httpx.AsyncClient over its native pool ~2-3 ms, over httpx-aiohttp 440 µs,
aiohttp itself 168 µs in isolation and ~110 µs inside the running gateway, this
pool ~25 µs (docs/architecture.md). The hot path cannot afford the difference.

Clients are independent: a second small `Client` to the same origin (say
`max_connections=2`) has its own pools, so health probes sent through it never wait
behind a first client's traffic, however busy that one is.

This package imports nothing from the rest of bastion: it is an HTTP client.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit

import httpx

from .http1 import Headers, Response, Timeouts
from .pool import DEFAULT_MAX_KEEPALIVE, Pool
from .transport import PoolTransport


class Client:
    """Owns one pool per origin; an async context manager that closes them all.

    Per origin: at most `max_connections` open, at most `max_keepalive` of them kept idle
    (extra ones are closed when released), each for at most `keepalive_expiry` seconds.
    """

    def __init__(
        self,
        *,
        timeouts: Timeouts,
        max_connections: int,
        keepalive_expiry: float,
        max_keepalive: int = DEFAULT_MAX_KEEPALIVE,
    ) -> None:
        self.timeouts = timeouts
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive
        self._keepalive_expiry = keepalive_expiry
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._bases: dict[str, tuple[Pool, bytes]] = {}  # base URL -> its pool and path prefix
        t = timeouts
        self.http = httpx.AsyncClient(
            transport=PoolTransport(self.pool, timeouts),
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
                raise ValueError(f"unsupported scheme {scheme!r}")
            pool = self._pools[key] = Pool(
                host,
                port,
                ssl_context=ssl.create_default_context() if scheme == "https" else None,  # verified, system CAs
                timeouts=self.timeouts,
                max_connections=self._max_connections,
                max_keepalive=self._max_keepalive,
                keepalive_expiry=self._keepalive_expiry,
            )
        return pool

    async def open(
        self,
        method: str,
        base_url: str,
        target: bytes,
        headers: Headers,
        body: bytes,
        on_sent: Callable[[], None] | None = None,
    ) -> Response:
        """Send `method base_url+target` and return once the response head is in (see `Pool.open`)."""
        found = self._bases.get(base_url)
        if found is None:
            parts = urlsplit(base_url)
            found = self._bases[base_url] = (
                self.pool(parts.scheme, parts.hostname or "", parts.port),
                parts.path.rstrip("/").encode("latin-1"),
            )
        pool, prefix = found
        return await pool.open(
            method.encode("ascii"), prefix + target if prefix else target, headers, body, on_sent=on_sent
        )

    async def aclose(self) -> None:
        """Close every connection, busy ones included: requests in flight fail with `PoolClosed`."""
        await self.http.aclose()
        for pool in self._pools.values():
            pool.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
