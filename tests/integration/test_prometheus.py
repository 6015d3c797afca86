"""The shipped deploy/ files against real Prometheus tools: a live scrape, promtool, the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.config import Settings
from bastion.engine.state import Upstream
from bastion.metrics import Metrics
from bastion.simulator.app import Simulator
from bastion.simulator.settings import SimulatorSettings
from tests.support import AUTH, gateway, prometheus, simulator

DEPLOY = Path(__file__).parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "bastion-dashboard.json"
TOKEN = "prometheus-scrape-token-81c4"
MODEL = "qwen2.5-7b-instruct"
# Real vLLM series the simulator does not fake (vLLM V1 names).
VLLM_NOT_SIMULATED = frozenset({"vllm:kv_cache_usage_perc"})
_METRIC_NAME = re.compile(r"\b(?:bastion_\w+|process_\w+|vllm:[\w:]+)")


def shipped_config(target: str, token_file: Path, *, interval: str = "1s") -> str:
    """deploy/prometheus/prometheus.yml pointed at a test gateway, its token file, and a short interval."""
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    for old, new in (
        ('"127.0.0.1:8000"', f'"{target}"'),
        ("/etc/prometheus/bastion-metrics-token", str(token_file)),
        ("scrape_interval: 15s", f"scrape_interval: {interval}"),
        ("evaluation_interval: 15s", f"evaluation_interval: {interval}"),
    ):
        assert old in config, f"the shipped config no longer contains {old!r}"
        config = config.replace(old, new)
    return config


def query(base: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def scalar(base: str, promql: str) -> float | None:
    result = query(base, promql)
    return float(result[0]["value"][1]) if result else None


def wait_for(base: str, expected: dict[str, float], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, float | None] = {}
    while time.monotonic() < deadline:
        seen = {promql: scalar(base, promql) for promql in expected}
        if seen == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never saw {expected}; last: {seen}")


@pytest.mark.serial  # a TTFT p50 within a range
def test_real_prometheus_scrapes_the_gateway_with_the_shipped_config(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with (
        simulator("--tokens", "12", "--ttft", "0.05") as (_, sim),
        gateway("--upstream-url", sim, env={"BASTION_METRICS_TOKEN": TOKEN}) as (_, gw),
    ):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        for _ in range(4):
            with httpx.stream("POST", gw + "/v1/chat/completions", json=body, headers=AUTH) as reply:
                assert reply.status_code == 200
                reply.read()
        assert httpx.post(gw + "/v1/chat/completions", content=b"{", headers=AUTH).status_code == 400

        target = gw.removeprefix("http://")
        # A third job without the token: a real scraper that must be refused.
        config = shipped_config(target, token_file) + (
            f'  - job_name: no-token\n    static_configs:\n      - targets: ["{target}"]\n'
        )
        files = {"alerts.yml": (PROMETHEUS_DIR / "alerts.yml").read_text()}
        with prometheus(config, files) as (_, prom):
            wait_for(
                prom,
                {
                    'up{job="bastion"}': 1.0,
                    'up{job="vllm"}': 1.0,
                    'up{job="no-token"}': 0.0,
                    'sum(bastion_requests_total{job="bastion",status="200",route="/v1/chat/completions"})': 4.0,
                    'sum(bastion_requests_total{job="bastion",status="400"})': 1.0,
                    'sum(bastion_time_to_first_token_seconds_count{job="bastion"})': 4.0,
                    'sum(bastion_time_to_first_token_seconds_bucket{job="bastion",le="0.025"})': 0.0,
                    'sum(bastion_time_to_first_token_seconds_bucket{job="bastion",le="0.25"})': 4.0,
                    'sum(bastion_tokens_total{job="bastion",kind="completion"})': 48.0,
                    'sum(vllm:generation_tokens_total{job="vllm"})': 48.0,
                    'bastion_upstream_up{job="bastion"}': 1.0,
                },
            )
            ttft = 'sum by (le) (bastion_time_to_first_token_seconds_bucket{job="bastion"})'
            p50 = scalar(prom, f"histogram_quantile(0.5, {ttft})")
            assert p50 is not None and 0.025 < p50 <= 0.1
            targets = httpx.get(prom + "/api/v1/targets").json()["data"]["activeTargets"]
            refused = [t for t in targets if t["labels"]["job"] == "no-token"]
            assert refused and "401" in refused[0]["lastError"]
            rules = httpx.get(prom + "/api/v1/rules").json()["data"]["groups"]
            loaded = {rule["name"] for group in rules for rule in group["rules"]}
            assert {"BastionUpstreamDown", "BastionHigh5xxRatio", "BastionAuthFailureSpike"} <= loaded


def _promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    done = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_shipped_config_and_rules(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    (tmp_path / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(shipped_config("127.0.0.1:8000", token_file, interval="15s"))
    _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    _promtool("check", "rules", "alerts.yml")
    _promtool("test", "rules", "alerts_test.yml")


def _known_metric_names() -> set[str]:
    """Every series name bastion and the (simulated) vLLM expose, suffixes included."""
    registries = [
        Metrics(Settings(_env_file=None), lambda: Upstream("http://127.0.0.1:9", None)).registry,  # type: ignore[call-arg]
        Simulator(SimulatorSettings()).metrics.registry,
    ]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
    names = set(VLLM_NOT_SIMULATED)
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def _exprs(panels: list[dict[str, Any]]) -> list[str]:
    found = []
    for panel in panels:
        found.extend(target["expr"] for target in panel.get("targets", []))
        found.extend(_exprs(panel.get("panels", [])))
    return found


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_deploy_files_only_reference_existing_metrics(source: str) -> None:
    if source == "dashboard":
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = _exprs(dashboard["panels"])
        assert len(exprs) >= 15
        text = "\n".join(exprs)
    else:
        text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    used = set(_METRIC_NAME.findall(text))
    assert used, "no metric referenced"
    assert used <= _known_metric_names(), f"unknown metrics: {sorted(used - _known_metric_names())}"


def test_dashboard_covers_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard)
    for name in (
        "bastion_requests_total",
        "bastion_request_duration_seconds_bucket",
        "bastion_time_to_first_token_seconds_bucket",
        "bastion_tokens_total",
        "bastion_rate_limited_total",
        "bastion_auth_failures_total",
        "bastion_upstream_up",
        "bastion_upstream_errors_total",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert name in text, name
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
