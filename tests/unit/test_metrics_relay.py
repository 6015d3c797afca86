"""Merging engines' /metrics pages (bastion.metrics_relay): families, labels, pages that are not Prometheus text."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion.metrics_relay import MergedPages

PAGE = """# HELP vllm:num_requests_waiting Waiting requests.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
# HELP vllm:prompt_tokens_total Prompt tokens.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 10.0
# HELP vllm:e2e_request_latency_seconds Latency.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 1.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 2.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 1.5
"""


def _families(page: bytes) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(page.decode())
    }


def test_two_pages_merge_into_one_family_each_with_the_engine_label() -> None:
    merged = MergedPages()
    merged.add("m/0", PAGE)
    merged.add("m/1", PAGE.replace("3.0", "5.0"))
    merged.missing("m/2")
    page = merged.render()
    assert page.count(b"# TYPE vllm:num_requests_waiting gauge") == 1
    assert page.count(b"# TYPE vllm:prompt_tokens_total counter") == 1
    families = _families(page)
    waiting = {s[1]["engine"]: (s[1]["exported_engine"], s[2]) for s in families["vllm:num_requests_waiting"]}
    assert waiting == {"m/0": ("0", 3.0), "m/1": ("0", 5.0)}  # the engine's own `engine` label is kept, renamed
    counts = [s for s in families["vllm:e2e_request_latency_seconds"] if s[0].endswith("_count")]
    assert {s[1]["engine"] for s in counts} == {"m/0", "m/1"}
    assert {s[1]["engine"]: s[2] for s in families["bastion_upstream_scrape_up"]} == {"m/0": 1, "m/1": 1, "m/2": 0}


def test_a_page_that_is_not_prometheus_text_adds_nothing_and_a_type_clash_keeps_the_first() -> None:
    merged = MergedPages()
    merged.add("a/0", PAGE)
    with pytest.raises(ValueError):
        merged.add("b/0", "# TYPE 0bad gauge\n<html>")
    merged.add("c/0", "# TYPE vllm:num_requests_waiting counter\nvllm:num_requests_waiting_total 1\n")
    families = _families(merged.render())
    assert {s[1]["engine"] for s in families["vllm:num_requests_waiting"]} == {"a/0"}
    assert {s[1]["engine"] for f in families.values() for s in f} == {"a/0", "c/0"}  # c/0 only in scrape_up
