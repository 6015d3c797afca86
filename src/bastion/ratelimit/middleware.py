"""`RateLimitMiddleware`: plain ASGI around the proxy.

Before: admit or refuse (429/503 answered here, nothing forwarded). During: the
`x-ratelimit-*` headers, computed once at admission, are appended to
`http.response.start`; body messages pass through untouched. After (always, in
`finally`): the concurrency slot is released and the tokens are charged.
"""

from __future__ import annotations

from ..asgi import ASGIApp, Receive, Scope, Send, header
from ..context import Exchange, Outcome, exchange_of
from ..errors import send_error
from .limiter import Admission, RateLimited, RateLimiter

# A prompt's tokens are estimated from the request body at this many bytes per token
# when the response gave no usage (client disconnect, upstream crash mid-response).
BYTES_PER_TOKEN = 4


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        try:
            admission = await self.limiter.admit(exchange.principal, exchange.client_ip)
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
            await self._finish(admission, exchange, scope)

    async def _finish(self, admission: Admission, exchange: Exchange, scope: Scope) -> None:
        tokens = tokens_used(exchange, scope) if admission.tpm > 0 else 0
        try:
            await self.limiter.release(admission)
        finally:
            await self.limiter.charge(admission, tokens)


def tokens_used(exchange: Exchange, scope: Scope) -> int:
    """Tokens to charge: the response's usage, or an estimate when it ended without one.

    The estimate applies when the client disconnected or the upstream broke mid-response:
    prompt ~ request body bytes / 4; completion = the stream events forwarded so far
    (vLLM sends one token per event) or, for a non-streamed request, its `max_tokens`
    (the most it could have generated; nothing if it set none).
    """
    if exchange.usage is not None:
        return exchange.usage.total_tokens
    if exchange.outcome is not Outcome.CLIENT_DISCONNECT and exchange.reason != "midstream":
        return 0  # refused, or failed before the upstream produced anything
    length = header(scope, b"content-length")
    prompt = int(length) // BYTES_PER_TOKEN if length is not None and length.isdigit() else 0
    completion = exchange.events if exchange.stream else (exchange.max_tokens or 0)
    return prompt + completion
