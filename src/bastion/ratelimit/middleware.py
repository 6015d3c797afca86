"""`RateLimitMiddleware`: plain ASGI around the proxy.

Before: admit or refuse (429/503 answered here, nothing forwarded); admission reserves
the request's prompt estimate plus its completion cap (read from the body by the stage
before, `request_body.InspectBody`) against tokens/min. During: the `x-ratelimit-*`
headers, computed once at admission, go out with the proxy's response. After (always,
in `finally`): the concurrency slot is released and the reservation is settled to what
the request is charged (`accounting.charge`: its usage, or a conservative estimate).
"""

from __future__ import annotations

from ..accounting import charge
from ..asgi import ASGIApp, Receive, Scope, Send
from ..context import Exchange, Outcome, exchange_of
from ..errors import send_error
from .limiter import Admission, RateLimited, RateLimiter


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        tokens = exchange.prompt_estimate + exchange.completion_cap
        try:
            admission = await self.limiter.admit(exchange.principal, exchange.client_ip, tokens)
        except RateLimited as refusal:
            exchange.status = refusal.status
            exchange.outcome = Outcome.REJECTED
            exchange.reason = refusal.reason
            await send_error(send, refusal, [(b"x-request-id", exchange.request_id.encode())])
            return
        if admission.headers:
            exchange.response_headers = admission.headers  # the proxy adds them to its response
        try:
            await self.app(scope, receive, send)
        finally:
            await self._finish(admission, exchange)

    async def _finish(self, admission: Admission, exchange: Exchange) -> None:
        tokens, exchange.usage_estimated = charge(exchange)
        await self.limiter.finish(admission, tokens)
