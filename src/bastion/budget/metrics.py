"""Budget metrics, on the app's own registry.

`bastion_budget_refused_total{period}` always (three series at most).
`bastion_budget_remaining_tokens{principal,period}` only when the operator keeps
the principal label on (BASTION_METRICS_PRINCIPAL_LABEL): one series per
principal and period, so bounded by the number of keys and token subjects. It
follows each principal's all-model budgets as of its latest admitted request.
Label children are cached, so a request costs dict look-ups, never `labels()`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from .ledger import Standing
from .policy import Period


class BudgetMetrics:
    def __init__(self, registry: CollectorRegistry, *, by_principal: bool) -> None:
        refused = Counter(
            "bastion_budget_refused",
            "Requests refused with 429 budget_exceeded, by the period of the budget that was spent.",
            ("period",),
            registry=registry,
        )
        self._refused = {period: refused.labels(period.value) for period in Period}
        self._remaining: Gauge | None = None
        self._children: dict[tuple[str, Period], Gauge] = {}
        if by_principal:
            self._remaining = Gauge(
                "bastion_budget_remaining_tokens",
                "Tokens left in a principal's all-model budget for the current period, as of its latest request.",
                ("principal", "period"),
                registry=registry,
            )

    def refused(self, period: Period) -> None:
        self._refused[period].inc()

    def remaining(self, principal: str, standings: Iterable[Standing]) -> None:
        family = self._remaining
        if family is None:
            return
        for standing in standings:
            if standing.budget.model is not None:
                continue
            key = (principal, standing.budget.period)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = family.labels(principal, standing.budget.period.value)
            child.set(max(0, standing.remaining))
