"""httpx's API over the keep-alive pools (`pool.Pool`), for callers that want httpx's conveniences."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx

from . import http1
from .pool import Pool

PoolFor = Callable[[str, str, int | None], Pool]  # (scheme, host, port) -> the pool for that origin

# Set by the transport itself, never taken from the request.
_DROP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_ERRORS: tuple[tuple[type[http1.HTTPError], type[httpx.TransportError]], ...] = (
    (http1.PoolTimeout, httpx.PoolTimeout),
    (http1.ConnectTimeout, httpx.ConnectTimeout),
    (http1.ConnectError, httpx.ConnectError),
    (http1.ReadTimeout, httpx.ReadTimeout),
    (http1.WriteTimeout, httpx.WriteTimeout),
    (http1.RemoteProtocolError, httpx.RemoteProtocolError),
)


def _as_httpx(error: http1.HTTPError, request: httpx.Request) -> httpx.TransportError:
    for ours, theirs in _ERRORS:
        if isinstance(error, ours):
            return theirs(str(error), request=request)
    return httpx.TransportError(str(error), request=request)


class PoolTransport(httpx.AsyncBaseTransport):
    def __init__(self, pool_for: PoolFor, timeouts: http1.Timeouts) -> None:
        self._pool_for = pool_for
        self._timeouts_default = timeouts

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        pool = self._pool_for(url.scheme, url.host, url.port)
        body = await request.aread()
        headers = [(k.lower(), v) for k, v in request.headers.raw if k.lower() not in _DROP]
        timeouts = self._timeouts(request)
        try:
            response = await pool.open(request.method.encode("ascii"), url.raw_path, headers, body, timeouts)
        except http1.HTTPError as exc:
            raise _as_httpx(exc, request) from exc
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _timeouts(self, request: httpx.Request) -> http1.Timeouts:
        default = self._timeouts_default
        given = request.extensions.get("timeout", {})

        def pick(name: str, fallback: float) -> float:
            value = given.get(name)
            return fallback if value is None else float(value)

        return http1.Timeouts(
            connect=pick("connect", default.connect),
            read=pick("read", default.read),
            write=pick("write", default.write),
            pool=pick("pool", default.pool),
        )


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: http1.Response, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while chunk := await self._response.read_some():
                yield chunk
        except http1.HTTPError as exc:
            raise _as_httpx(exc, self._request) from exc

    async def aclose(self) -> None:
        self._response.release()
