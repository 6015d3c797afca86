"""Priority classes: who goes first when an engine is saturated, and what integer vLLM is told.

A class has an `order` (0 first: strict order between classes, and the integer `priority`
vLLM's `--scheduling-policy priority` sees, lower first), a `weight` (each principal's share
within its class: deficit round robin on reserved tokens) and a queue `deadline` (seconds a
request of the class may wait at the gateway before it gets 429).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..auth.identity import Principal

DEFAULT_CLASSES = (
    '{"interactive": {"order": 0, "weight": 1, "deadline": 10},'
    ' "standard": {"order": 1, "weight": 1, "deadline": 30},'
    ' "batch": {"order": 2, "weight": 1, "deadline": 120}}'
)
_FIELDS = frozenset({"order", "weight", "deadline"})


@dataclass(frozen=True, slots=True)
class PriorityClass:
    name: str
    order: int  # 0 first; also the `priority` forwarded to vLLM
    weight: float = 1.0
    deadline: float = 30.0


@dataclass(frozen=True, slots=True)
class ClassTable:
    """The configured classes, highest first, and the class of a principal without one of its own."""

    classes: tuple[PriorityClass, ...]
    default: PriorityClass

    @property
    def by_name(self) -> Mapping[str, PriorityClass]:
        return {c.name: c for c in self.classes}

    @property
    def lowest(self) -> PriorityClass:
        return self.classes[-1]

    def of(self, principal: Principal | None) -> PriorityClass:
        """The principal's class: its own, the default without one, the lowest for a name not configured."""
        name = principal.priority_class if principal is not None else None
        if name is None:
            return self.default
        for cls in self.classes:
            if cls.name == name:
                return cls
        return self.lowest  # a key naming a class removed from the configuration: fail low, never high


def parse_classes(text: str, default: str | None) -> ClassTable:
    """BASTION_PRIORITY_CLASSES (a JSON object name -> {order, weight, deadline}); ValueError in one line.

    `default` None: the first class stands in (a check of the classes alone).
    """
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a valid JSON object ({exc.msg}, column {exc.colno})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError('must be a non-empty JSON object, e.g. {"interactive": {"order": 0}, "batch": {"order": 1}}')
    classes = []
    for name, spec in raw.items():
        if not name.strip() or not isinstance(spec, dict) or not set(spec) <= _FIELDS:
            raise ValueError(f"class {name!r} must be an object with only order, weight, deadline")
        order, weight, deadline = spec.get("order"), spec.get("weight", 1), spec.get("deadline", 30)
        if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= 1000:
            raise ValueError(f"class {name!r}: order must be an integer from 0 to 1000")
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight <= 1000:
            raise ValueError(f"class {name!r}: weight must be a number above 0 and at most 1000")
        if not isinstance(deadline, int | float) or isinstance(deadline, bool) or not 0 < deadline <= 3600:
            raise ValueError(f"class {name!r}: deadline must be seconds above 0 and at most 3600")
        classes.append(PriorityClass(name, order, float(weight), float(deadline)))
    classes.sort(key=lambda c: c.order)
    if len({c.order for c in classes}) != len(classes):
        raise ValueError("two classes have the same order")
    found = [c for c in classes if c.name == default] if default is not None else classes[:1]
    if not found:
        raise ValueError(f"the default class {default!r} is not one of {', '.join(c.name for c in classes)}")
    return ClassTable(tuple(classes), found[0])


def capped(claimed: object, ceiling: str | None, orders: Mapping[str, int]) -> str | None:
    """A JWT's class claim held to the ceiling: a token cannot claim a class above it (None: the default)."""
    if not isinstance(claimed, str) or claimed not in orders:
        return None
    if ceiling is not None and ceiling in orders and orders[claimed] < orders[ceiling]:
        return ceiling
    return claimed
