"""Does an engine answer? Probes over a channel of their own.

Health probes used to share the capped pool with client traffic: with every
connection busy streaming, a probe waited for a free one, timed out, counted as a
failure, and the supervisor killed a healthy vLLM. A `ProbeChannel` is its own small
`bastion.http.Client` (a few connections, short timeouts), so client traffic can never
starve it; and a probe that finds even this channel busy is `Verdict.BUSY`: load,
never death.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

import httpx

from .. import http

# What a probe or side request through httpx over our pools can raise when the upstream misbehaves.
HTTP_FAILURES: tuple[type[BaseException], ...] = (httpx.HTTPError, http.HTTPError, TimeoutError, OSError)
# One for the health loop, one for /ready or a scrape, one spare: probes are one at a time per caller.
PROBE_CONNECTIONS = 3
_KEEPALIVE = 4.0  # below uvicorn's (and so vLLM's) 5 s keep-alive: reuse, rarely a race with its close
_MAX_BODY = 256 * 1024  # a probe reads a status, not a document


class Verdict(StrEnum):
    UP = "up"
    BUSY = "busy"  # no free probe connection: load, never death
    REFUSED = "refused"
    TIMEOUT = "timeout"
    NO_SUCH_HOST = "no_such_host"
    UNREACHABLE = "unreachable"  # another connect failure
    BROKEN = "broken"  # connected, but the answer is not HTTP or was cut short
    STATUS = "status"  # an HTTP answer, not the expected one
    UNAUTHORIZED = "unauthorized"  # 401/403 to our key
    WRONG_ROOT = "wrong_root"  # the base URL ends in /v1


@dataclass(frozen=True, slots=True)
class Probe:
    verdict: Verdict
    detail: str = ""  # one line for /ready and the log; never a secret

    @property
    def up(self) -> bool:
        return self.verdict is Verdict.UP


UP = Probe(Verdict.UP)


def failure(exc: BaseException, timeout: float) -> Probe:
    """What a failed request says about the upstream, with the reason a person needs."""
    if isinstance(exc, http.PoolTimeout | httpx.PoolTimeout):
        return Probe(Verdict.BUSY, "every probe connection is busy")
    if isinstance(exc, http.ConnectTimeout | httpx.ConnectTimeout):
        return Probe(Verdict.TIMEOUT, f"no connection within {timeout:g}s")
    if isinstance(exc, http.ReadTimeout | http.WriteTimeout | httpx.TimeoutException | TimeoutError):
        return Probe(Verdict.TIMEOUT, f"no answer within {timeout:g}s")
    causes = (
        exc,
        exc.__cause__,
        exc.__context__,
    )  # our client raises its own error `from None`: the OS error is its context
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        return Probe(Verdict.NO_SUCH_HOST, "its host name does not resolve")
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return Probe(Verdict.REFUSED, "connection refused (nothing listens there)")
    if isinstance(exc, http.RemoteProtocolError | httpx.RemoteProtocolError):
        return Probe(Verdict.BROKEN, f"it does not answer HTTP/1.1 properly ({exc})")
    return Probe(Verdict.UNREACHABLE, str(exc) or type(exc).__name__)


class ProbeChannel:
    """A small client of its own for probes and side requests: client traffic never queues ahead of them.

    An async context manager (closes its connections). `http` is httpx's API over
    the same pool, for side requests that want it (relaying the engine's /metrics).
    """

    def __init__(self, timeout: float, *, max_connections: int = PROBE_CONNECTIONS) -> None:
        self.timeout = timeout
        self._client = http.Client(
            timeouts=http.Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout),
            max_connections=max_connections,
            keepalive_expiry=_KEEPALIVE,
        )
        self.http = self._client.http

    async def fetch(self, base_url: str, path: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> int:
        """GET base_url+path and read the answer; its status. Raises the client's errors.

        Bounded: connect, each silence while reading, and the wait for a free connection
        each take at most `timeout`.
        """
        response = await self._client.open("GET", base_url, path, list(headers), b"")
        try:
            size = 0
            while chunk := await response.read_some():
                size += len(chunk)
                if size > _MAX_BODY:
                    break
        finally:
            response.release()  # a response read to its end keeps its connection; anything else closes it
        return response.status

    async def health(self, base_url: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> Probe:
        """Does base_url/health answer 200? Any other outcome is a verdict with its reason."""
        try:
            status = await self.fetch(base_url, b"/health", headers)
        except HTTP_FAILURES as exc:
            return failure(exc, self.timeout)
        return UP if status == 200 else Probe(Verdict.STATUS, f"GET /health answered {status}")

    async def __aenter__(self) -> ProbeChannel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.__aexit__(exc_type, exc, tb)
