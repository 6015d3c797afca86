"""An external upstream (BASTION_UPSTREAM_URL) that explains itself.

bastion does not own it, so requests are always forwarded (failures surface as
502/504). But an operator must see a mistake without reading code: a light
background check (every health interval, over the probe channel) keeps `/ready`,
`bastion_upstream_up` and the upstream's `detail` current, and logs ONE line per
change: unreachable (refused, timeout, DNS), a URL ending in /v1, a key the upstream
refuses, and reachable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

from .probe import HTTP_FAILURES, UP, Probe, ProbeChannel, Verdict, failure
from .state import Upstream

log = logging.getLogger("bastion.upstream")
_FRESH = 1.0  # seconds a check answers /ready and scrapes before another is made
_WRONG_ROOT = "BASTION_UPSTREAM_URL should be the server's root, without /v1"
_BAD_KEY = "it refuses bastion's key ({status}): BASTION_UPSTREAM_API_KEY is missing or wrong"
_MISCONFIGURED = frozenset({Verdict.WRONG_ROOT, Verdict.UNAUTHORIZED})


async def check_external(channel: ProbeChannel, base_url: str, api_key: str | None) -> Probe:
    """Can requests through this base URL and key work? /health for life, /v1/models for the URL and the key.

    A server without /health (404) is judged by /v1/models alone.
    """
    headers = [(b"authorization", b"Bearer " + api_key.encode())] if api_key else []
    wrong_root = base_url.rstrip("/").endswith("/v1")
    for path in (b"/health", b"/v1/models"):
        try:
            status = await channel.fetch(base_url, path, headers)
        except HTTP_FAILURES as exc:
            return failure(exc, channel.timeout)
        if status != 200 and wrong_root:  # (vLLM answers 404 under /v1/v1/..., or 401 when keyed)
            return Probe(Verdict.WRONG_ROOT, _WRONG_ROOT)
        if status in (401, 403):
            return Probe(Verdict.UNAUTHORIZED, _BAD_KEY.format(status=status))
        if status != 200 and (path != b"/health" or status != 404):
            return Probe(Verdict.STATUS, f"GET {path.decode()} answered {status}")
    return UP


def status_of(probe: Probe) -> str:
    """The `status` /ready shows for an external upstream."""
    if probe.up:
        return "ready"
    return "misconfigured" if probe.verdict in _MISCONFIGURED else "unreachable"


class ExternalWatch:
    """Keeps what bastion knows about an external upstream current; an async context manager.

    Inside the lifespan a background task checks every `interval`. `current()` (for /ready
    and scrapes) answers from a check under a second old, else makes one; concurrent
    callers share one check in flight, so a flood of /ready costs the upstream nothing.
    """

    def __init__(self, upstream: Upstream, channel: ProbeChannel, interval: float) -> None:
        self._upstream = upstream
        self._channel = channel
        self._interval = interval
        self._shown = _shown_url(upstream.base_url)
        self.last: Probe | None = None
        self._checked_at = 0.0
        self._flight: asyncio.Future[Probe] | None = None
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> Probe:
        if self.last is not None and time.monotonic() - self._checked_at < min(_FRESH, self._interval):
            return self.last
        return await self.check()

    async def up(self) -> bool:
        return (await self.current()).up

    async def check(self) -> Probe:
        flight = self._flight
        if flight is None:
            flight = self._flight = asyncio.ensure_future(self._check())
            flight.add_done_callback(self._landed)
        return await asyncio.shield(flight)  # a caller that goes away does not cancel the others' check

    def _landed(self, flight: asyncio.Future[Probe]) -> None:
        self._flight = None
        if not flight.cancelled():
            flight.exception()  # retrieved: a failed check is the caller's to see, not the loop's to warn about

    async def _check(self) -> Probe:
        probe = await check_external(self._channel, self._upstream.base_url, self._upstream.api_key)
        if probe.verdict is Verdict.BUSY and self.last is not None:
            return self.last  # our own probe channel is busy: that says nothing about the upstream
        self._checked_at = time.monotonic()
        previous, self.last = self.last, probe
        self._upstream.detail = probe.detail
        if previous is None or (previous.verdict, previous.detail) != (probe.verdict, probe.detail):
            if probe.up:
                log.info("upstream %s reachable", self._shown)
            else:
                log.warning("upstream %s %s: %s", self._shown, status_of(probe), probe.detail)
        return probe

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval)

    def _ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._upstream.detail = "bastion's check of it failed (see bastion's log)"
            log.error("upstream %s: the background check crashed: %r; /ready checks on demand only", self._shown, error)

    async def __aenter__(self) -> ExternalWatch:
        self._task = asyncio.create_task(self._run(), name="bastion-external-check")
        self._task.add_done_callback(self._ended)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for pending in (self._task, self._flight):
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending


def _shown_url(url: str) -> str:
    """The URL as a log line may show it: without user:password@."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
