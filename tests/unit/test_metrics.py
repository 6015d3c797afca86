"""Metric label paths from hand-made Exchanges (401/403/429 cannot be produced end to end yet)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from bastion.auth.identity import Principal
from bastion.config import Settings
from bastion.context import Exchange, Outcome
from bastion.engine.state import Phase, Upstream
from bastion.metrics import MAX_LEARNED_MODELS, Metrics, route_of
from bastion.metrics_http import ScrapeGuard
from bastion.usage import Usage

MODEL = "qwen2.5-7b-instruct"


def _settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def _metrics(**overrides: Any) -> Metrics:
    return Metrics(_settings(**overrides), lambda: Upstream("http://127.0.0.1:9", None, Phase.READY))


def _exchange(status: int, **fields: Any) -> Exchange:
    values: dict[str, Any] = {
        "request_id": "r1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": MODEL,
        "status": status,
        "started": 10.0,
        "finished": 11.5,
    }
    values.update(fields)
    if isinstance(values.get("outcome"), str):
        values["outcome"] = Outcome(values["outcome"])
    return Exchange(**values)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    if name == "bastion_upstream_errors_total":
        labels.setdefault("engine", "")
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _requests(metrics: Metrics, status: str, model: str = MODEL, principal: str = "", engine: str = "") -> float:
    labels = {"model": model, "route": "/v1/chat/completions", "status": status, "principal": principal}
    labels["engine"] = engine
    return _value(metrics, "bastion_requests_total", **labels)


def test_success_counts_request_latency_ttft_and_tokens() -> None:
    metrics = _metrics()
    exchange = _exchange(
        200, stream=True, first_byte=10.25, usage=Usage(7, 12), principal=Principal("id-team-a", "team-a", "key")
    )
    metrics.open(exchange)
    assert _value(metrics, "bastion_inflight_requests") == 1
    metrics(exchange)
    metrics(exchange)
    assert _value(metrics, "bastion_inflight_requests") == -1  # two ends for one open: the gauge just counts
    assert _requests(metrics, "200", principal="team-a") == 2
    timing = {"model": MODEL, "route": "/v1/chat/completions"}
    assert _value(metrics, "bastion_request_duration_seconds_sum", **timing) == pytest.approx(3.0)
    assert _value(metrics, "bastion_time_to_first_token_seconds_bucket", le="0.25", **timing) == 2
    assert _value(metrics, "bastion_time_to_first_token_seconds_bucket", le="0.1", **timing) == 0
    tokens = {"model": MODEL, "principal": "team-a"}
    assert _value(metrics, "bastion_tokens_total", kind="prompt", **tokens) == 14
    assert _value(metrics, "bastion_tokens_total", kind="completion", **tokens) == 24


@pytest.mark.parametrize("latency", [0.0, 0.004, 0.005, 0.0051, 1.0, 2.4999, 600.0, 601.0, 1e9, float("nan")])
def test_histograms_count_as_prometheus_observe_does(latency: float) -> None:
    """The listener updates a child's values directly: every bucket, the count and the sum agree with the
    public `observe` on a second histogram, a value on a bucket's bound, past the last and a NaN included."""
    metrics = _metrics()
    metrics(_exchange(200, started=0.0, finished=latency))
    reference = _metrics()
    reference.duration.labels(MODEL, "/v1/chat/completions").observe(latency)
    reference.requests.labels(MODEL, "/v1/chat/completions", "200", "", "").inc()
    reference.inflight.dec()

    def samples(m: Metrics) -> list[tuple[str, dict[str, str], float]]:
        names = ("bastion_request_duration_seconds", "bastion_requests", "bastion_inflight_requests")
        found = [(s.name, s.labels, s.value) for f in m.registry.collect() if f.name in names for s in f.samples]
        return sorted(((n, labels, v) for n, labels, v in found if not n.endswith("_created")), key=repr)

    ours, theirs = samples(metrics), samples(reference)
    assert len(ours) == len(theirs) > 20
    for (name, labels, value), (name2, labels2, value2) in zip(ours, theirs, strict=True):
        assert (name, labels) == (name2, labels2)
        assert value == value2 or (value != value and value2 != value2), (name, labels)  # NaN sums


def test_responses_charged_an_estimate_are_counted_by_route() -> None:
    metrics = _metrics()
    metrics(_exchange(200, usage_estimated=True))
    metrics(_exchange(200, usage_estimated=True, path="/v1/made-up/route"))
    metrics(_exchange(200, usage=Usage(1, 2)))
    assert _value(metrics, "bastion_usage_estimated_total", route="/v1/chat/completions") == 1
    assert _value(metrics, "bastion_usage_estimated_total", route="other") == 1


def test_ttft_only_for_successful_streams() -> None:
    metrics = _metrics()
    metrics(_exchange(200, stream=False, first_byte=11.0))
    metrics(_exchange(500, stream=True, first_byte=11.0))
    assert _value(metrics, "bastion_time_to_first_token_seconds_count", model=MODEL, route="/v1/chat/completions") == 0


@pytest.mark.parametrize(
    ("status", "reason", "family", "label"),
    [
        (401, "invalid_api_key", "bastion_auth_failures_total", {"reason": "invalid_api_key"}),
        (403, "ip_denied", "bastion_auth_failures_total", {"reason": "ip_denied"}),
        (403, "model_not_allowed", "bastion_auth_failures_total", {"reason": "model_not_allowed"}),
        (429, "rate_limit_requests", "bastion_rate_limited_total", {"limit": "requests"}),
        (429, "rate_limit_tokens", "bastion_rate_limited_total", {"limit": "tokens"}),
        (429, "rate_limit_concurrency", "bastion_rate_limited_total", {"limit": "concurrency"}),
        (503, "model_loading", "bastion_upstream_errors_total", {"kind": "model_loading"}),
    ],
)
def test_rejections_by_reason(status: int, reason: str, family: str, label: dict[str, str]) -> None:
    metrics = _metrics()
    metrics(_exchange(status, outcome="rejected", reason=reason, model=""))
    assert _value(metrics, family, **label) == 1
    assert _requests(metrics, str(status), model="") == 1
    others = {"bastion_auth_failures_total", "bastion_rate_limited_total", "bastion_upstream_errors_total"} - {family}
    for other in others:
        assert not [s for m in metrics.registry.collect() for s in m.samples if s.name == other]


@pytest.mark.parametrize(
    ("status", "outcome", "reason", "kind"),
    [
        (502, "upstream_error", "upstream_unavailable", "upstream_unavailable"),
        (504, "upstream_error", "upstream_timeout", "upstream_timeout"),
        (200, "upstream_error", "midstream", "midstream"),
        (500, "ok", "", "upstream_5xx"),
    ],
)
def test_upstream_errors(status: int, outcome: str, reason: str, kind: str) -> None:
    metrics = _metrics()
    metrics(_exchange(status, outcome=outcome, reason=reason))
    assert _value(metrics, "bastion_upstream_errors_total", kind=kind) == 1
    assert _value(metrics, "bastion_auth_failures_total", reason=reason) == 0


def test_client_errors_are_not_upstream_errors() -> None:
    metrics = _metrics()
    metrics(_exchange(400, outcome="rejected", reason="invalid_json", model=""))
    metrics(_exchange(404, outcome="ok"))  # the upstream's own 404 (unknown model)
    families = {"bastion_upstream_errors", "bastion_auth_failures", "bastion_rate_limited"}
    assert not [s for m in metrics.registry.collect() if m.name in families for s in m.samples]


def test_model_label_is_bounded() -> None:
    metrics = _metrics(metrics_models=["configured"])
    metrics(_exchange(404, model="made-up"))  # the upstream refused it: never a label of its own
    assert _requests(metrics, "404", model="other") == 1
    metrics(_exchange(400, model="configured"))
    assert _requests(metrics, "400", model="configured") == 1
    for i in range(MAX_LEARNED_MODELS + 5):
        metrics(_exchange(200, model=f"served-{i}"))
    assert _requests(metrics, "200", model="served-0") == 1
    assert _requests(metrics, "200", model=f"served-{MAX_LEARNED_MODELS - 1}") == 1
    assert _requests(metrics, "200", model="other") == 5


def test_principal_label_can_be_turned_off() -> None:
    metrics = _metrics(metrics_principal_label=False)
    metrics(_exchange(200, principal=Principal("id-team-a", "team-a", "key"), usage=Usage(1, 2)))
    assert _requests(metrics, "200", principal="") == 1
    assert _value(metrics, "bastion_tokens_total", model=MODEL, principal="", kind="completion") == 2


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/models", "/v1/models"),
        ("/v1/models/qwen2.5-7b-instruct", "/v1/models/{id}"),
        ("/v1/responses/resp_123/cancel", "/v1/responses/{id}"),
        ("/v1/chat/completions/", "other"),
        ("/v1/anything-a-client-invents", "other"),
    ],
)
def test_route_of(path: str, route: str) -> None:
    assert route_of(path) == route


def test_upstream_collector_reads_state_at_scrape_time() -> None:
    upstream = Upstream("http://127.0.0.1:9", None, Phase.STARTING)
    metrics = Metrics(_settings(), lambda: upstream)
    assert metrics.registry.get_sample_value("bastion_upstream_up") == 0
    upstream.set(Phase.READY)
    upstream.restarts = 3
    assert metrics.registry.get_sample_value("bastion_upstream_up") == 1
    assert metrics.registry.get_sample_value("bastion_upstream_restarts_total") == 3
    assert metrics.registry.get_sample_value("bastion_upstream_phase", {"phase": "ready"}) == 1
    assert metrics.registry.get_sample_value("bastion_upstream_phase", {"phase": "starting"}) == 0
    assert metrics.registry.get_sample_value("process_cpu_seconds_total") is not None


def _scope(peer: str | None, token: str | None = None) -> dict[str, Any]:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return {"type": "http", "client": (peer, 5000) if peer else None, "headers": headers}


def test_scrape_guard_defaults_to_loopback_only() -> None:
    guard = ScrapeGuard(None, [])
    assert guard.refusal(_scope("127.0.0.1")) is None
    assert guard.refusal(_scope("::1")) is None
    assert guard.refusal(_scope("::ffff:127.0.0.1")) is None
    error = guard.refusal(_scope("10.1.2.3"))
    assert error is not None and error.status == 403
    assert guard.refusal(_scope(None)) is not None


def test_scrape_guard_token_alone_works_from_anywhere() -> None:
    guard = ScrapeGuard("scrape-secret-1234", [])
    assert guard.refusal(_scope("10.1.2.3", "scrape-secret-1234")) is None
    for scope in (_scope("127.0.0.1"), _scope("10.1.2.3", "wrong"), _scope("127.0.0.1", "scrape-secret-12345")):
        error = guard.refusal(scope)
        assert error is not None and error.status == 401
    lower = {**_scope("10.1.2.3"), "headers": [(b"authorization", b"bearer scrape-secret-1234")]}
    assert guard.refusal(lower) is None


def test_scrape_guard_allowlist_and_token_both_required() -> None:
    networks = [ipaddress.ip_network("10.0.0.0/8")]
    assert ScrapeGuard(None, networks).refusal(_scope("10.9.9.9")) is None
    assert ScrapeGuard(None, networks).refusal(_scope("127.0.0.1")) is not None  # an allowlist replaces loopback
    guard = ScrapeGuard("scrape-secret-1234", networks)
    assert guard.refusal(_scope("10.9.9.9", "scrape-secret-1234")) is None
    assert guard.refusal(_scope("10.9.9.9")) is not None
    assert guard.refusal(_scope("192.168.0.1", "scrape-secret-1234")) is not None


@pytest.mark.parametrize(
    "forwarded", [(b"x-forwarded-for", b"203.0.113.9"), (b"forwarded", b"for=203.0.113.9"), (b"x-real-ip", b"1.2.3.4")]
)
def test_a_scrape_through_a_proxy_needs_the_token(forwarded: tuple[bytes, bytes]) -> None:
    """nginx on the same host is a loopback peer for everyone on the internet."""
    proxied = {**_scope("127.0.0.1"), "headers": [forwarded]}
    error = ScrapeGuard(None, []).refusal(proxied)
    assert error is not None and error.status == 403
    allowed = ScrapeGuard(None, [ipaddress.ip_network("127.0.0.0/8")])
    assert allowed.refusal(proxied) is not None, "an explicit allowlist does not vouch for a proxy's clients"
    assert allowed.refusal(_scope("127.0.0.1")) is None
    with_token = _scope("127.0.0.1", "scrape-secret-1234")
    with_token["headers"].append(forwarded)
    assert ScrapeGuard("scrape-secret-1234", []).refusal(with_token) is None


def test_behind_trusted_proxies_there_is_no_tokenless_default() -> None:
    trusted = [ipaddress.ip_network("127.0.0.1/32")]
    closed = ScrapeGuard(None, [], trusted)
    assert closed.closed
    for scope in (_scope("127.0.0.1"), _scope("::1"), _scope("10.1.2.3")):
        error = closed.refusal(scope)
        assert error is not None and error.status == 403 and "BASTION_METRICS_TOKEN" in error.message
    direct = ScrapeGuard(None, [ipaddress.ip_network("10.0.0.0/8")], trusted)
    assert not direct.closed and direct.refusal(_scope("10.1.2.3")) is None, "an explicit direct scraper"
    assert direct.refusal(_scope("127.0.0.1")) is not None
    token = ScrapeGuard("scrape-secret-1234", [], trusted)
    assert token.refusal(_scope("127.0.0.1", "scrape-secret-1234")) is None
    assert token.refusal(_scope("127.0.0.1")) is not None


def test_mapped_allowlist_entries_match() -> None:
    guard = ScrapeGuard(None, [ipaddress.ip_network("::ffff:10.0.0.0/104")])
    assert guard.refusal(_scope("10.1.2.3")) is None and guard.refusal(_scope("::ffff:10.1.2.3")) is None
