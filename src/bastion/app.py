"""`create_app(settings)`: wiring only, no request logic.

The returned ASGI app sends `/v1/*` straight to the plain-ASGI proxy (the hot
path skips FastAPI's routing) and everything else to a small FastAPI app for the
health, readiness and admin routes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from .asgi import ASGIApp, Receive, Scope, Send, header
from .audit import audit_log
from .auth.middleware import Auth
from .auth.token_endpoint import TokenEndpoint
from .config import Settings
from .context import Exchange, Listener
from .engine.probe import answers_health
from .engine.state import Phase, Upstream
from .engine.supervisor import supervised_upstream
from .errors import error_body
from .http import Client, Timeouts
from .metrics import Metrics
from .metrics_http import metrics_routes
from .proxy import Proxy
from .ratelimit import RateLimiter, RateLimitMiddleware
from .request_body import InspectBody, RequestInspector

log = logging.getLogger("bastion")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

# Deny by default: every path needs an API key or JWT except these two probes and the
# `mounts` given to Gateway (/metrics, /metrics/upstream), which check a credential of their own.
PUBLIC_PATHS = frozenset({"/health", "/ready"})


class Gateway:
    """The outermost ASGI callable: opens an `Exchange` per `/v1` request and dispatches."""

    def __init__(
        self,
        api: FastAPI,
        v1: ASGIApp,
        listeners: Sequence[Listener],
        *,
        guarded_api: ASGIApp | None = None,
        openers: Sequence[Listener] = (),
        mounts: Mapping[str, ASGIApp] | None = None,
    ) -> None:
        self.api = api
        self._v1 = v1
        self._listeners = tuple(listeners)
        self._other = guarded_api or api  # the admin app behind the deny-by-default guard
        self._openers = tuple(openers)  # called when an exchange starts (e.g. in-flight gauge +1)
        self._mounts = dict(mounts or {})  # exact paths answered first, with a credential of their own

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.api(scope, receive, send)
            return
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            mounted = self._mounts.get(scope["path"]) if scope["type"] == "http" else None
            await (mounted or self._other)(scope, receive, send)
            return
        exchange = Exchange(request_id=_request_id(scope), method=scope["method"], path=scope["path"])
        client = scope.get("client")
        if client:
            exchange.client_ip = client[0]
        exchange.attach(scope)
        try:
            for opener in self._openers:
                opener(exchange)
            await self._v1(scope, receive, send)
        finally:
            exchange.finished = time.perf_counter()
            for listener in self._listeners:
                try:
                    listener(exchange)
                except Exception:
                    log.exception("request listener failed (request %s)", exchange.request_id)


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    listeners: Sequence[Listener] = (),
) -> Gateway:
    auth = Auth(settings)
    client = Client(
        timeouts=Timeouts(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,
            write=settings.upstream_write_timeout,
            pool=settings.upstream_pool_timeout,
        ),
        max_connections=settings.upstream_max_connections,
        keepalive_expiry=settings.upstream_keepalive_expiry,
    )
    # Everything that runs beside the request path (the supervisor, key reloading, ...) is an
    # async context manager entered at start-up and left, in reverse order, at shutdown.
    limiter = _rate_limiter(settings)
    services: list[AbstractAsyncContextManager[object]] = [client, limiter.service(), *auth.services()]
    if upstream is None:
        if settings.upstream_url is not None:
            key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
            upstream = Upstream(str(settings.upstream_url), key, Phase.EXTERNAL)
        else:
            upstream, supervisor = supervised_upstream(settings, client.http)
            services.append(supervisor)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for service in services:
                await stack.enter_async_context(service)
            yield

    api = FastAPI(title="bastion", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(api)

    @api.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        """Alive: the gateway process answers. Says nothing about the model."""
        return {"status": "ok"}

    @api.get("/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        """Ready: requests would reach a model that answers."""
        state: dict[str, str | int] = {
            "status": upstream.phase.value,
            "detail": upstream.detail,
            "restarts": upstream.restarts,
        }
        if upstream.phase is Phase.EXTERNAL:
            reachable = await _probe(client.http, upstream.base_url + "/health")
            state = {"status": "ready" if reachable else "unreachable", "detail": ""}
            return JSONResponse(state, status_code=200 if reachable else 503)
        return JSONResponse(state, status_code=200 if upstream.phase is Phase.READY else 503)

    # The /v1 path, outermost last: authenticate -> token endpoint -> read and inspect the body ->
    # limits (reserve tokens) -> proxy (forward; the limits stage settles when it returns).
    v1: ASGIApp = RateLimitMiddleware(Proxy(upstream, client, methods=settings.passthrough_methods), limiter)
    v1 = InspectBody(
        v1,
        RequestInspector(default_max_tokens=settings.default_max_tokens),
        max_body=settings.max_body_bytes,
        body_timeout=settings.client_body_timeout,
    )
    if settings.token_endpoint:
        v1 = TokenEndpoint(v1, settings)
    v1 = auth.guard(v1, failures=limiter)

    # Observability: metrics and audit are listeners on every finished exchange.
    metrics = Metrics(settings, upstream) if settings.metrics_enabled else None
    secrets = [s.get_secret_value() for s in (settings.upstream_api_key, settings.metrics_token) if s]
    if upstream.api_key:
        secrets.append(upstream.api_key)
    audit = audit_log(settings.audit_log, secrets)
    if audit is not None:
        services.insert(0, audit.service())  # left last at shutdown: writes the buffered lines
    observers = [listener for listener in (metrics, audit) if listener is not None]
    # Paths with a credential of their own (the metrics token), answered before the key/JWT guard.
    mounts: dict[str, ASGIApp] = {}
    if metrics is not None:
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        health_url = upstream.base_url + "/health"
        mounts.update(
            metrics_routes(
                token, settings.metrics_allow, metrics, upstream, client.http, lambda: _probe(client.http, health_url)
            )
        )
    return Gateway(
        api,
        v1,
        [*observers, *listeners],
        guarded_api=auth.guard(api, exempt=PUBLIC_PATHS, failures=limiter),
        openers=[metrics.open] if metrics is not None else [],
        mounts=mounts,
    )


def _rate_limiter(settings: Settings) -> RateLimiter:
    return RateLimiter(
        rpm=settings.rate_limit_rpm,
        tpm=settings.rate_limit_tpm,
        max_concurrent=settings.rate_limit_max_concurrent,
        auth_failure_limit=settings.auth_failure_limit,
        redis_url=settings.redis_url.get_secret_value() if settings.redis_url is not None else None,
        redis_timeout=settings.redis_timeout,
        fail_open=settings.redis_fail_mode == "open",
        slot_ttl=settings.concurrency_slot_ttl,
    )


async def _probe(client: httpx.AsyncClient, url: str) -> bool:
    return await answers_health(client, url, seconds=2.0)


def _request_id(scope: Scope) -> str:
    given = header(scope, b"x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given.decode()
    return os.urandom(16).hex()  # uuid4().hex's format at a fraction of its cost


def _install_error_handlers(api: FastAPI) -> None:
    """FastAPI's own 404/405/422 answers in the OpenAI envelope too."""

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = "Unknown route." if exc.status_code == 404 else str(exc.detail)
        return Response(error_body(exc.status_code, message), exc.status_code, media_type="application/json")

    async def validation_error(_: Request, exc: Exception) -> Response:
        return Response(error_body(400, "Invalid request."), 400, media_type="application/json")

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
