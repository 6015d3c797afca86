"""The endpoint allowlist: which `/v1` routes are forwarded, with which methods, scoped how to models.

Without it every `/v1/*` path went to vLLM: a model-restricted key reached routes
whose model the gateway never sees (`/v1/responses/{id}`, `/v1/files`) and vLLM's
own admin routes (`/v1/load_lora_adapter`). Now a request is forwarded only when
its path is a route the operator enabled (BASTION_ROUTES; by default the inference
routes vLLM serves) and its method is one of the route's. Each route says where its
model is, so a restricted principal (`Principal.models` set) is held to its list:

- `model-in-body`: the JSON body's `model` (checked by the proxy, which parses the body anyway);
- `model-in-path`: the path's last part (`/v1/models/{model}`), checked here;
- `model-list`: the upstream's list, filtered by the proxy to the allowed models;
- `unscoped`: no model at all (stored responses, files, batches, adapters): refused (403) to
  restricted principals, since nothing could hold them to their models there;
- `gateway`: answered by bastion itself (`POST /v1/auth/token`).

The stage runs after authentication (an unauthenticated caller learns nothing about
routes) and before the body is read. Its cost is a dict lookup for the routes with
no placeholder, which are the hot ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from .asgi import ASGIApp, Receive, Scope, Send
from .auth.errors import refusal
from .context import Outcome, exchange_of
from .errors import GatewayError, send_error


class ModelScope(StrEnum):
    BODY = "model-in-body"
    PATH = "model-in-path"
    LIST = "model-list"
    UNSCOPED = "unscoped"
    GATEWAY = "gateway"


@dataclass(frozen=True, slots=True)
class Route:
    """A path template (`{id}`: one path segment; `{model}`: the rest of the path) and what it allows."""

    path: str
    methods: frozenset[str]
    scope: ModelScope


def _route(path: str, methods: str, scope: ModelScope) -> Route:
    return Route(path, frozenset(methods.split()), scope)


# Every route an operator can enable. vLLM's OpenAI server (0.26) serves the inference ones, the
# stored-response ones and, with --enable-lora runtime updates, the adapter ones; files and batches
# are OpenAI routes other OpenAI-compatible upstreams may serve. Its other admin routes (/tokenize,
# /pooling, /sleep, /reset_prefix_cache, ...) are outside /v1 and never forwarded at all.
CATALOGUE: dict[str, Route] = {
    route.path: route
    for route in (
        _route("/v1/chat/completions", "POST", ModelScope.BODY),
        _route("/v1/completions", "POST", ModelScope.BODY),
        _route("/v1/embeddings", "POST", ModelScope.BODY),
        _route("/v1/responses", "POST", ModelScope.BODY),
        _route("/v1/models", "GET", ModelScope.LIST),
        _route("/v1/models/{model}", "GET", ModelScope.PATH),
        _route("/v1/audio/transcriptions", "POST", ModelScope.BODY),
        _route("/v1/audio/translations", "POST", ModelScope.BODY),
        _route("/v1/rerank", "POST", ModelScope.BODY),
        _route("/v1/score", "POST", ModelScope.BODY),
        _route("/v1/moderations", "POST", ModelScope.BODY),
        _route("/v1/responses/{id}", "GET", ModelScope.UNSCOPED),
        _route("/v1/responses/{id}/cancel", "POST", ModelScope.UNSCOPED),
        _route("/v1/files", "GET POST", ModelScope.UNSCOPED),
        _route("/v1/files/{id}", "GET", ModelScope.UNSCOPED),
        _route("/v1/files/{id}/content", "GET", ModelScope.UNSCOPED),
        _route("/v1/batches", "GET POST", ModelScope.UNSCOPED),
        _route("/v1/batches/{id}", "GET", ModelScope.UNSCOPED),
        _route("/v1/batches/{id}/cancel", "POST", ModelScope.UNSCOPED),
        _route("/v1/load_lora_adapter", "POST", ModelScope.UNSCOPED),
        _route("/v1/unload_lora_adapter", "POST", ModelScope.UNSCOPED),
    )
}
# The OpenAI inference routes vLLM serves, each with its model where the gateway can check it.
DEFAULT_ROUTES: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/rerank",
    "/v1/score",
)
_UNSCOPED_REFUSAL = "This credential is limited to some models and may not use this endpoint."
TOKEN_ROUTE = _route("/v1/auth/token", "POST", ModelScope.GATEWAY)
USAGE_ROUTE = _route("/v1/usage", "GET", ModelScope.GATEWAY)  # the caller's own usage and budgets


def parse_routes(entries: Iterable[str]) -> tuple[Route, ...]:
    """BASTION_ROUTES' entries: `default` (the DEFAULT_ROUTES) and/or catalogue paths. Raises ValueError, clearly."""
    routes: dict[str, Route] = {}
    for entry in entries:
        names = DEFAULT_ROUTES if entry.strip() == "default" else (entry.strip(),)
        for name in names:
            route = CATALOGUE.get(name)
            if route is None:
                known = ", ".join(CATALOGUE)
                raise ValueError(f"unknown route {name!r}; use `default` and/or any of: {known}")
            routes[name] = route
    return tuple(routes.values())


class RouteTable:
    """Path -> Route: a dict for plain paths, then the few templates with a placeholder."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._exact: dict[str, Route] = {}
        self._templates: list[tuple[str, str, bool, Route]] = []  # (prefix, suffix, spans segments, route)
        for route in routes:
            if "{" not in route.path:
                self._exact[route.path] = route
                continue
            prefix, _, rest = route.path.partition("{")
            name, _, suffix = rest.partition("}")
            self._templates.append((prefix, suffix, name == "model", route))

    def match(self, path: str) -> Route | None:
        route = self._exact.get(path)
        if route is not None or not self._templates:
            return route
        if "//" in path or ("/." in path and any(part in (".", "..") for part in path.split("/"))):
            return None  # no empty or dot segments in an id: nothing an upstream might normalise
        for prefix, suffix, spans, candidate in self._templates:
            if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix) + len(suffix):
                middle = path[len(prefix) : len(path) - len(suffix)]
                if spans or "/" not in middle:
                    return candidate
        return None

    @staticmethod
    def model_in_path(route: Route, path: str) -> str:
        """The model a `model-in-path` route names (its `{model}` part)."""
        prefix = route.path.partition("{")[0]
        return path[len(prefix) :]


class RouteGuard:
    """Plain ASGI, after authentication: unknown route 404, wrong method 405, out-of-scope 403."""

    def __init__(self, app: ASGIApp, table: RouteTable) -> None:
        self.app = app
        self._table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        path = scope["path"]
        route = self._table.match(path)
        error: GatewayError | None = None
        if route is None:
            error = GatewayError(404, "Unknown route.", code="unknown_route")
        elif scope["method"] not in route.methods:
            allow = ", ".join(sorted(route.methods)).encode()
            error = GatewayError(405, f"Method {scope['method']} is not allowed here.", headers=[(b"allow", allow)])
        else:
            exchange.route = route.path
            principal = exchange.principal
            if principal is not None and principal.models is not None:
                if route.scope is ModelScope.UNSCOPED:
                    error = GatewayError(403, _UNSCOPED_REFUSAL, code="route_not_allowed")
                elif route.scope is ModelScope.PATH and not principal.allows(self._table.model_in_path(route, path)):
                    error = refusal("model_not_allowed")
        if error is None:
            await self.app(scope, receive, send)
            return
        exchange.status, exchange.outcome, exchange.reason = error.status, Outcome.REJECTED, error.resolved_code
        await send_error(send, error, [(b"x-request-id", exchange.request_id.encode())])
