"""`GET /v1/models` with several engines: what the engines themselves say they serve.

One ready replica of each model group is asked for its `/v1/models` (all groups at
once, each bounded by `timeout`, over a channel of its own, never the traffic pool),
and the group's own card is kept as the engine wrote it (vLLM's carries
`max_model_len`, `root`, `owned_by`, `permission`...). Only the card whose `id` is the
group's name is listed: that is the name the router serves; anything else an engine
lists (a LoRA adapter, another name) would answer 404 through the gateway.

A group with no ready replica, or whose replica does not answer with its card, keeps a
synthesized entry (`owned_by: "bastion"`), so the list never lies by omission: a model
that is starting or restarting is still a model clients may ask for (and get a 503
with Retry-After meanwhile). The merged list is kept for `ttl` seconds (about one), so a
burst of SDK clients listing models costs the engines one request each.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from .probe import HTTP_FAILURES
from .router import EngineGroup, Router

Card = dict[str, Any]
# No answer in time, a broken connection, or an answer that is not JSON: the group's card is synthesized.
_NO_CARD: tuple[type[BaseException], ...] = (*HTTP_FAILURES, ValueError)


class ModelCatalog:
    """The engines' model cards, one per group in configuration order, cached for `ttl` seconds."""

    def __init__(self, router: Router, http: httpx.AsyncClient, *, timeout: float, ttl: float = 1.0) -> None:
        self._router = router
        self._http = http
        self._timeout = timeout
        self._ttl = ttl
        self._created = int(time.time())
        self._cards: list[Card] = []
        self._expires = 0.0
        self._lock = asyncio.Lock()  # callers during a refresh wait for it instead of asking again

    async def cards(self) -> list[Card]:
        if time.monotonic() < self._expires:
            return self._cards
        async with self._lock:
            if time.monotonic() >= self._expires:
                groups = self._router.groups
                self._cards = list(await asyncio.gather(*(self._card(group) for group in groups)))
                self._expires = time.monotonic() + self._ttl
        return self._cards

    async def _card(self, group: EngineGroup) -> Card:
        backend = next((r.backend for r in group.replicas if r.backend.usable), None)
        if backend is not None:
            upstream = backend.upstream
            headers = {"authorization": "Bearer " + upstream.api_key} if upstream.api_key else {}
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._http.get(upstream.base_url + "/v1/models", headers=headers)
                if response.status_code == 200:
                    card = card_of(response.json(), group.name)
                    if card is not None:
                        return card
            except _NO_CARD:
                pass
        return {"id": group.name, "object": "model", "created": self._created, "owned_by": "bastion"}


def card_of(listing: object, name: str) -> Card | None:
    """The entry for `name` in an OpenAI-shaped model list, or None."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if isinstance(data, list):
        for card in data:
            if isinstance(card, dict) and card.get("id") == name:
                return card
    return None
