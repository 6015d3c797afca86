"""Metrics and audit through real processes: the simulator, the gateway, real HTTP clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import AUDIT_FIELDS, AUTH, TEST_KEY, Proc, free_port, gateway, simulator

UPSTREAM_KEY = "internal-upstream-key-7f3a9c"
SCRAPE_TOKEN = "scrape-token-5be21d8e"
CLIENT_TOKEN = TEST_KEY  # the key tests.support.gateway() admits
PROMPT = "zebra quokka marmalade"
MODEL = "qwen2.5-7b-instruct"


@pytest.fixture
def stack() -> Iterator[tuple[Proc, str, str]]:
    """A fresh keyed simulator and a gateway with a metrics token: (gateway process, gateway URL, simulator URL)."""
    with (
        simulator("--tokens", "12", "--ttft", "0.05", env={"VLLM_API_KEY": UPSTREAM_KEY}) as (_, sim),
        gateway(
            "--upstream-url",
            sim,
            env={
                "BASTION_UPSTREAM_API_KEY": UPSTREAM_KEY,
                "BASTION_METRICS_TOKEN": SCRAPE_TOKEN,
                "BASTION_MAX_BODY_BYTES": "2048",
            },
        ) as (proc, gw),
    ):
        yield proc, gw, sim


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, path: str = "/metrics", token: str = SCRAPE_TOKEN) -> Samples:
    response = httpx.get(url + path, headers={"authorization": f"Bearer {token}"} if token else {})
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (n, lbls), value in samples.items() if n == name and wanted <= lbls)


def test_metrics_refuse_unauthenticated_scrapes(stack: tuple[Proc, str, str]) -> None:
    _, gw, _ = stack
    for path in ("/metrics", "/metrics/upstream"):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": SCRAPE_TOKEN}):
            refused = httpx.get(gw + path, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert refused.headers["www-authenticate"] == "Bearer"
            assert SCRAPE_TOKEN not in refused.text
    assert httpx.post(gw + "/metrics", headers={"authorization": f"Bearer {SCRAPE_TOKEN}"}).status_code == 405
    ours = scrape(gw)
    assert total(ours, "bastion_upstream_up") == 1
    assert total(ours, "process_resident_memory_bytes") > 0
    relayed = scrape(gw, "/metrics/upstream")
    assert ("vllm:num_requests_running", frozenset({("model_name", MODEL)})) in relayed
    openmetrics = httpx.get(
        gw + "/metrics",
        headers={"authorization": f"Bearer {SCRAPE_TOKEN}", "accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_counters_tokens_and_audit_match_the_requests(stack: tuple[Proc, str, str]) -> None:
    proc, gw, sim = stack
    client = openai.OpenAI(
        base_url=gw + "/v1", api_key=CLIENT_TOKEN, max_retries=0, default_headers={"x-request-id": "obs-0"}
    )
    messages = [{"role": "user", "content": PROMPT}]
    for _ in range(3):
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))  # type: ignore[arg-type]
        assert chunks
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    headers = {"authorization": f"Bearer {CLIENT_TOKEN}", "content-type": "application/json"}
    assert httpx.post(gw + "/v1/chat/completions", content=b"{nope", headers=headers).status_code == 400
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 4096}]})
    assert httpx.post(gw + "/v1/chat/completions", content=big, headers=headers).status_code == 413

    ours = scrape(gw)
    chat = {"route": "/v1/chat/completions"}
    assert total(ours, "bastion_requests_total", status="200", model=MODEL, **chat) == 5
    assert total(ours, "bastion_requests_total", status="200", route="/v1/completions") == 1
    assert total(ours, "bastion_requests_total", status="400", model="", **chat) == 1
    assert total(ours, "bastion_requests_total", status="413", model="", **chat) == 1
    assert total(ours, "bastion_request_duration_seconds_count", **chat) == 7
    # Only the three streams have a TTFT; the simulator waits 50 ms before the first chunk.
    assert total(ours, "bastion_time_to_first_token_seconds_count") == 3
    assert total(ours, "bastion_time_to_first_token_seconds_bucket", le="0.025") == 0
    assert total(ours, "bastion_inflight_requests") == 0
    assert total(ours, "bastion_upstream_errors_total") == 0
    assert total(ours, "bastion_auth_failures_total") == 0

    upstream = scrape(sim, token=UPSTREAM_KEY)  # the simulator's /metrics is open; the header is ignored
    prompt = total(upstream, "vllm:prompt_tokens_total")
    generated = total(upstream, "vllm:generation_tokens_total")
    assert generated == 5 * 12 + 3
    assert total(ours, "bastion_tokens_total", kind="prompt", model=MODEL) == prompt
    assert total(ours, "bastion_tokens_total", kind="completion", model=MODEL) == generated

    output = proc.output()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{"time"')]
    assert len(lines) == 8
    assert all(set(line) == AUDIT_FIELDS for line in lines)
    streamed = [line for line in lines if line["stream"]]
    assert len(streamed) == 3
    first = streamed[0]
    assert first["request_id"] == "obs-0" and first["client_ip"] == "127.0.0.1"
    assert first["status"] == 200 and first["outcome"] == "ok" and first["model"] == MODEL
    assert first["completion_tokens"] == 12 and first["ttft_ms"] >= 50 and first["latency_ms"] >= first["ttft_ms"]
    statuses = sorted(line["status"] for line in lines)
    assert statuses == [200] * 6 + [400, 413]
    assert {line["reason"] for line in lines if line["status"] >= 400} == {"invalid_json", "request_too_large"}
    for secret in (UPSTREAM_KEY, SCRAPE_TOKEN, CLIENT_TOKEN, PROMPT, "authorization"):
        assert secret.lower() not in output.lower(), f"{secret!r} leaked into the gateway's output"


def test_upstream_errors_are_counted() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway("--upstream-url", dead, ready=False) as (proc, gw):
        reply = httpx.post(gw + "/v1/chat/completions", json={"model": MODEL, "messages": []}, headers=AUTH)
        assert reply.status_code == 502
        # No token configured: loopback may scrape.
        ours = scrape(gw, token="")
        assert total(ours, "bastion_requests_total", status="502", model="other") == 1
        assert total(ours, "bastion_upstream_errors_total", kind="upstream_unavailable") == 1
        assert total(ours, "bastion_upstream_up") == 0
        [line] = [json.loads(line) for line in proc.output().splitlines() if line.startswith('{"time"')]
        assert (line["status"], line["outcome"], line["reason"]) == (502, "upstream_error", "upstream_unavailable")
        assert httpx.get(gw + "/metrics/upstream").status_code == 502


def test_audit_to_a_file_and_metrics_off(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with (
        simulator() as (_, sim),
        gateway("--upstream-url", sim, env={"BASTION_AUDIT_LOG": str(audit), "BASTION_METRICS_ENABLED": "false"}) as (
            proc,
            gw,
        ),
    ):
        assert httpx.get(gw + "/v1/models", headers=AUTH).status_code == 200
        assert httpx.get(gw + "/metrics").status_code == 401  # not mounted: the deny-by-default guard answers
        assert httpx.get(gw + "/metrics", headers=AUTH).status_code == 404
        [line] = audit.read_text().splitlines()
        assert json.loads(line)["path"] == "/v1/models"
        assert '"request_id"' not in proc.output()


def test_inflight_gauge_follows_a_slow_stream() -> None:
    with simulator("--ttft", "1.5", "--tokens", "2") as (_, sim), gateway("--upstream-url", sim) as (_, gw):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", gw + "/v1/chat/completions", json=body, headers=AUTH, timeout=10) as reply:
            assert reply.status_code == 200  # headers arrive before the first token
            assert total(scrape(gw, token=""), "bastion_inflight_requests") == 1
            reply.read()
        assert total(scrape(gw, token=""), "bastion_inflight_requests") == 0


def test_loopback_is_no_proof_of_a_local_scraper_behind_a_proxy(sim: str) -> None:
    """A default install serves metrics to direct loopback peers only; a proxy's forwarded client is not one."""
    with gateway("--upstream-url", sim) as (_, gw):
        assert httpx.get(gw + "/metrics").status_code == 200, "a local scraper, talking to the gateway directly"
        for forwarded in (
            {"x-forwarded-for": "203.0.113.9"},
            {"forwarded": "for=203.0.113.9"},
            {"x-real-ip": "1.2.3.4"},
        ):
            for path in ("/metrics", "/metrics/upstream"):
                refused = httpx.get(gw + path, headers=forwarded)
                assert refused.status_code == 403 and "bastion_" not in refused.text, (path, forwarded)
    with gateway("--upstream-url", sim, env={"BASTION_TRUSTED_PROXIES": "127.0.0.1"}) as (proc, gw):
        refused = httpx.get(gw + "/metrics")
        assert refused.status_code == 403 and "BASTION_METRICS_TOKEN" in refused.json()["error"]["message"]
        assert "BASTION_TRUSTED_PROXIES is set and BASTION_METRICS_TOKEN is not" in proc.output()
    env = {"BASTION_TRUSTED_PROXIES": "127.0.0.1", "BASTION_METRICS_TOKEN": SCRAPE_TOKEN}
    with gateway("--upstream-url", sim, env=env) as (_, gw):
        assert httpx.get(gw + "/metrics", headers={"x-forwarded-for": "203.0.113.9"}).status_code == 401
        assert scrape(gw)  # with the token, from anywhere
