"""Cost of the metrics listener per request: Metrics.open + Metrics.__call__ on a filled Exchange.

    .venv/bin/python bench/metrics_cost.py [N]

A micro-benchmark (best of 5 timeit runs, µs per request). The audit log has its own
(bench/audit_cost.py); what each feature costs inside the running gateway is
bench/features.py.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from bastion.config import Settings
from bastion.exchange import Exchange
from bastion.metrics import Metrics
from bastion.upstream.state import Phase, Upstream
from bastion.usage import Usage


def filled() -> Exchange:
    e = Exchange(request_id="0123456789abcdef0123456789abcdef", method="POST", path="/v1/chat/completions")
    e.client_ip, e.principal, e.model, e.stream, e.status = "127.0.0.1", "team-a", "qwen2.5-7b-instruct", True, 200
    e.usage = Usage(57, 312)
    e.first_byte, e.finished = e.started + 0.08, e.started + 2.4
    return e


def main(n: int) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    metrics = Metrics(settings, Upstream("http://127.0.0.1:9", None, Phase.READY))
    exchange = filled()

    def both() -> None:
        metrics.open(exchange)
        metrics(exchange)

    both()
    best = min(timeit.repeat(both, number=n, repeat=5)) / n
    print(f"metrics (open + listener): {best * 1e6:.2f} µs per request")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
