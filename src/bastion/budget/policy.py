"""What a budget is: N tokens per calendar period, for all models or for one.

Written `day=2000000`, `month=50000000` or `day:qwen=100000` (period, optional
model, tokens) on the command line and in settings, and as the object
`{"day": 2000000, "day:qwen": 100000}` in the key file and in a JWT claim.
A value of 0 means "no budget for that period", which lets one key opt out of a
default. Pure values: this module imports nothing of bastion (the auth package
uses it to carry a key's or token's budgets on its Principal).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"  # ISO week: Monday 00:00 to the next Monday
    MONTH = "month"

    @property
    def ordinal(self) -> int:
        """Position in per-period tuples (day, week, month)."""
        return _INDEX[self]


_INDEX = {Period.DAY: 0, Period.WEEK: 1, Period.MONTH: 2}
PERIODS = (Period.DAY, Period.WEEK, Period.MONTH)


@dataclass(frozen=True, slots=True)
class Budget:
    """`tokens` per `period` for one principal, over every model (`model` None) or one model."""

    period: Period
    tokens: int
    model: str | None = None
    ordinal: int = field(init=False, repr=False, compare=False)  # the period's, read on every request

    def __post_init__(self) -> None:
        object.__setattr__(self, "ordinal", _INDEX[self.period])

    @property
    def name(self) -> str:
        """The written form's left side: `day` or `day:qwen`."""
        return self.period.value if self.model is None else f"{self.period.value}:{self.model}"

    def __str__(self) -> str:
        return f"{self.name}={self.tokens}"


Budgets = tuple[Budget, ...]


def parse_name(name: str, tokens: Any, written: str | None = None) -> Budget:
    """One entry of the object form: `("day:qwen", 100000)`. ValueError says what is wrong."""
    shown = written if written is not None else name
    period_text, colon, model = name.strip().partition(":")
    try:
        period = Period(period_text.strip().lower())
    except ValueError:
        raise ValueError(f"budget {shown!r}: the period must be day, week or month") from None
    if colon and not model.strip():
        raise ValueError(f"budget {shown!r}: a model name must follow the colon")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"budget {shown!r}: the tokens must be a whole number, 0 or more")
    return Budget(period, tokens, model.strip() if colon else None)


def parse_budget(text: str) -> Budget:
    """`day=2000000`, `week=10_000_000` or `day:qwen=100000`."""
    name, equals, value = text.rpartition("=")
    if not equals or not name.strip():
        raise ValueError(f"budget {text!r}: write PERIOD=TOKENS or PERIOD:MODEL=TOKENS, e.g. day=2000000")
    try:
        tokens = int(value.strip())
    except ValueError:
        raise ValueError(f"budget {text!r}: {value.strip()!r} is not a whole number of tokens") from None
    return parse_name(name, tokens, text)


def from_mapping(values: Mapping[str, Any]) -> Budgets:
    """The object form (key file, JWT claim), checked and with one entry per period and model."""
    return unique(parse_name(name, tokens) for name, tokens in values.items())


def to_mapping(budgets: Iterable[Budget]) -> dict[str, int]:
    return {budget.name: budget.tokens for budget in budgets}


def unique(budgets: Iterable[Budget]) -> Budgets:
    """One budget per (period, model): a second one for the same pair is an error."""
    seen: dict[tuple[Period, str | None], Budget] = {}
    for budget in budgets:
        key = (budget.period, budget.model)
        if key in seen:
            raise ValueError(f"budget {budget.name!r} is given twice")
        seen[key] = budget
    return tuple(seen.values())


def effective(own: Budgets, defaults: Budgets) -> Budgets:
    """What is enforced: the principal's own budgets, the defaults for the rest; zeros dropped.

    A default applies to every (period, model) the principal does not set itself, so
    `day=0` on a key lifts the default daily budget for that key alone.
    """
    covered = {(b.period, b.model) for b in own}
    merged = [*own, *(d for d in defaults if (d.period, d.model) not in covered)]
    return tuple(b for b in merged if b.tokens > 0)


def capped(claimed: Budgets, ceiling: Budgets) -> Budgets:
    """A JWT's budgets under the operator's ceiling: never above it, and never without it.

    Each ceiling entry bounds the claim for the same (period, model); a claim that is
    missing, or 0 ("none"), gets the ceiling itself. Claims the ceiling does not name
    stay as they are (an all-model ceiling still bounds a per-model claim in effect).
    """
    limits = {(b.period, b.model): b for b in ceiling if b.tokens > 0}
    out: list[Budget] = []
    for budget in claimed:
        limit = limits.pop((budget.period, budget.model), None)
        if limit is not None and (budget.tokens == 0 or budget.tokens > limit.tokens):
            budget = limit
        out.append(budget)
    out.extend(limits.values())
    return tuple(out)
