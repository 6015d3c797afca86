"""`BudgetStage`: plain ASGI, between the accounting stage and the proxy.

Before: reserve the request's prompt estimate plus its completion cap (what the limits reserve too)
against the principal's budgets, or
answer 429 `budget_exceeded` (Retry-After = seconds to the reset, which the
message also gives in ISO 8601; `x-should-retry: false` when the reset is over a
minute away, since an SDK retrying within seconds cannot succeed). During: `x-budget-remaining-tokens` and
`x-budget-reset` (the tightest budget) ride on `exchange.response_headers`.
After (always, in `finally`): settle to what the request is charged, by the same
rule as the limits (`accounting.charge`: the engine's usage, or a conservative
estimate when a started response gave none), or release it when nothing was generated.
A Redis settle is issued here and awaited by the gateway (`Exchange.deferred`), so it
shares its round trip with the limiter's.

Expects `exchange.model`, `exchange.prompt_estimate` and `exchange.completion_cap`
from the stage that reads the request body (`request_body.InspectBody`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from ..accounting import charge
from ..asgi import ASGIApp, Receive, Scope, Send
from ..auth.identity import Principal
from ..context import Exchange, Outcome, exchange_of
from ..errors import GatewayError, send_error
from .ledger import Admitted, BudgetLedger, EarlyReservation, LedgerUnavailable, Refused
from .metrics import BudgetMetrics
from .policy import Budgets, effective

log = logging.getLogger("bastion.budget")
REMAINING = b"x-budget-remaining-tokens"
RESET = b"x-budget-reset"
# The openai SDKs wait out a Retry-After up to a minute and retry (which then succeeds); further off, some
# versions retry at once anyway, in vain: `x-should-retry: false` tells every version not to.
SDK_MAX_WAIT = 60
_CACHE_SIZE = 4096


class Resolver:
    """A principal's enforced budgets (its own, then the defaults), remembered per distinct policy.

    Remembered by the identity of the principal's budgets tuple (principals live in the key store and
    the JWT cache, so the same tuple comes back): a lookup costs no hashing of the budgets.
    """

    def __init__(self, defaults: Budgets) -> None:
        self.defaults = effective((), defaults)
        self._defaults = defaults
        self._seen: dict[int, tuple[Budgets, Budgets]] = {}

    def __call__(self, principal: Principal) -> Budgets:
        own = principal.budgets
        if not own:
            return self.defaults
        found = self._seen.get(id(own))
        if found is not None and found[0] is own:
            return found[1]
        if len(self._seen) >= _CACHE_SIZE:
            self._seen.clear()
        merged = effective(own, self._defaults)
        self._seen[id(own)] = (own, merged)  # holding `own` keeps its id from being reused
        return merged


class BudgetStage:
    def __init__(
        self,
        app: ASGIApp,
        ledger: BudgetLedger,
        budgets: Resolver,
        *,
        fail_open: bool = True,
        metrics: BudgetMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.ledger = ledger
        self.budgets = budgets
        self.fail_open = fail_open
        self.metrics = metrics
        self._clock = clock
        self._degraded = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        principal = exchange.principal
        if principal is None:
            await self.app(scope, receive, send)
            return
        early = exchange.early_budget
        if early is not None:  # issued by the limiter's stage with its last write: claimed here
            exchange.early_budget = None
            now, verdict_of = early.now, early.verdict
        else:
            now = self._clock()
            verdict_of = self._reserve(exchange, principal, now)
        try:
            verdict = await verdict_of
        except LedgerUnavailable as exc:
            if not self._degraded:
                self._degraded = True
                mode = "serving without budgets (fail open)" if self.fail_open else "refusing with 503 (fail closed)"
                log.error("budget storage unreachable, %s: %s", mode, exc)
            if self.fail_open:
                await self.app(scope, receive, send)
                return
            error = GatewayError(
                503,
                "Token budgets are temporarily unavailable; retry shortly.",
                code="budget_unavailable",
                headers=[(b"retry-after", b"1")],
            )
            await self._refuse(send, exchange, error, "budget_storage")
            return
        except Exception:  # a bug (say an error reply to the Redis script): shown, never "budgets off"
            log.exception("the budget ledger failed (request %s)", exchange.request_id)
            error = GatewayError(500, "The gateway failed to apply its token budgets.", code="internal_error")
            await self._refuse(send, exchange, error, "budget_internal")
            return
        if self._degraded:
            self._degraded = False
            log.warning("budget storage reachable again; budgets enforced")
        if isinstance(verdict, Refused):
            if self.metrics is not None:
                self.metrics.refused(verdict.budget.period)
            await self._refuse(send, exchange, refusal(verdict, now), "budget_exceeded")
            return
        self._admitted(exchange, principal, verdict)
        try:
            await self.app(scope, receive, send)
        finally:
            # Settled (a release when nothing was used: `used` 0) without waiting here: on Redis the settle is
            # queued now and the gateway awaits it once the limiter's finish, queued as this stage returns, has
            # joined it in one write (one round trip at the end of a request, not two).
            try:
                used, _ = charge(exchange)
            except Exception:  # a bug: shown once; the reservation is still settled (kept: the conservative charge)
                log.exception("request %s: charging it failed; budget settled to its reservation", exchange.request_id)
                used = verdict.reservation.tokens
            waiting = self.ledger.settle_soon(verdict.reservation, used)
            if waiting is not None:
                exchange.deferred += (waiting,)

    def _reserve(self, exchange: Exchange, principal: Principal, now: float) -> Awaitable[Admitted | Refused]:
        tokens = exchange.prompt_estimate + exchange.completion_cap
        return self.ledger.reserve_soon(principal.id, exchange.model, tokens, self.budgets(principal), now)

    # --- the reservation issued early, by the stage before (ratelimit.middleware.Alongside) --------------
    def issue(self, exchange: Exchange) -> None:
        """Issue this request's reservation now, so that it leaves in the limiter's last write (the requests/min
        hit): one round trip for both. This stage claims it; whoever issued it calls `unclaimed` when the
        request ends (or is refused before reaching here)."""
        principal = exchange.principal
        if principal is not None:
            now = self._clock()
            exchange.early_budget = EarlyReservation(now, self._reserve(exchange, principal, now))

    async def unclaimed(self, exchange: Exchange) -> None:
        """Give back an early reservation this stage never claimed (the limits refused the request, or a stage
        before this one answered it): what it took is released, so nothing stays taken that was not before.

        Never raises (but for a cancellation): it runs as a refusal is answered and after a response was sent,
        where an exception would replace the 429 by the server's bare 500 or escape into the server. The
        release is queued (`settle_soon`) and left to the gateway (`Exchange.deferred`, which logs a failure):
        it leaves with the limiter's finish, and a refusal is not kept waiting for it."""
        early = exchange.early_budget
        if early is None:
            return
        exchange.early_budget = None
        try:
            verdict = await early.verdict
        except LedgerUnavailable:
            return  # nothing was taken (or Redis cannot tell): as when the reservation was never asked
        except Exception:  # a bug (an error reply to the script): shown, as where the reservation is claimed
            log.exception("the budget ledger failed (request %s, reservation not claimed)", exchange.request_id)
            return
        if isinstance(verdict, Admitted) and verdict.reservation.tokens:
            waiting = self.ledger.settle_soon(verdict.reservation, 0)
            if waiting is not None:
                exchange.deferred += (waiting,)

    def _admitted(self, exchange: Exchange, principal: Principal, verdict: Admitted) -> None:
        tightest = verdict.tightest
        if tightest is None:
            return
        exchange.response_headers += [
            (REMAINING, b"%d" % max(0, tightest.remaining)),
            (RESET, tightest.reset_text.encode()),
        ]
        if self.metrics is not None:
            self.metrics.remaining(principal.name, verdict.standings)

    async def _refuse(self, send: Send, exchange: Exchange, error: GatewayError, reason: str) -> None:
        exchange.status, exchange.outcome, exchange.reason = error.status, Outcome.REJECTED, reason
        await send_error(send, error, [(b"x-request-id", exchange.request_id.encode())])


def refusal(refused: Refused, now: float) -> GatewayError:
    """The 429 for a reservation that does not fit, saying which budget, how much is left, and until when."""
    budget = refused.budget
    left = max(0, budget.tokens - refused.used)
    scope = f" for model {budget.model}" if budget.model is not None else ""
    if left == 0:
        message = (
            f"Token budget exhausted: {budget.tokens} tokens per {budget.period.value}{scope}. "
            f"It resets at {refused.reset_text}."
        )
    else:
        message = (
            f"Token budget too low for this request: it may use up to {refused.tokens} tokens, and {left} of "
            f"{budget.tokens} per {budget.period.value}{scope} are left. Lower max_tokens, or retry after the "
            f"reset at {refused.reset_text}."
        )
    wait = max(1, math.ceil(refused.reset - now))
    headers = [(b"retry-after", b"%d" % wait), (REMAINING, b"%d" % left), (RESET, refused.reset_text.encode())]
    if wait > SDK_MAX_WAIT:
        headers.append((b"x-should-retry", b"false"))
    return GatewayError(429, message, code="budget_exceeded", headers=headers)
