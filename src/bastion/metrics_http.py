"""`/metrics` and `/metrics/upstream`: plain-ASGI endpoints with their own credential.

These routes are not behind API-key authentication (Prometheus has no API key);
they are protected separately by `ScrapeGuard`:

- `BASTION_METRICS_TOKEN` set: the scraper must send `Authorization: Bearer <token>`
  (compared in constant time), else 401.
- `BASTION_METRICS_ALLOW` set: the TCP peer must be inside one of the CIDRs, else 403.
  X-Forwarded-For is never read here: a scraper talks to the gateway directly.
- both set: both must pass. Neither set: only loopback peers (127.0.0.0/8, ::1),
  so a default install never shows its metrics to the network.
- a scrape that came through a proxy always needs the token: forwarded headers
  (X-Forwarded-For, Forwarded, X-Real-IP) are present, or the peer is a trusted proxy.
  The proxy's address says nothing about who is behind it: nginx on the same host
  is a loopback peer for every client on the internet. And with trusted proxies
  configured, a tokenless loopback default would be exactly that hole, so it is
  off: without a token (or an explicit allowlist) every scrape is refused.

`/metrics/upstream` relays the upstream's own `/metrics` (vLLM's `vllm:*` series:
queue length, KV-cache usage, token throughput) over a small client of its own (never
the pool client traffic fills, so it answers under full load), so one scraper with one
credential sees both and the raw vLLM port stays private. With several engines
(BASTION_ENGINES) it asks every replica at once, each bounded by its own timeout, and
answers one page with an `engine` label on every sample (`metrics_relay.py`); a replica
that does not answer is left out, shown as `bastion_upstream_scrape_up{engine} 0` and
counted in `bastion_upstream_scrape_errors_total{engine}`. In external mode `/metrics`
asks the engine's `ExternalWatch` (a check at most a second old) for `bastion_upstream_up`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Sequence

import httpx
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

from .asgi import ASGIApp, Receive, Scope, Send, header
from .auth.ipfilter import IPAddress, IPNetwork, in_networks, normalise_network, parse_ip
from .engine.probe import HTTP_FAILURES
from .engine.router import Backend
from .engine.state import Phase, Upstream
from .errors import GatewayError, send_error
from .metrics import Metrics
from .metrics_relay import MergedPages

LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_UPSTREAM_METRICS_TIMEOUT = 5.0


# Headers a proxy adds: their presence means the TCP peer is not the client.
FORWARDED_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})


class ScrapeGuard:
    """Decides whether a scrape may read metrics: token and/or peer allowlist, loopback by default.

    A scrape that came through a proxy (forwarded headers, or a trusted proxy as the peer) needs the token.
    """

    def __init__(
        self, token: str | None, allow: Sequence[IPNetwork], trusted_proxies: Sequence[IPNetwork] = ()
    ) -> None:
        self._token = token.encode() if token else None
        self._trusted = tuple(normalise_network(n) for n in trusted_proxies)
        if allow:
            self._networks = tuple(normalise_network(n) for n in allow)
        elif self._token is None and not self._trusted:
            self._networks = LOOPBACK
        else:
            self._networks = ()
        # No token, no allowlist, and a proxy in front: nothing identifies a scraper, so nothing scrapes.
        self.closed = self._token is None and not allow and bool(self._trusted)

    def refusal(self, scope: Scope) -> GatewayError | None:
        """None if the scrape is allowed, else the error to answer with."""
        if self.closed:
            return GatewayError(
                403, "Metrics need BASTION_METRICS_TOKEN when the gateway is behind a proxy.", code="forbidden"
            )
        peer = self._peer(scope)
        if self._networks and (peer is None or not in_networks(peer, self._networks)):
            return GatewayError(403, "This address may not read metrics.", code="forbidden")
        if self._token is not None:
            if not self._token_ok(scope):
                return GatewayError(401, "A valid metrics token is required.", code="invalid_api_key")
        elif self._proxied(scope, peer):
            return GatewayError(403, "Metrics read through a proxy need a metrics token.", code="forbidden")
        return None

    @staticmethod
    def _peer(scope: Scope) -> IPAddress | None:
        """The TCP peer only: X-Forwarded-For is never read for metrics."""
        client = scope.get("client")
        return parse_ip(client[0]) if client else None

    def _proxied(self, scope: Scope, peer: IPAddress | None) -> bool:
        if any(name in FORWARDED_HEADERS for name, _ in scope["headers"]):
            return True
        return peer is not None and bool(self._trusted) and in_networks(peer, self._trusted)

    def _token_ok(self, scope: Scope) -> bool:
        assert self._token is not None
        given = header(scope, b"authorization") or b""
        scheme, _, value = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self._token)


async def answer(send: Send, status: int, body: bytes, content_type: str, head: bool) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


class Protected:
    """Common front of both endpoints: guard, then GET/HEAD only."""

    def __init__(self, guard: ScrapeGuard) -> None:
        self._guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self._guard.refusal(scope)
        if error is None and scope["method"] not in ("GET", "HEAD"):
            error = GatewayError(405, f"Method {scope['method']} is not allowed here.")
        if error is not None:
            await send_error(send, error)
            return
        await self.serve(scope, send, head=scope["method"] == "HEAD")

    async def serve(self, scope: Scope, send: Send, *, head: bool) -> None:
        raise NotImplementedError


class MetricsEndpoint(Protected):
    """The gateway's own registry, in the format the scraper asks for (text or OpenMetrics)."""

    def __init__(
        self,
        guard: ScrapeGuard,
        metrics: Metrics,
        upstream: Callable[[], Upstream],
        probe: Callable[[], Awaitable[bool]],
    ) -> None:
        super().__init__(guard)
        self._metrics = metrics
        self._upstream = upstream
        self._probe = probe

    async def serve(self, scope: Scope, send: Send, *, head: bool) -> None:
        await self._refresh()
        accept = (header(scope, b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        await answer(send, 200, encoder(self._metrics.registry), content_type, head)

    async def page(self) -> bytes:
        """The page in Prometheus text format (a worker's part of the merged page)."""
        await self._refresh()
        return generate_latest(self._metrics.registry)

    async def _refresh(self) -> None:
        if self._upstream().phase is Phase.EXTERNAL:
            self._metrics.upstream.external_up = await self._probe()


class UpstreamMetricsEndpoint(Protected):
    """The upstream's `/metrics`, relayed as it is."""

    def __init__(self, guard: ScrapeGuard, upstream: Callable[[], Upstream], client: httpx.AsyncClient) -> None:
        super().__init__(guard)
        self._upstream = upstream  # the engine now: a restart gives it a new port and key
        self._client = client

    async def serve(self, scope: Scope, send: Send, *, head: bool) -> None:
        headers = {"accept": (header(scope, b"accept") or b"text/plain").decode("latin-1")}
        upstream = self._upstream()
        if upstream.api_key:
            headers["authorization"] = "Bearer " + upstream.api_key
        try:
            response = await self._client.get(
                upstream.base_url + "/metrics", headers=headers, timeout=_UPSTREAM_METRICS_TIMEOUT
            )
        except HTTP_FAILURES:
            await send_error(send, GatewayError(502, "The model server's metrics could not be read."))
            return
        if response.status_code != 200:
            await send_error(send, GatewayError(502, f"The model server's metrics answered {response.status_code}."))
            return
        content_type = response.headers.get("content-type", "text/plain; version=0.0.4")
        await answer(send, 200, response.content, content_type, head)


class EnginesMetricsEndpoint(Protected):
    """Every engine replica's `/metrics` as one page (several engines): asked concurrently, merged.

    The replicas are read from `backends` at each scrape, so a rolling restart's new child
    is the one asked. The merge (parsing and writing a few hundred kB of text for a large
    fleet) runs in a worker thread: the event loop keeps serving requests meanwhile.
    """

    def __init__(
        self,
        guard: ScrapeGuard,
        backends: Callable[[], Sequence[Backend]],
        client: httpx.AsyncClient,
        *,
        timeout: float,
        failed: Callable[[str], None],
    ) -> None:
        super().__init__(guard)
        self._backends = backends
        self._client = client
        self._timeout = timeout
        self._failed = failed  # counts a replica that did not answer, by its engine label

    async def serve(self, scope: Scope, send: Send, *, head: bool) -> None:
        backends = list(self._backends())
        pages = await asyncio.gather(*(self._page(backend.upstream) for backend in backends))
        labelled = [(backend.label, page) for backend, page in zip(backends, pages, strict=True)]
        body, missing = await asyncio.to_thread(_merge, labelled)
        for label in missing:
            self._failed(label)
        if len(missing) == len(backends):
            await send_error(send, GatewayError(502, "No model server's metrics could be read."))
            return
        await answer(send, 200, body, CONTENT_TYPE_LATEST, head)

    async def _page(self, upstream: Upstream) -> str | None:
        headers = {"accept": "text/plain"}  # Prometheus text: what the merge parses
        if upstream.api_key:
            headers["authorization"] = "Bearer " + upstream.api_key
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client.get(upstream.base_url + "/metrics", headers=headers)
        except HTTP_FAILURES:
            return None
        return response.text if response.status_code == 200 else None


def _merge(pages: Sequence[tuple[str, str | None]]) -> tuple[bytes, list[str]]:
    """The merged page, and the engines left out of it (no answer, or not Prometheus text)."""
    merged = MergedPages()
    missing = []
    for label, page in pages:
        try:
            if page is None:
                raise ValueError(label)
            merged.add(label, page)
        except ValueError:
            merged.missing(label)
            missing.append(label)
    return merged.render(), missing


def metrics_routes(
    guard: ScrapeGuard,
    metrics: Metrics,
    upstream: Callable[[], Upstream],
    client: httpx.AsyncClient,
    probe: Callable[[], Awaitable[bool]],
    engines: Callable[[], Sequence[Backend]] | None = None,
) -> dict[str, ASGIApp]:
    """The exact paths to mount in front of FastAPI, all behind one `ScrapeGuard`.

    `engines` (several engines configured): `/metrics/upstream` merges every replica's page.
    """
    relay: ASGIApp = UpstreamMetricsEndpoint(guard, upstream, client)
    if engines is not None:
        relay = EnginesMetricsEndpoint(
            guard, engines, client, timeout=_UPSTREAM_METRICS_TIMEOUT, failed=metrics.scrape_failed
        )
    return {"/metrics": MetricsEndpoint(guard, metrics, upstream, probe), "/metrics/upstream": relay}
