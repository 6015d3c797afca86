"""`POST /admin/engines/restart[?model=NAME]`: the running gateway's rolling restart, for `bastion engines restart`.

Deny by default: without BASTION_ADMIN_TOKEN every call is refused; with it, the caller
needs the token and a peer in BASTION_ADMIN_ALLOW (loopback when unset), never through
a proxy without the token. The answer comes when the restart is over (it can take
minutes with vLLM), one JSON object per replica restarted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import parse_qs

from .asgi import Receive, Scope, Send
from .auth.ipfilter import IPNetwork
from .engine.fleet import RestartReport
from .errors import GatewayError, send_error
from .metrics_http import LOOPBACK, ScrapeGuard

RESTART_PATH = "/admin/engines/restart"


class Restarter(Protocol):
    """The fleet (one process), or a worker's line to the master that runs the engines."""

    async def restart(self, model: str | None) -> list[RestartReport]: ...


class RestartEndpoint:
    def __init__(
        self, fleet: Restarter, token: str | None, allow: Sequence[IPNetwork], trusted_proxies: Sequence[IPNetwork]
    ) -> None:
        self._fleet = fleet
        self._guard = ScrapeGuard(token, allow or LOOPBACK, trusted_proxies) if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self._refusal(scope)
        if error is not None:
            await send_error(send, error)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        model = query.get("model", [None])[0] or None
        try:
            reports = await self._fleet.restart(model)
        except LookupError:
            await send_error(send, GatewayError(404, f"No engine serves {model!r}.", code="model_not_found"))
            return
        except ConnectionError:  # a worker whose master (which runs the engines) is gone: it is stopping
            await send_error(send, GatewayError(503, "The engines' supervisor is gone; this gateway is stopping."))
            return
        body = json.dumps(
            {"restarted": [{"engine": r.engine, "outcome": r.outcome.value, "detail": r.detail} for r in reports]}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _refusal(self, scope: Scope) -> GatewayError | None:
        if self._guard is None:
            return GatewayError(403, "Admin routes are off: set BASTION_ADMIN_TOKEN to use them.", code="forbidden")
        error = self._guard.refusal(scope)
        if error is not None:
            message = (
                "A valid admin token (BASTION_ADMIN_TOKEN) is required."
                if error.status == 401
                else "This address may not use the admin routes (BASTION_ADMIN_ALLOW; a proxy needs the token)."
            )
            return GatewayError(error.status, message, code=error.code)
        if scope["method"] != "POST":
            return GatewayError(405, f"Method {scope['method']} is not allowed here; use POST.")
        return None
