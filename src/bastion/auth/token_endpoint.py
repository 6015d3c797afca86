"""`POST /v1/auth/token` (off by default): trade a valid API key for a short-lived JWT.

For clients that should not hold a long-lived key everywhere they run. The token
names the key it was minted from (`jwt.KEY_CLAIM`) and is that key's principal:
the same limit buckets (a token is never a fresh budget), the key's current policy
(IP allowlist, limits), the key's models or fewer, never past the key's expiry, and
it stops working once the key is revoked or deleted (at the next key reload). Only
API keys can be exchanged: a token exchanging itself could be renewed forever.

The endpoint sits behind the rate limiter, so minting counts against the key's
requests per minute like any other request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..asgi import ASGIApp, BodyTimeout, BodyTooLarge, ClientGone, Receive, Scope, Send, read_body
from ..context import Outcome, exchange_of
from ..errors import GatewayError, send_error
from .identity import Principal
from .jwt import mint

PATH = "/v1/auth/token"
_MAX_BODY = 16 * 1024
MIN_TTL = 1.0


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """How tokens are minted: BASTION_JWT_SECRET and friends, BASTION_TOKEN_ENDPOINT_TTL."""

    secret: str
    max_ttl: float = 900.0
    audience: str | None = None
    issuer: str | None = None
    models_claim: str = "models"
    body_timeout: float = 60.0


class TokenEndpoint:
    """Answers PATH itself; every other request goes on to `app` untouched."""

    def __init__(self, app: ASGIApp, config: TokenConfig) -> None:
        self.app = app
        self._config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        exchange = exchange_of(scope)
        try:
            try:
                raw = await read_body(receive, _MAX_BODY, seconds=self._config.body_timeout)
            except BodyTooLarge:
                raise GatewayError(413, f"The request body exceeds {_MAX_BODY} bytes.") from None
            except BodyTimeout:
                raise GatewayError(408, "The request body was not received in time.") from None
            body = self._issue(exchange.principal, scope["method"], raw)
        except GatewayError as error:
            exchange.status, exchange.outcome, exchange.reason = error.status, Outcome.REJECTED, error.resolved_code
            await send_error(send, error, [(b"x-request-id", exchange.request_id.encode())])
            return
        except ClientGone:
            exchange.outcome = Outcome.CLIENT_DISCONNECT
            return
        exchange.status = 200
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-request-id", exchange.request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _issue(self, principal: Principal | None, method: str, raw: bytes) -> bytes:
        if method != "POST":
            raise GatewayError(405, f"Method {method} is not allowed here.")
        if principal is None or principal.kind != "key":
            raise GatewayError(403, "Only an API key can be exchanged for a token.", code="forbidden")
        config = self._config
        request = _request(raw)
        ttl = _ttl(request.get("ttl", config.max_ttl), config.max_ttl)
        if principal.expires is not None:
            ttl = min(ttl, principal.expires - time.time())
            if ttl < MIN_TTL:
                raise GatewayError(403, "The API key expires too soon to mint a token.", code="forbidden")
        models = _models(request.get("models"), principal)
        token = mint(
            config.secret,
            principal.name,
            ttl,
            models=models,
            audience=config.audience,
            issuer=config.issuer,
            models_claim=config.models_claim,
            key_id=principal.id,
        )
        reply = {"access_token": token, "token_type": "bearer", "expires_in": int(ttl)}
        return json.dumps(reply, separators=(",", ":")).encode()


def _request(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError):
        raise GatewayError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(request, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    return request


def _ttl(asked: Any, max_ttl: float) -> float:
    """A lifetime in seconds: a finite number from MIN_TTL to `max_ttl` (JSON's NaN and Infinity are not)."""
    # The range check also refuses NaN (every comparison is false) and infinities; an int of any size compares.
    if isinstance(asked, bool) or not isinstance(asked, int | float) or not MIN_TTL <= asked <= max_ttl:
        raise GatewayError(
            400, f"`ttl` must be a number of seconds from {MIN_TTL:g} to {max_ttl:g}.", param="ttl", code="invalid_ttl"
        )
    return float(asked)


def _models(asked: Any, principal: Principal) -> list[str] | None:
    """The models the token may use: what was asked, within what the key allows (None: the key's own)."""
    if asked is None:
        return None
    if not isinstance(asked, list) or not all(isinstance(m, str) for m in asked):
        raise GatewayError(400, "`models` must be a list of model ids.", param="models")
    return sorted(m for m in set(asked) if principal.allows(m))
