"""`GET /v1/usage`: a key holder's own usage and budgets, and nothing about anyone else.

The principal is the one the auth stage identified: there is no parameter that
names another. The document (stable; see docs/budgets.md):

    {"object": "usage", "principal": "<id>", "name": "<key name or JWT subject>", "timezone": "UTC",
     "periods": [{"period": "day", "model": null, "start": "<ISO 8601>", "reset": "<ISO 8601>",
                  "used": N, "reserved": N, "limit": N | null, "remaining": N | null}, ...],
     "by_model": [{"model": "<id>", "used": {"day": N, "week": N, "month": N}}, ...]}

`periods` holds day, week and month over all models (limit null where no budget
applies) and one entry per model-scoped budget. `used` is settled from real usage;
`reserved` is held by requests still running.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..asgi import ASGIApp, Receive, Scope, Send
from ..context import Outcome, exchange_of
from ..errors import GatewayError, send_error
from .calendar import Calendar
from .ledger import BudgetLedger, LedgerUnavailable, UsageReport
from .middleware import Resolver
from .policy import PERIODS

PATH = "/v1/usage"


class UsageEndpoint:
    """Answers PATH itself; every other request goes on to `app` untouched."""

    def __init__(
        self, app: ASGIApp, ledger: BudgetLedger, budgets: Resolver, clock: Callable[[], float] = time.time
    ) -> None:
        self.app = app
        self.ledger = ledger
        self.budgets = budgets
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        exchange = exchange_of(scope)
        principal = exchange.principal
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise GatewayError(405, f"Method {scope['method']} is not allowed here.")
            if principal is None:
                raise GatewayError(401, "A key or token is needed to see usage.", code="invalid_api_key")
            try:
                report = await self.ledger.usage(principal.id, self.budgets(principal), self._clock())
            except LedgerUnavailable:
                raise GatewayError(
                    503,
                    "Usage is temporarily unavailable; retry shortly.",
                    code="budget_unavailable",
                    headers=[(b"retry-after", b"1")],
                ) from None
        except GatewayError as error:
            exchange.status, exchange.outcome, exchange.reason = error.status, Outcome.REJECTED, error.resolved_code
            await send_error(send, error, [(b"x-request-id", exchange.request_id.encode())])
            return
        body = json.dumps(usage_document(report, principal.name, self.ledger.calendar), separators=(",", ":"))
        data = body.encode()
        exchange.status = 200
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(data)),
            (b"cache-control", b"no-store"),
            (b"x-request-id", exchange.request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else data})


def usage_document(report: UsageReport, name: str, calendar: Calendar) -> dict[str, Any]:
    return {
        "object": "usage",
        "principal": report.principal_id,
        "name": name,
        "timezone": calendar.tz.key,
        "periods": [
            {
                "period": entry.period.value,
                "model": entry.model,
                "start": calendar.text(entry.start),
                "reset": calendar.text(entry.reset),
                "used": entry.used,
                "reserved": entry.reserved,
                "limit": entry.limit,
                "remaining": entry.remaining,
            }
            for entry in report.periods
        ],
        "by_model": [
            {"model": model, "used": {period.value: used[period.ordinal] for period in PERIODS}}
            for model, used in report.by_model.items()
        ],
    }
