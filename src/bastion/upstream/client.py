"""The one connection pool to the upstream, and the mapping of its failures to statuses.

One aiohttp session holds the pool. The hot path (`Proxy`) calls it directly;
everything else (health probes, /ready, metrics passthrough) uses httpx's API on
top of the same session through httpx-aiohttp. Measured on the 2-core reference
machine, CPU per proxied request on the client side: httpx.AsyncClient over its
native pool ~2-3 ms, httpx.AsyncClient over aiohttp 440 µs, an httpx.Request sent
straight to the aiohttp transport 290 µs, aiohttp itself 168 µs
(docs/architecture.md). The hot path cannot afford the difference.
"""

from __future__ import annotations

from types import TracebackType

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from ..config import Settings
from ..errors import GatewayError

# What a probe or side request through `UpstreamClient.http` can raise when the upstream misbehaves:
# httpx-aiohttp maps most aiohttp errors to httpx's, but not all (a response that is not HTTP comes
# through as aiohttp's ClientResponseError), so catch both families.
HTTP_FAILURES: tuple[type[BaseException], ...] = (httpx.HTTPError, aiohttp.ClientError, TimeoutError, OSError)


class UpstreamClient:
    """Owns the session; an async context manager closed at shutdown.

    Timeouts are explicit: the read timeout bounds the silence between two reads,
    not the whole response, so a long generation is never cut while tokens flow.
    """

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.upstream_pool_timeout,  # waiting for a pooled connection, connecting included
            sock_connect=settings.upstream_connect_timeout,
            sock_read=settings.upstream_read_timeout,
        )
        self.http = httpx.AsyncClient(
            transport=transport or AiohttpTransport(client=self._get_session),
            timeout=httpx.Timeout(
                connect=settings.upstream_connect_timeout,
                read=settings.upstream_read_timeout,
                write=settings.upstream_write_timeout,
                pool=settings.upstream_pool_timeout,
            ),
            trust_env=False,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session or self._get_session()

    def _get_session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running event loop."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._settings.upstream_max_connections,
                keepalive_timeout=self._settings.upstream_keepalive_expiry,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # bytes pass through as the upstream sent them
                skip_auto_headers=("Accept-Encoding", "User-Agent"),  # the client's own, or none
                trust_env=False,
            )
        return self._session

    async def open(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> aiohttp.ClientResponse:
        """Send a request and return once the response headers are in; the body is read by the caller.

        A pooled keep-alive connection that the upstream has closed in the meantime fails before
        anything was answered (aiohttp: "Can not write request body" / "Server disconnected");
        aiohttp retries that only for idempotent methods, so a POST is sent once more here, on
        another connection. A refused connection is not retried.
        """
        try:
            return await self.session.request(
                method, url, headers=headers, data=body or None, timeout=self.timeout, allow_redirects=False
            )
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return await self.session.request(
                method, url, headers=headers, data=body or None, timeout=self.timeout, allow_redirects=False
            )

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()
        if self._session is not None:
            await self._session.close()


async def answers_health(client: httpx.AsyncClient, url: str, seconds: float) -> bool:
    """Does the upstream's health endpoint answer 200 within `seconds`? Any failure is a no."""
    try:
        response = await client.get(url, timeout=seconds)
    except HTTP_FAILURES:
        return False
    return response.status_code == 200


def upstream_failure(exc: BaseException) -> GatewayError:
    """Map a failure talking to the upstream to the status the client sees (502 or 504).

    Accepts aiohttp's exceptions and httpx's (whose aiohttp cause, where there is
    one, decides: httpx-aiohttp reports a refused connection as a ConnectTimeout).
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None else exc
    if isinstance(cause, aiohttp.ConnectionTimeoutError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return GatewayError(502, "The model server could not be reached in time.", code="upstream_unavailable")
    if isinstance(cause, TimeoutError | httpx.TimeoutException):
        return GatewayError(504, "The model server did not answer in time.", code="upstream_timeout")
    return GatewayError(
        502, "The model server could not be reached or failed mid-request.", code="upstream_unavailable"
    )
