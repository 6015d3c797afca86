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

from audit_cost import finished  # the same finished streaming exchange

from bastion.config import Settings
from bastion.engine.state import Phase, Upstream
from bastion.metrics import Metrics


def main(n: int) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    metrics = Metrics(settings, lambda: Upstream("http://127.0.0.1:9", None, Phase.READY))
    exchange = finished()

    def both() -> None:
        metrics.open(exchange)
        metrics(exchange)

    both()
    best = min(timeit.repeat(both, number=n, repeat=5)) / n
    print(f"metrics (open + listener): {best * 1e6:.2f} µs per request")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
