"""`POST /v1/auth/token` (off by default): trade a valid API key for a short-lived JWT.

For clients that should not hold a long-lived key everywhere they run. The token
carries the key's policy (models, limits, IP allowlist) or a narrower one the
caller asks for, never a wider one, and never outlives the key's expiry. Only API
keys can be exchanged: a token exchanging itself could be renewed forever. A token
stays valid until its `exp` even if the key is revoked, which is why its lifetime
is short (BASTION_TOKEN_ENDPOINT_TTL).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..asgi import ASGIApp, BodyTimeout, BodyTooLarge, ClientGone, Receive, Scope, Send, read_body
from ..budget.policy import to_mapping
from ..config import Settings
from ..context import Outcome, exchange_of
from ..errors import GatewayError, send_error
from .identity import Principal
from .jwt import mint

PATH = "/v1/auth/token"
_MAX_BODY = 16 * 1024


class TokenEndpoint:
    """Answers PATH itself; every other request goes on to `app` untouched."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        if settings.jwt_secret is None or "HS256" not in settings.jwt_algorithms:
            raise ValueError("BASTION_TOKEN_ENDPOINT needs BASTION_JWT_SECRET and HS256 in BASTION_JWT_ALGORITHMS")
        self.app = app
        self._secret = settings.jwt_secret.get_secret_value()
        self._max_ttl = settings.token_endpoint_ttl
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._models_claim = settings.jwt_models_claim
        self._limits_claim = settings.jwt_limits_claim
        self._budgets_claim = settings.jwt_budgets_claim
        self._body_timeout = settings.client_body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        exchange = exchange_of(scope)
        try:
            try:
                raw = await read_body(receive, _MAX_BODY, seconds=self._body_timeout)
            except BodyTooLarge:
                raise GatewayError(413, f"The request body exceeds {_MAX_BODY} bytes.") from None
            except BodyTimeout:
                raise GatewayError(408, "The request body was not received in time.") from None
            body = self._issue(exchange.principal, scope["method"], raw)
        except GatewayError as error:
            exchange.status, exchange.outcome, exchange.reason = error.status, Outcome.REJECTED, error.code or ""
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
        request = _request(raw)
        ttl = request.get("ttl", self._max_ttl)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0:
            raise GatewayError(400, "`ttl` must be a positive number of seconds.", param="ttl")
        ttl = min(float(ttl), self._max_ttl)
        if principal.expires is not None:
            ttl = min(ttl, principal.expires - time.time())
        models = _models(request.get("models"), principal)
        policy = {"rpm": principal.rpm, "tpm": principal.tpm, "max_concurrent": principal.max_concurrent}
        token = mint(
            self._secret,
            principal.name,
            ttl,
            models=models,
            limits={name: value for name, value in policy.items() if value is not None},
            allow_ips=[str(n) for n in principal.networks] or None,
            audience=self._audience,
            issuer=self._issuer,
            models_claim=self._models_claim,
            limits_claim=self._limits_claim,
            budgets=to_mapping(principal.budgets) or None,  # the key's own budgets, as for its limits
            budgets_claim=self._budgets_claim,
        )
        reply = {"access_token": token, "token_type": "bearer", "expires_in": int(ttl)}
        return json.dumps(reply, separators=(",", ":")).encode()


def _request(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        request = json.loads(raw)
    except ValueError:
        raise GatewayError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(request, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    return request


def _models(asked: Any, principal: Principal) -> list[str] | None:
    """The models the token may use: what was asked, within what the key allows."""
    if asked is None:
        return sorted(principal.models) if principal.models is not None else None
    if not isinstance(asked, list) or not all(isinstance(m, str) for m in asked):
        raise GatewayError(400, "`models` must be a list of model ids.", param="models")
    return sorted(m for m in set(asked) if principal.allows(m))
