"""`RateLimitMiddleware`: plain ASGI around the proxy.

Before: admit or refuse (429/503 answered here, nothing forwarded); admission reserves
the request's prompt estimate plus its completion cap (read from the body by the stage
before, `request_body.InspectBody`) against tokens/min. During: the `x-ratelimit-*`
headers, computed once at admission, go out with the proxy's response. After (always,
in `finally`): the concurrency slot is released and the reservation is settled to what
the request is charged (`accounting.charge`: its usage, or a conservative estimate).

`alongside` (the budget stage, when both are on Redis): its reservation is issued just before the
limiter's last write (the requests/min hit) and leaves in it, one round trip for both; that stage
claims it. One it never claims (the limits refused the request, or a stage in between answered it:
`GET /v1/usage`) is given back here, so what stays taken is what it was when it was asked in turn.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Protocol

from ..accounting import charge
from ..asgi import ASGIApp, Receive, Scope, Send
from ..context import Exchange, Outcome, exchange_of
from ..errors import send_error
from .limiter import RateLimited, RateLimiter

log = logging.getLogger("bastion.ratelimit")


class Alongside(Protocol):
    """A stage further in whose Redis call can leave in the limiter's last write (`budget.middleware.BudgetStage`)."""

    def issue(self, exchange: Exchange) -> None:
        """Queue the call now (it claims its result later, when the request reaches it)."""

    async def unclaimed(self, exchange: Exchange) -> None:
        """Give back what an issued call took if the stage never claimed it; nothing otherwise."""


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: RateLimiter, alongside: Alongside | None = None) -> None:
        self.app = app
        self.limiter = limiter
        self.alongside = alongside

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        tokens = exchange.prompt_estimate + exchange.completion_cap
        alongside = self.alongside
        try:
            admission = await self.limiter.admit(
                exchange.principal,
                exchange.client_ip,
                tokens,
                alongside=partial(alongside.issue, exchange) if alongside is not None else None,
            )
        except RateLimited as refusal:
            if alongside is not None:
                await alongside.unclaimed(exchange)
            exchange.status = refusal.status
            exchange.outcome = Outcome.REJECTED
            exchange.reason = refusal.reason
            await send_error(send, refusal, [(b"x-request-id", exchange.request_id.encode())])
            return
        except BaseException:
            if alongside is not None:
                await alongside.unclaimed(exchange)
            raise
        if admission.headers:
            exchange.response_headers = admission.headers  # the proxy adds them to its response
        try:
            await self.app(scope, receive, send)
        finally:
            # `finish` runs whatever fails before it: skipped, the request's concurrency slot stayed taken (a key
            # locked out once its max_concurrent slots leaked) and its reservation was never settled.
            tokens = admission.reserved
            try:
                if alongside is not None:  # first: its release (queued) leaves in the limiter's finish's write
                    await alongside.unclaimed(exchange)
                tokens, exchange.usage_estimated = charge(exchange)
            except Exception:
                # A bug: shown once, and the request keeps what it reserved (the conservative charge).
                log.exception("request %s: charging it failed; settled to its reservation", exchange.request_id)
            finally:
                await self.limiter.finish(admission, tokens)
