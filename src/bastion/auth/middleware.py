"""The admission gate: a pure ASGI middleware in front of the proxy and the admin app.

Order matters and is fixed: client address first (a denied network is refused
before its credential is even read, so it learns nothing about keys), then the
credential (API key by hash lookup, or JWT), then the principal's own IP
allowlist. An admitted request carries its Principal in its context (`context.Exchange`);
the route stage and the proxy hold it to its models.

The failed-login budget (the rate limiter's `hit_auth_failure`) slows key guessing
without locking anyone out: only a request that presented a credential, and had it
refused, is counted (a browser's /favicon.ico is no guess); a valid credential is
always admitted, even from an address over its budget (an office behind one NAT
must not be locked out by one misconfigured script); and IPv6 clients are counted
by /64, so one subscriber's 2^64 addresses are one budget. Over budget, a refused
credential gets 429 instead of 401, after the same full check a valid one gets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ..asgi import ASGIApp, Receive, Scope, Send
from ..context import Exchange, Outcome, find_exchange
from ..errors import GatewayError, send_error
from .errors import AuthFailure
from .identity import Principal
from .ipfilter import IPAddress, IPPolicy, client_bucket
from .jwt import JWTVerifier, looks_like_jwt
from .keys import KeyStore

log = logging.getLogger("bastion.auth")
MAX_CREDENTIAL = 8192
_PEER_MEMO = 4096  # peers whose address is remembered (emptied when full)


class Authenticator:
    """Credential -> Principal. Keys are a dict lookup by hash; JWTs go to the verifier."""

    def __init__(self, keys: KeyStore, jwt: JWTVerifier | None) -> None:
        self.keys = keys
        self.jwt = jwt

    async def authenticate(self, token: str) -> Principal:
        if self.jwt is not None and looks_like_jwt(token):
            return await self.jwt.verify(token)
        entry = self.keys.lookup(token)
        if entry is None:
            raise AuthFailure("invalid_api_key")
        if entry.revoked:
            raise AuthFailure("revoked")
        if entry.not_after is not None and time.time() >= entry.not_after:
            raise AuthFailure("expired")
        return entry.principal


class Auth:
    """Authentication for one gateway: the key store, the JWT verifier, the global IP lists."""

    def __init__(self, keys: KeyStore, jwt: JWTVerifier | None, policy: IPPolicy, reload_interval: float = 1.0) -> None:
        self.keys = keys
        self.authenticator = Authenticator(keys, jwt)
        self.policy = policy
        self._interval = reload_interval
        if keys.path is None and not len(keys) and jwt is None:
            log.warning(
                "no credentials configured (BASTION_KEYS_FILE, BASTION_API_KEYS, BASTION_JWT_*): "
                "every /v1 request will be refused with 401"
            )

    def guard(self, app: ASGIApp, exempt: Iterable[str] = (), failures: FailureLimiter | None = None) -> AuthMiddleware:
        return AuthMiddleware(app, self.authenticator, self.policy, exempt, failures)

    def services(self) -> list[AbstractAsyncContextManager[object]]:
        return [self.keys.watching(self._interval)] if self.keys.path is not None else []


class FailureLimiter(Protocol):
    """Slows key guessing: a budget of refused credentials per client (the rate limiter)."""

    async def hit_auth_failure(self, client: str) -> GatewayError | None: ...


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        policy: IPPolicy,
        exempt: Iterable[str] = (),
        failures: FailureLimiter | None = None,
    ) -> None:
        self.app = app
        self._auth = authenticator
        self._policy = policy
        self._exempt = frozenset(exempt)
        self._failures = failures
        # Without trusted proxies the client is the TCP peer: its address, written form and verdict under the
        # global lists are the same for every request it makes (the policy is immutable), so worked out once.
        self._peers: dict[str | None, tuple[IPAddress | None, str, bool]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" or (kind == "http" and scope["path"] in self._exempt):
            await self.app(scope, receive, send)
            return
        if kind != "http":  # websockets: nothing is served that way; refuse rather than guess
            await send({"type": "websocket.close", "code": 1008})
            return
        exchange = find_exchange(scope)
        resolved = self._policy.needs_address
        ip, admitted = self._address(scope, exchange) if resolved else (None, True)
        try:
            principal = await self._admit(scope, exchange, ip, resolved, admitted)
        except AuthFailure as failure:
            error = failure.error()
            if self._failures is not None and error.status == 401 and failure.reason != "missing_credentials":
                # Counted only now, for a credential that was presented and refused.
                if not resolved:
                    ip = self._address(scope, exchange)[0]
                error = await self._failures.hit_auth_failure(client_bucket(ip)) or error
            log.debug("refused %s %s: %s", scope["method"], scope["path"], failure.reason)
            await self._refuse_error(send, error, failure.reason, exchange)
            return
        if exchange is not None:
            exchange.principal = principal
        await self.app(scope, receive, send)

    async def _admit(
        self, scope: Scope, exchange: Exchange | None, ip: IPAddress | None, resolved: bool, admitted: bool
    ) -> Principal:
        if not admitted:
            raise AuthFailure("ip_denied")
        principal = await self._auth.authenticate(_bearer(scope))
        if principal.networks:
            if not resolved:
                ip = self._address(scope, exchange)[0]
            if not principal.allows_ip(ip):
                raise AuthFailure("ip_denied")
        return principal

    def _address(self, scope: Scope, exchange: Exchange | None) -> tuple[IPAddress | None, bool]:
        """The client's address (recorded on the exchange) and whether the global lists admit it."""
        client = scope.get("client")
        peer = client[0] if client else None
        policy = self._policy
        if policy.trusted_proxies:
            forwarded = [v for k, v in scope["headers"] if k == b"x-forwarded-for"]
            ip = policy.client_ip(peer, forwarded)
            known = (ip, str(ip) if ip is not None else "", policy.admits(ip))
        else:
            known_peer = self._peers.get(peer)
            if known_peer is None:
                if len(self._peers) >= _PEER_MEMO:
                    self._peers.clear()
                ip = policy.client_ip(peer)
                known_peer = self._peers[peer] = (ip, str(ip) if ip is not None else "", policy.admits(ip))
            known = known_peer
        if exchange is not None:
            exchange.client_ip = known[1]
        return known[0], known[2]

    async def _refuse_error(self, send: Send, error: GatewayError, reason: str, exchange: Exchange | None) -> None:
        extra: list[tuple[bytes, bytes]] = []
        if exchange is not None:
            if error.status == 429:
                reason = "rate_limit_auth"
            exchange.status, exchange.outcome, exchange.reason = error.status, Outcome.REJECTED, reason
            extra.append((b"x-request-id", exchange.request_id.encode()))
        await send_error(send, error, extra)


def _bearer(scope: Scope) -> str:
    raw: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if raw is not None:
                # Two credentials are ambiguous (which one would a proxy in front, or the upstream, read?):
                # refuse rather than pick one.
                raise AuthFailure("invalid_api_key")
            raw = value
    if raw is None:
        raise AuthFailure("missing_credentials")
    scheme, _, token = raw.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or len(token) > MAX_CREDENTIAL:
        raise AuthFailure("invalid_api_key")
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        raise AuthFailure("invalid_api_key") from None
