"""The Principal: who a request acts for, and the policy that comes with it.

Everything after identification (model checks, limits, metrics labels, audit)
works on a Principal, never on the raw credential.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from ..budget.policy import Budgets
from ..errors import GatewayError
from .ipfilter import IPAddress, IPNetwork, in_networks


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    name: str
    kind: Literal["key", "jwt"]
    # None = every model the upstream serves; otherwise exactly these ids.
    models: frozenset[str] | None = None
    # Per-principal IP allowlist; empty = no restriction beyond the global lists.
    networks: tuple[IPNetwork, ...] = ()
    # Unix time after which the credential stops working (None = never).
    expires: float | None = None
    # Limits the rate-limit stage enforces; None = the gateway default (BASTION_RATE_LIMIT_*).
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    # Token budgets of its own (bastion.budget); periods it does not set get the gateway's defaults.
    budgets: Budgets = ()
    # Its priority class (bastion.fairness): None = the gateway's default class.
    priority_class: str | None = None

    def allows(self, model: str | None) -> bool:
        """May this principal use `model`? A restricted principal must name an allowed one."""
        if self.models is None:
            return True
        return model is not None and model in self.models

    def allows_ip(self, ip: IPAddress | None) -> bool:
        if not self.networks:
            return True
        return ip is not None and in_networks(ip, self.networks)


def filter_model_list(body: bytes, principal: Principal) -> bytes:
    """An OpenAI model list reduced to what `principal` may use.

    Fails closed: a body that is not a model list (compressed despite `accept-encoding: identity`,
    truncated, another shape) is a 502, never the upstream's whole list passed on unfiltered.
    """
    try:
        payload: Any = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise GatewayError(
            502, "The model server's model list could not be read, so it cannot be filtered.", code="upstream_invalid"
        )
    payload["data"] = [m for m in payload["data"] if isinstance(m, dict) and principal.allows(m.get("id"))]
    return json.dumps(payload, separators=(",", ":")).encode()
