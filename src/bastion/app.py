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
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing, asynccontextmanager
from typing import cast

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from .admin import RESTART_PATH, RestartEndpoint, Restarter
from .asgi import ASGIApp, Receive, Scope, Send, header, unanswered
from .audit import audit_log
from .auth.ipfilter import IPPolicy, parse_ip, parse_networks
from .auth.jwt import JWTConfig, JWTVerifier
from .auth.keys import KeyStore
from .auth.middleware import Auth
from .auth.token_endpoint import TokenConfig, TokenEndpoint
from .budget.endpoint import UsageEndpoint
from .budget.metrics import BudgetMetrics
from .budget.middleware import BudgetStage, Resolver
from .budget.options import open_ledger
from .budget.policy import parse_budget, unique
from .config import Settings, fairness_problem
from .context import Exchange, Listener, Outcome
from .engine.catalog import ModelCatalog
from .engine.command import CommandError, CommandSource, build_command
from .engine.engines import EngineEntry, load_engines_json, parse_engines
from .engine.external import ExternalWatch, status_of
from .engine.fleet import Carried, Fleet, ReplicaPlan
from .engine.probe import ProbeChannel
from .engine.prompt_count import PROMPT_COUNT_TIMEOUT, PromptCounter
from .engine.router import Backend, EngineGroup, Replica, Router
from .engine.spec import EngineSpec, free_port
from .engine.state import Phase, Upstream
from .engine.supervisor import Supervisor, supervise
from .engine.vllm import VllmArgs
from .errors import GatewayError, error_body, send_error
from .fairness.classes import ClassTable
from .fairness.gate import Gate
from .fairness.groups import GateLimits, follow_groups, group_gates, group_of
from .fairness.metrics import QueueCollector
from .fairness.scrape import watch_waiting
from .fairness.stage import FairShare
from .http import Client, Timeouts
from .metrics import Metrics
from .metrics_http import MetricsEndpoint, ScrapeGuard, metrics_routes
from .proxy import Proxy
from .ratelimit import RateLimiter, RateLimitMiddleware, RedisCollector
from .redisio import Redis
from .request_body import InspectBody, RequestInspector
from .routes import TOKEN_ROUTE, USAGE_ROUTE, ModelScope, RouteGuard, RouteTable, parse_routes
from .workers.engines import EngineMirror
from .workers.link import MasterLink
from .workers.metrics import WorkersMetricsEndpoint

log = logging.getLogger("bastion")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_UPSTREAM_METRICS_TIMEOUT = 5.0  # relaying the engine's own /metrics
_ENGINE_MODELS_TIMEOUT = 2.0  # asking an engine for its /v1/models card (a client waits for it)


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
            peer: str = client[0]
            if peer.startswith("::ffff:"):  # an IPv4 client of a dual-stack socket: its IPv4 address
                peer = str(parse_ip(peer) or peer)
            exchange.client_ip = peer
        exchange.attach(scope)
        try:
            for opener in self._openers:
                opener(exchange)
            await self._v1(scope, receive, send)
        except Exception:
            if not unanswered(scope):
                raise  # the server ends the broken response (and logs it)
            # A bug in a stage (every expected failure is answered where it happens): an OpenAI-shaped 500 with
            # the request id to report, not the server's plain-text one.
            log.exception("request %s failed inside the gateway", exchange.request_id)
            exchange.status, exchange.outcome, exchange.reason = 500, Outcome.REJECTED, "internal_error"
            error = GatewayError(
                500, "The gateway failed to handle this request; report its x-request-id if it persists.",
                code="internal_error",
            )  # fmt: skip
            await send_error(send, error, [(b"x-request-id", exchange.request_id.encode())])
        finally:
            try:
                if exchange.deferred:  # most requests leave nothing: no coroutine to make and await
                    await _finish_deferred(exchange)
            finally:  # cancelled there too (a graceful shutdown running out): the served request is recorded
                exchange.finished = time.perf_counter()
                for listener in self._listeners:
                    try:
                        listener(exchange)
                    except Exception:
                        log.exception("request listener failed (request %s)", exchange.request_id)


async def _finish_deferred(exchange: Exchange) -> None:
    """Await what stages issued as they returned (already sent, together: one round trip for all); each handles
    its own failure, a bug is logged here. Cancelled: the rest are closed unawaited (their replies are dropped)."""
    deferred = exchange.deferred
    for i, waiting in enumerate(deferred):
        try:
            await waiting
        except Exception:
            log.exception("finishing request %s failed", exchange.request_id)
        except BaseException:
            for rest in deferred[i + 1 :]:
                if isinstance(rest, Coroutine):
                    rest.close()
            raise


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    listeners: Sequence[Listener] = (),
    link: MasterLink | None = None,
) -> Gateway:
    """The gateway; `link` (a worker of `bastion serve --workers N`): the master runs the engines, this
    process mirrors their state and asks the master for restarts and the other workers' metrics."""
    auth = build_auth(settings)
    client = Client(
        timeouts=Timeouts(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,
            write=settings.upstream_write_timeout,
            pool=settings.upstream_pool_timeout,
        ),
        max_connections=settings.upstream_max_connections,
        max_keepalive=settings.upstream_max_keepalive,
        keepalive_expiry=settings.upstream_keepalive_expiry,
    )
    # Everything that runs beside the request path (the supervisor, key reloading, ...) is an
    # async context manager entered at start-up and left, in reverse order, at shutdown.
    # One Redis connection per process, pipelined, for every user of BASTION_REDIS_URL (the rate limiter and
    # the budget ledger): closed once, after both have stopped (entered first, so left last).
    url = settings.redis_url.get_secret_value() if settings.redis_url is not None else None
    redis = Redis.from_url(url, settings.redis_timeout) if url is not None else None
    limiter = _rate_limiter(settings, redis)
    # The engine's own channels: probes and readiness, and relaying its /metrics. Client traffic
    # (the pool above, capped at upstream_max_connections) can never starve them.
    probes = ProbeChannel(settings.health_timeout)
    scrapes = ProbeChannel(_UPSTREAM_METRICS_TIMEOUT, max_connections=2)
    services: list[AbstractAsyncContextManager[object]] = [client, limiter.service(), *auth.services(), probes, scrapes]
    if redis is not None:
        services.insert(0, aclosing(redis))
    watch: ExternalWatch | None = None
    mirror = link.mirror if link is not None else None
    entries = engine_entries(settings) if upstream is None else ()
    # The audit log's redactor knows every secret the settings hold, and learns each engine key as it is minted
    # (at start, and by every restart of an engine: a new child gets a new key), or mirrored from the master.
    secrets = [
        s.get_secret_value() for s in (settings.upstream_api_key, settings.metrics_token, settings.admin_token) if s
    ]
    secrets += [entry.api_key for entry in entries if entry.api_key]
    audit = audit_log(settings.audit_log, secrets, shared=link is not None)
    on_key = audit.add_secret if audit is not None else None
    if mirror is not None and on_key is not None:
        mirror.tell_keys(on_key)
    if entries:
        router, fleet = build_engines(settings, entries, mirror=mirror, on_key=on_key)
    else:
        supervisor: Supervisor | None = None
        if upstream is None:
            if settings.upstream_url is not None:
                key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
                upstream = Upstream(str(settings.upstream_url), key, Phase.EXTERNAL)
            elif mirror is not None:  # a worker: the master supervises the engine
                upstream = mirror.upstream(one_engine_label(settings))
            else:
                upstream, supervisor = supervise(engine_spec(settings), probes, on_key)
        if upstream.phase is Phase.EXTERNAL:
            watch = ExternalWatch(upstream, probes, settings.health_interval)
            services.append(watch)
        router, fleet = one_engine(settings, upstream, supervisor, restart_signal=mirror is None, on_key=on_key)
    services.append(fleet)
    first = (router.default or router.groups[0]).replicas[0]

    def current() -> Upstream:
        """The first replica's engine now (what /ready and the one-engine metrics describe): a restart
        replaces the replica's Upstream, with a new port and key."""
        return first.backend.upstream

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
        """Ready: requests would reach a model that answers; if not, `detail` says why."""
        if router.named:
            return _engines_ready(router)
        if watch is not None:  # external: the latest check over the probe channel (at most 1 s old)
            probe = await watch.current()
            external = {"status": status_of(probe), "detail": probe.detail}
            return JSONResponse(external, status_code=200 if probe.up else 503)
        now = current()
        state = {"status": now.phase.value, "detail": now.detail, "restarts": now.restarts}
        return JSONResponse(state, status_code=200 if now.phase is Phase.READY else 503)

    # Observability: metrics and audit are listeners on every finished exchange.
    metrics = Metrics(settings, current) if settings.metrics_enabled else None
    # Token budgets and usage: a ledger of hour roll-ups (memory, SQLite beside the key file, or Redis).
    budget_options = settings.budget_options()
    ledger = open_ledger(budget_options, redis=redis)
    services.append(ledger.running())
    budgets = Resolver(budget_options.defaults)
    budget_metrics = (
        BudgetMetrics(metrics.registry, by_principal=settings.metrics_principal_label) if metrics is not None else None
    )

    # The /v1 path, outermost first: who (auth) -> which route -> read and inspect the body (bounded) ->
    # how much (limits: reserve tokens) -> the usage or token endpoint, or budgets (reserve) -> the fair queue
    # (when classes are on) -> the proxy (forward; budgets and limits settle as it returns). Minting a token or
    # asking for usage is a request like any other: routed, and counted against the key's limits.
    catalog: ModelCatalog | None = None
    if router.named:  # GET /v1/models: each engine's own card, asked over a channel of its own
        models = ProbeChannel(_ENGINE_MODELS_TIMEOUT, max_connections=1)
        services.append(models)
        catalog = ModelCatalog(router, models.http, timeout=_ENGINE_MODELS_TIMEOUT)
    # A prompt whose usage was never read (its client left, its engine broke mid-stream) is counted by the engine
    # that served it (POST /tokenize), over connections of its own, bounded by a short timeout: never longer than
    # the silence after which the operator calls an engine failed.
    counter = PromptCounter(min(PROMPT_COUNT_TIMEOUT, settings.upstream_read_timeout))
    services.append(counter)
    inner: ASGIApp = Proxy(router, client, methods=settings.passthrough_methods, catalog=catalog, counter=counter)
    classes = settings.class_table() if settings.fairness else None
    gates: dict[str, Gate] = {}
    if classes is not None:  # the fair queue, just before the proxy forwards (bastion.fairness)
        inner = _fair_share(settings, inner, classes, router, current, scrapes, services, gates)
    stage = inner = BudgetStage(inner, ledger, budgets, fail_open=budget_options.fail_open, metrics=budget_metrics)
    routes = (*parse_routes(settings.routes), USAGE_ROUTE)
    if settings.token_endpoint:
        inner = TokenEndpoint(inner, token_config(settings))
        routes += (TOKEN_ROUTE,)
    inner = UsageEndpoint(inner, ledger, budgets)
    # Limits and budgets both on the one Redis connection: the budget's reservation leaves in the limiter's last
    # write (the requests/min hit), one round trip for both.
    alongside = stage if budget_options.redis_url is not None and limiter.shared else None
    inspect = InspectBody(
        RateLimitMiddleware(inner, limiter, alongside),
        RequestInspector(
            default_max_tokens=settings.default_max_tokens,
            enforce_max_tokens=settings.enforce_max_tokens,
            allow_background=settings.responses_background,
        ),
        max_body=settings.max_body_bytes,
        body_timeout=settings.client_body_timeout,
        model_routes=frozenset(route.path for route in routes if route.scope is ModelScope.BODY),
        classes=classes,
        default_model=_default_model(router),
    )
    v1 = auth.guard(RouteGuard(inspect, RouteTable(routes)), failures=limiter)

    if audit is not None:
        if engine_key := current().api_key:  # an `upstream` given by the caller
            audit.add_secret(engine_key)
        services.insert(0, audit.service())  # left last at shutdown: writes the buffered lines
    observers = [listener for listener in (metrics, audit) if listener is not None]
    # Paths with a credential of their own (the metrics token), answered before the key/JWT guard.
    mounts: dict[str, ASGIApp] = {}
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    trusted = parse_networks(settings.trusted_proxies)
    restarts: Restarter = link if link is not None else fleet  # a worker asks the master, which runs the engines
    mounts[RESTART_PATH] = RestartEndpoint(restarts, admin_token, parse_networks(settings.admin_allow), trusted)
    if metrics is not None:
        metrics.registry.register(limiter.collector())
        if redis is not None:
            metrics.registry.register(RedisCollector(redis))
        if gates:
            metrics.registry.register(QueueCollector(gates))
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        probe = watch.up if watch is not None else _never_asked
        guard = ScrapeGuard(token, settings.metrics_allow, auth.policy.trusted_proxies)
        if guard.closed:
            log.warning(
                "BASTION_TRUSTED_PROXIES is set and BASTION_METRICS_TOKEN is not: /metrics refuses every scrape "
                "(behind a proxy a loopback peer is not a local scraper); set BASTION_METRICS_TOKEN"
            )
        engines = router.backends if router.named else None  # several engines: every replica's page, merged
        mounts.update(metrics_routes(guard, metrics, current, scrapes.http, probe, engines))
        if link is not None:  # a scrape lands on one worker: it answers every worker's page, `worker`-labelled
            own = cast(MetricsEndpoint, mounts["/metrics"])
            mounts["/metrics"] = WorkersMetricsEndpoint(guard, link.pages)
            services.append(link.running(router, own.page))
    elif link is not None:
        services.append(link.running(router, None))
    return Gateway(
        api,
        v1,
        [*observers, *listeners],
        guarded_api=auth.guard(api, exempt=PUBLIC_PATHS, failures=limiter),
        openers=[metrics.open] if metrics is not None else [],
        mounts=mounts,
    )


def _fair_share(
    settings: Settings,
    proxy: ASGIApp,
    classes: ClassTable,
    router: Router,
    upstream: Callable[[], Upstream],
    scrapes: ProbeChannel,
    services: list[AbstractAsyncContextManager[object]],
    gates: dict[str, Gate],
) -> ASGIApp:
    """A gate per engine group in front of the proxy; the scrape of the engine's waiting queue when a threshold
    is set (one engine here; with several, the fleet scrapes and `follow_groups` sums per group)."""
    limits = GateLimits(
        capacity=settings.engine_capacity,
        reserve=settings.engine_reserve,
        backlog=settings.engine_backlog,
        lead=settings.engine_backlog_lead,
        waiting_threshold=settings.engine_waiting_threshold,
        queue_size=settings.queue_size,
    )
    gates.update(group_gates(router, classes, limits))
    threshold = settings.engine_waiting_threshold is not None
    if router.named:
        services.append(follow_groups(router, gates, waiting=threshold))
    elif threshold:
        (gate,) = gates.values()
        services.append(
            watch_waiting(
                scrapes.http, lambda: upstream().base_url, lambda: upstream().api_key, gate.set_engine_waiting
            )
        )
    return FairShare(proxy, gates, classes, group_of(router))


def engine_spec(settings: Settings) -> EngineSpec:
    """The supervised engine the settings describe, its command checked before anything runs.

    Raises `CommandError` (a ValueError) with one line naming the setting and the fix;
    `bastion serve` prints it and exits 2, and `check-config` can call `engine_problem`.
    The child's environment is bastion's minus every BASTION_* variable (they may hold
    secrets), plus BASTION_UPSTREAM_ENV.
    """
    host = settings.upstream_host
    port = settings.upstream_port or free_port(host)
    env = _child_env(settings.upstream_env)
    source = CommandSource(
        template=settings.upstream_command,
        python=settings.vllm_python,
        vllm=VllmArgs(
            model=settings.model,
            served_model_name=settings.served_model_name,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            extra_args=settings.vllm_extra_args,
            scheduling_policy="priority" if settings.fairness else None,
        ),
    )
    command = build_command(source, host=host, port=port, port_fixed=bool(settings.upstream_port), path=env.get("PATH"))
    return _supervised(settings, settings.served_model_name or settings.model, command.argv, port, env, command.setting)


def engine_entries(settings: Settings) -> tuple[EngineEntry, ...]:
    """BASTION_ENGINES (or the file BASTION_ENGINES_FILE names), checked; () for the one engine of the
    BASTION_UPSTREAM_* settings. Raises ValueError/OSError (preflight says which setting, in one line)."""
    items = settings.engines
    if not items and settings.engines_file is not None:
        items = load_engines_json(settings.engines_file.read_text())
        # BASTION_ENGINES was checked against BASTION_FAIRNESS as a setting; the file is read only now (its line
        # is "invalid BASTION_ENGINES_FILE: entry ...")
        if (problem := fairness_problem(settings.fairness, items)) is not None:
            raise ValueError(problem)
    return parse_engines(items, os.environ)


def replica_spec(settings: Settings, entry: EngineEntry, index: int) -> EngineSpec:
    """One replica of a configured engine, on a port of its own (a new one per start); raises `CommandError`."""
    host = settings.upstream_host
    port = free_port(host)
    env = _child_env(entry.env)
    gpus = entry.gpus_of(index)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpus)
    source = CommandSource(
        template=entry.command,
        python=entry.python or settings.vllm_python,
        vllm=VllmArgs(
            model=entry.vllm_model or entry.model,
            served_model_name=entry.model,
            dtype=entry.dtype,
            max_model_len=entry.max_model_len,
            gpu_memory_utilization=entry.gpu_memory_utilization,
            tensor_parallel_size=entry.tensor_parallel_size,
            extra_args=entry.extra_args,
            scheduling_policy="priority" if settings.fairness else None,
        ),
    )
    try:
        command = build_command(source, host=host, port=port, port_fixed=False, path=env.get("PATH"))
    except CommandError as exc:
        raise CommandError(f"BASTION_ENGINES: {entry.model!r}: {exc.reason}") from None
    return _supervised(settings, entry.label(index), command.argv, port, env, "BASTION_ENGINES")


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A child's environment: bastion's minus every BASTION_* variable (they may hold secrets), plus `extra`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BASTION_")}
    env.update(extra)
    return env


def _supervised(
    settings: Settings, name: str, argv: tuple[str, ...], port: int, env: dict[str, str], command_setting: str
) -> EngineSpec:
    """An engine spec with the supervision settings (probes, backoff, restarts, stop) every child shares."""
    return EngineSpec(
        name=name,
        command=argv,
        host=settings.upstream_host,
        port=port,
        env=env,
        command_setting=command_setting,
        startup_timeout=settings.startup_timeout,
        health_interval=settings.health_interval,
        health_timeout=settings.health_timeout,
        health_failures=settings.health_failures,
        backoff=settings.restart_backoff,
        backoff_max=settings.restart_backoff_max,
        max_restarts=settings.max_restarts,
        restart_window=settings.restart_window,
        stop_timeout=settings.stop_timeout,
    )


def _default_model(router: Router) -> str:
    """The model of the engine that serves a request naming none (the router's choice for "")."""
    group = router.group("")
    return group.name if group is not None else ""


def one_engine_label(settings: Settings) -> str:
    return f"{settings.served_model_name or settings.model}/0"


def one_engine(
    settings: Settings,
    upstream: Upstream,
    supervisor: Supervisor | None,
    in_flight: Callable[[Backend], Carried] | None = None,
    restart_signal: bool = True,
    on_key: Callable[[str], None] | None = None,
) -> tuple[Router, Fleet]:
    """The router and fleet of the one engine of the BASTION_UPSTREAM_* settings (`restart_signal`: SIGUSR1
    restarts it; not in a worker, whose master does)."""
    name = settings.served_model_name or settings.model
    only = Replica(0, Backend(upstream, one_engine_label(settings)))
    router = Router((), default=EngineGroup(name, [only]), session_header=settings.session_header.encode())
    plans = []
    if supervisor is not None:  # restartable in place (`bastion engines restart`): a fresh spec each time
        plans.append(ReplicaPlan(only, lambda: engine_spec(settings), supervisor=supervisor))
    fleet = Fleet(
        router,
        plans,
        drain_timeout=settings.drain_timeout,
        scrape_waiting=False,
        in_flight=in_flight,
        restart_signal=restart_signal,
        on_key=on_key,
    )
    return router, fleet


def build_engines(
    settings: Settings,
    entries: Sequence[EngineEntry],
    *,
    mirror: EngineMirror | None = None,
    in_flight: Callable[[Backend], Carried] | None = None,
    on_key: Callable[[str], None] | None = None,
) -> tuple[Router, Fleet]:
    """The router over every configured engine and the fleet that runs them (nothing starts before the lifespan).

    `mirror` (a worker): the master runs the supervised replicas; here each is the mirror of its state.
    `in_flight` (the master): what a replica carries, as the workers count it."""
    groups: list[EngineGroup] = []
    plans: list[ReplicaPlan] = []
    for entry in entries:
        replicas = []
        for index in range(entry.replicas):
            if entry.url is not None:
                upstream = Upstream(entry.url, entry.api_key, Phase.EXTERNAL)
                replica = Replica(index, Backend(upstream, entry.label(index)))
                plans.append(ReplicaPlan(replica, None, settings.health_timeout, settings.health_interval))
            elif mirror is not None:
                replica = Replica(index, Backend(mirror.upstream(entry.label(index)), entry.label(index)))
            else:

                def make(entry: EngineEntry = entry, index: int = index) -> EngineSpec:
                    return replica_spec(settings, entry, index)

                spec = make()
                channel = ProbeChannel(settings.health_timeout)
                upstream, supervisor = supervise(spec, channel, on_key)
                replica = Replica(index, Backend(upstream, entry.label(index)))
                plans.append(ReplicaPlan(replica, make, supervisor=supervisor, channel=channel))
            replicas.append(replica)
        groups.append(EngineGroup(entry.model, replicas, entry.capacity))
    router = Router(
        groups, session_header=settings.session_header.encode(), prefix_bytes=settings.prefix_affinity_bytes
    )
    # The router's tie-breaker between replicas, and the fair queue's waiting threshold, read the engines' queues.
    threshold = settings.fairness and settings.engine_waiting_threshold is not None
    scrape = threshold or any(len(group.replicas) > 1 for group in groups)
    scrape = scrape and mirror is None  # a worker hears the queues from the master
    fleet = Fleet(
        router,
        plans,
        drain_timeout=settings.drain_timeout,
        scrape_waiting=scrape,
        in_flight=in_flight,
        restart_signal=mirror is None,  # a worker's engines are restarted by its master
        on_key=on_key,
    )
    return router, fleet


def _engines_ready(router: Router) -> JSONResponse:
    """/ready with several engines: 200 when every model has a ready replica; each replica's state."""
    engines: dict[str, object] = {}
    missing = []
    for group in router.groups:
        replicas = [
            {
                "replica": replica.index,
                "status": replica.backend.upstream.phase.value if not replica.backend.draining else "draining",
                "detail": replica.backend.upstream.detail,
                "restarts": replica.backend.upstream.restarts,
                "outstanding": replica.backend.outstanding,
            }
            for replica in group.replicas
        ]
        ready = sum(1 for replica in group.replicas if replica.backend.usable)
        engines[group.name] = {"ready": ready, "replicas": replicas}
        if not ready:
            missing.append(group.name)
    body: dict[str, object] = {"status": "ready" if not missing else "not_ready", "engines": engines}
    if missing:
        body["detail"] = "no ready replica for: " + ", ".join(missing)
    return JSONResponse(body, status_code=200 if not missing else 503)


def engine_problem(settings: Settings) -> str | None:
    """For `bastion check-config`: why the supervised engine's command cannot work (one line), or None.

    None too in external mode (BASTION_UPSTREAM_URL), where bastion runs nothing.
    """
    try:
        entries = engine_entries(settings)
    except OSError as exc:
        return f"invalid BASTION_ENGINES_FILE: cannot read {settings.engines_file}: {exc.strerror or exc}"
    except ValueError as exc:
        where = "BASTION_ENGINES_FILE" if not settings.engines else "BASTION_ENGINES"
        return f"invalid {where}: {exc}"
    try:
        if entries:
            for entry in entries:
                if entry.url is None:
                    replica_spec(settings, entry, 0)
            return None
        if settings.upstream_url is not None:
            return None
        engine_spec(settings)
    except CommandError as exc:
        return f"invalid {exc.setting}: {exc.reason}"  # the shape of every other invalid setting's line
    return None


async def _never_asked() -> bool:
    """The metrics probe of a supervised engine: its phase says whether it is up, nothing is probed."""
    return False


def build_auth(settings: Settings) -> Auth:
    """The key store, the JWT verifier (bound to the key store, for tokens minted from keys) and the IP lists."""
    keys = KeyStore(settings.keys_file, settings.bootstrap_keys())
    verifier = JWTVerifier(jwt_config(settings), keys.by_id)
    policy = IPPolicy(
        allow=parse_networks(settings.allow_ips),
        deny=parse_networks(settings.deny_ips),
        trusted_proxies=parse_networks(settings.trusted_proxies),
    )
    return Auth(keys, verifier if verifier.configured else None, policy, settings.keys_reload_interval)


def jwt_config(settings: Settings) -> JWTConfig:
    return JWTConfig(
        algorithms=frozenset(settings.jwt_algorithms),
        secret=settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
        public_key_file=settings.jwt_public_key_file,
        jwks=settings.jwt_jwks,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway=settings.jwt_leeway,
        models_claim=settings.jwt_models_claim,
        limits_claim=settings.jwt_limits_claim,
        allowed_models=frozenset(settings.jwt_allowed_models) if settings.jwt_allowed_models else None,
        max_rpm=settings.jwt_max_rpm,
        max_tpm=settings.jwt_max_tpm,
        max_concurrent=settings.jwt_max_concurrent,
        budgets_claim=settings.jwt_budgets_claim,
        max_budgets=unique(parse_budget(text) for text in settings.jwt_max_budgets),
        priority_class_claim=settings.jwt_priority_class_claim,
        class_orders={c.name: c.order for c in settings.class_table().classes},
        max_priority_class=settings.jwt_max_priority_class or settings.default_priority_class,
    )


def token_config(settings: Settings) -> TokenConfig:
    if settings.jwt_secret is None or "HS256" not in settings.jwt_algorithms:
        raise ValueError("BASTION_TOKEN_ENDPOINT needs BASTION_JWT_SECRET and HS256 in BASTION_JWT_ALGORITHMS")
    return TokenConfig(
        secret=settings.jwt_secret.get_secret_value(),
        max_ttl=settings.token_endpoint_ttl,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        models_claim=settings.jwt_models_claim,
        body_timeout=settings.client_body_timeout,
    )


def _rate_limiter(settings: Settings, redis: Redis | None) -> RateLimiter:
    return RateLimiter(
        rpm=settings.rate_limit_rpm,
        tpm=settings.rate_limit_tpm,
        max_concurrent=settings.rate_limit_max_concurrent,
        auth_failure_limit=settings.auth_failure_limit,
        redis=redis,
        fail_open=settings.redis_fail_mode == "open",
        slot_ttl=settings.concurrency_slot_ttl,
    )


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
