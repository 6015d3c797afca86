"""`bastion_*` Prometheus metrics: one registry per app, updated once per request.

Nothing is registered globally: `create_app` builds a `Metrics`, which owns its
`CollectorRegistry` (process and platform collectors included), so several apps
in one process (tests) never collide. The request path touches metrics twice: the
Gateway calls `open` (in-flight +1) when an exchange starts and the listener
(`__call__`) when it ends. Label children are cached in dicts keyed by the label
tuple, so a finished request costs a few dict look-ups and increments, never a
`labels()` call after warm-up, and nothing runs per chunk.

Label values are bounded: `route` is one of a fixed set of /v1 routes (ids
stripped) or `other`; `model` is a configured model, or one the upstream has
answered with a 2xx (at most `MAX_LEARNED_MODELS`), else `other`, so clients
cannot mint series by sending made-up model names; `principal` is the key's
name (bounded by the number of keys) or "" when the label is turned off.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .accounting import retrieval
from .config import Settings
from .context import Exchange, Outcome
from .engine.state import Phase, Upstream

# LLM latencies: 5 ms (a rejected or cached answer) to 10 minutes (a long generation).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
MAX_LEARNED_MODELS = 32
OTHER = "other"

_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/moderations",
        "/v1/rerank",
        "/v1/score",
        "/v1/classify",
        "/v1/pooling",
        "/v1/tokenize",
        "/v1/detokenize",
        "/v1/files",
        "/v1/batches",
    }
)
# Routes whose next segment is an id: the id is replaced, so ids never become label values.
_ID_ROUTES = ("/v1/models/", "/v1/responses/", "/v1/files/", "/v1/batches/")
# Exchange reasons that are upstream trouble, as `bastion_upstream_errors_total{kind}`.
_UPSTREAM_REASONS = frozenset(
    {"upstream_unavailable", "upstream_timeout", "midstream", "model_loading", "upstream_not_ready", "upstream_busy"}
)


def route_of(path: str) -> str:
    """The normalised route label of a /v1 path."""
    if path in _ROUTES:
        return path
    for prefix in _ID_ROUTES:
        if path.startswith(prefix):
            return prefix + "{id}"
    return OTHER


class UpstreamCollector(Collector):
    """Reads the engine's current `Upstream` at scrape time, so the supervisor needs no metrics hooks (and a
    restart, which replaces the Upstream, is seen at the next scrape).

    In external mode there is no supervisor to know the phase: the /metrics
    endpoint probes the upstream's /health just before collecting and stores the
    answer in `external_up`.
    """

    def __init__(self, upstream: Callable[[], Upstream]) -> None:
        self._upstream = upstream
        self.external_up = False

    def collect(self) -> Iterator[Metric]:
        upstream = self._upstream()
        phase = upstream.phase
        up = self.external_up if phase is Phase.EXTERNAL else phase is Phase.READY
        yield GaugeMetricFamily(
            "bastion_upstream_up", "1 when the model server is ready to answer (external: its /health).", int(up)
        )
        yield CounterMetricFamily(
            "bastion_upstream_restarts",
            "Times the supervisor restarted a dead or hung model server.",
            upstream.restarts,
        )
        phases = GaugeMetricFamily(
            "bastion_upstream_phase", "The upstream's current phase (1 for it).", labels=["phase"]
        )
        for each in Phase:
            phases.add_metric([each.value], int(each is phase))
        yield phases


def _adder(metric: Counter | Gauge) -> Callable[[float], object]:
    """What `metric.inc(amount)` comes down to for a counter or gauge child that is observable (a child, or a
    metric without labels) and an amount that is not negative: its value's own `inc`, one call, not three
    frames re-checking what never changes (~4,000 instructions per update; seven per request). The public
    `inc` where a prometheus_client keeps its value elsewhere."""
    inc = getattr(getattr(metric, "_value", None), "inc", None)
    return inc if callable(inc) else metric.inc


class _Observer:
    """`Histogram.observe` for one child, on its own values: the sum, then the first bucket whose bound holds
    the amount (found by bisection, not by a loop over every bound); the same counts as `observe`."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, bounds: list[float], buckets: list[Callable[[float], object]], total: Callable[[float], object]):
        self._bounds = bounds
        self._buckets = buckets
        self._sum = total

    def __call__(self, amount: float) -> None:
        self._sum(amount)
        i = bisect_left(self._bounds, amount)
        if i < len(self._bounds) and amount <= self._bounds[i]:  # always, but for a NaN (no bucket, as observe)
            self._buckets[i](1)


def _observer(child: Histogram) -> Callable[[float], None]:
    """An `_Observer` on the child's values, or its public `observe` where a prometheus_client keeps them
    elsewhere."""
    try:
        bounds = [float(bound) for bound in child._upper_bounds]
        buckets = [bucket.inc for bucket in child._buckets]
        total = child._sum.inc
    except AttributeError:
        return child.observe
    if len(buckets) != len(bounds) or not all(callable(inc) for inc in (*buckets, total)):
        return child.observe
    return _Observer(bounds, buckets, total)


class _Children:
    """A one-label counter's children, cached by value."""

    __slots__ = ("_children", "_family")

    def __init__(self, family: Counter) -> None:
        self._family = family
        self._children: dict[str, Counter] = {}

    def __call__(self, value: str) -> Counter:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._family.labels(value)
        return child


class Metrics:
    """The registry and the per-request listener; `open`/`__call__` are the Gateway hooks."""

    def __init__(self, settings: Settings, upstream: Callable[[], Upstream]) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        Info("bastion_build", "bastion version.", registry=registry).info({"version": __version__})
        self.upstream = UpstreamCollector(upstream)
        registry.register(self.upstream)

        self.requests = Counter(
            "bastion_requests",
            "Finished /v1 requests (engine: the replica that answered, <model>/<index>; empty if none did).",
            ("model", "route", "status", "principal", "engine"),
            registry=registry,
        )
        self.duration = Histogram(
            "bastion_request_duration_seconds",
            "Time from request start to the last byte sent, every /v1 request.",
            ("model", "route"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "bastion_time_to_first_token_seconds",
            "Time from request start to the first upstream byte of a successful streaming response.",
            ("model", "route"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "bastion_tokens", "Tokens reported by the upstream.", ("model", "principal", "kind"), registry=registry
        )
        self.auth_failures = Counter(
            "bastion_auth_failures", "Requests refused with 401/403, by reason.", ("reason",), registry=registry
        )
        self.rate_limited = Counter(
            "bastion_rate_limited", "Requests refused with 429, by limit.", ("limit",), registry=registry
        )
        self.upstream_errors = Counter(
            "bastion_upstream_errors",
            "Requests the upstream failed: unreachable, timeout, broken mid-stream, not ready, or a 5xx it sent "
            "(engine: the replica, <model>/<index>; empty when none was chosen).",
            ("kind", "engine"),
            registry=registry,
        )
        self.usage_estimated = Counter(
            "bastion_usage_estimated",
            "2xx responses that carried no usage and were charged a conservative token estimate, by route.",
            ("route",),
            registry=registry,
        )
        self.upstream_scrape_errors = Counter(
            "bastion_upstream_scrape_errors",
            "Scrapes of /metrics/upstream that an engine replica did not answer (with several engines; engine: "
            "<model>/<index>). It is left out of that page and shown there as bastion_upstream_scrape_up 0.",
            ("engine",),
            registry=registry,
        )
        self.inflight = Gauge("bastion_inflight_requests", "/v1 requests in progress.", registry=registry)
        self._inflight = _adder(self.inflight)  # +1 as an exchange opens, -1 as it ends (Gauge.inc, Gauge.dec)

        self._principal_label = settings.metrics_principal_label
        self._models = set(settings.metrics_models)
        self._learned = 0
        # Label children, keyed by their label values: filled on first use, then plain dict hits.
        # The update of each child (`_adder`, `_observer`): what its inc/observe does, one call.
        self._request_children: dict[tuple[str, str, int, str, str], Callable[[float], object]] = {}
        self._duration_children: dict[tuple[str, str], Callable[[float], None]] = {}
        self._ttft_children: dict[tuple[str, str], Callable[[float], None]] = {}
        self._token_children: dict[tuple[str, str], tuple[Callable[[float], object], Callable[[float], object]]] = {}
        self._auth_failures = _Children(self.auth_failures)
        self._rate_limited = _Children(self.rate_limited)
        self._upstream_errors: dict[tuple[str, str], Counter] = {}
        self._usage_estimated = _Children(self.usage_estimated)

    def scrape_failed(self, engine: str) -> None:
        """A replica did not answer the relay of its /metrics (engine: a configured, bounded label)."""
        self.upstream_scrape_errors.labels(engine).inc()

    def open(self, exchange: Exchange) -> None:
        self._inflight(1)

    def __call__(self, exchange: Exchange) -> None:
        self._inflight(-1)
        status = exchange.status
        model = self._model_label(exchange.model, status)
        route = route_of(exchange.path)
        principal = exchange.principal_name if self._principal_label else ""

        engine = exchange.engine
        key = (model, route, status, principal, engine)
        count = self._request_children.get(key)
        if count is None:
            counter = self.requests.labels(model, route, str(status), principal, engine)
            count = self._request_children[key] = _adder(counter)
        count(1)

        latency = exchange.latency
        if latency is not None:
            duration = self._duration_children.get((model, route))
            if duration is None:
                duration = self._duration_children[(model, route)] = _observer(self.duration.labels(model, route))
            duration(latency)
        ttft = exchange.ttft
        if ttft is not None and exchange.stream and 200 <= status < 300:
            first = self._ttft_children.get((model, route))
            if first is None:
                first = self._ttft_children[(model, route)] = _observer(self.ttft.labels(model, route))
            first(ttft)

        usage = exchange.usage
        if usage is not None and not retrieval(exchange):  # a stored response fetched again: counted when made
            tokens = self._token_children.get((model, principal))
            if tokens is None:
                tokens = self._token_children[(model, principal)] = (
                    _adder(self.tokens.labels(model, principal, "prompt")),
                    _adder(self.tokens.labels(model, principal, "completion")),
                )
            # Never negative (usage.py reads counts as non-negative ints), as Counter.inc would insist.
            tokens[0](usage.prompt_tokens)
            tokens[1](usage.completion_tokens)
        elif exchange.usage_estimated:
            self._usage_estimated(route).inc()

        if status >= 400 or exchange.outcome is not Outcome.OK:
            self._count_failure(exchange, status)

    def _count_failure(self, exchange: Exchange, status: int) -> None:
        outcome, reason = exchange.outcome, exchange.reason
        if outcome is Outcome.REJECTED and status in (401, 403):
            self._auth_failures(reason or "unknown").inc()
        elif outcome is Outcome.REJECTED and status == 429:
            self._rate_limited(reason.removeprefix("rate_limit_") or "unknown").inc()
        elif reason in _UPSTREAM_REASONS:
            self._upstream_error(reason, exchange.engine).inc()
        elif outcome is Outcome.OK and status >= 500:
            self._upstream_error("upstream_5xx", exchange.engine).inc()

    def _upstream_error(self, kind: str, engine: str) -> Counter:
        child = self._upstream_errors.get((kind, engine))
        if child is None:
            child = self._upstream_errors[(kind, engine)] = self.upstream_errors.labels(kind, engine)
        return child

    def _model_label(self, model: str, status: int) -> str:
        if not model or model in self._models:
            return model
        # A model the upstream answered with a 2xx is one it serves: a real, bounded label value.
        if 200 <= status < 300 and self._learned < MAX_LEARNED_MODELS:
            self._models.add(model)
            self._learned += 1
            return model
        return OTHER
