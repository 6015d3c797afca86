"""The gateway queue's metrics, read from the gates at scrape time (labels: engine and class, both bounded)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .gate import WAIT_BUCKETS, Gate, Shed


class QueueCollector(Collector):
    def __init__(self, gates: Mapping[str, Gate]) -> None:
        self._gates = gates

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "bastion_queue_depth", "Requests waiting at the gateway for room at the engine.", labels=["engine", "class"]
        )
        outstanding = GaugeMetricFamily(
            "bastion_engine_outstanding", "Requests the gateway has forwarded to the engine and not finished.",
            labels=["engine"],
        )  # fmt: skip
        waiting = GaugeMetricFamily(
            "bastion_engine_waiting", "The engine's own waiting queue, as last scraped.", labels=["engine"]
        )
        admitted = CounterMetricFamily(
            "bastion_queue_admitted",
            "Requests let through to the engine: at once (path=direct) or after waiting (path=queued).",
            labels=["engine", "class", "path"],
        )
        shed = CounterMetricFamily(
            "bastion_queue_shed",
            "Requests refused with 429 by the gateway queue: deadline, full, or evicted by a higher class.",
            labels=["engine", "class", "reason"],
        )
        wait = HistogramMetricFamily(
            "bastion_queue_wait_seconds", "Time queued requests waited at the gateway.", labels=["engine", "class"]
        )
        for name, gate in self._gates.items():
            outstanding.add_metric([name], gate.outstanding)
            waiting.add_metric([name], gate.engine_waiting)
            for cls, stats in gate.stats.items():
                depth.add_metric([name, cls], stats.depth)
                admitted.add_metric([name, cls, "direct"], stats.admitted_fast)
                admitted.add_metric([name, cls, "queued"], stats.admitted_queued)
                for reason in Shed:
                    shed.add_metric([name, cls, reason.value], stats.shed[reason])
                cumulative, buckets = 0, []
                for bound, count in zip(WAIT_BUCKETS, stats.wait_buckets, strict=True):
                    cumulative += count
                    buckets.append((repr(bound), cumulative))
                buckets.append(("+Inf", stats.wait_count))
                wait.add_metric([name, cls], buckets, stats.wait_sum)
        yield from (depth, outstanding, waiting, admitted, shed, wait)
