"""A smoke run of the benchmark harness (bench/run.py --quick): it runs and reports every metric.

A benchmark, not a timed test: nothing here asserts a speed. What it does assert is
functional: no request failed, every stream arrived whole, and no chunk arrived
coalesced with the previous one at 10 ms gaps (the gateway does not buffer).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.timeout(240)
def test_the_harness_runs_and_reports_every_metric(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=220, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for path in ("direct", "bastion"):
        for load in ("plain_c1", "plain_c64"):
            row = results[f"{load}_{path}"]
            assert row["requests"] > 0 and row["errors"] == 0, (load, path, row)
        for load in ("stream_c1", "stream_c16", "timing"):
            row = results[f"{load}_{path}"]
            assert row["errors"] == 0 and row["chunks_per_stream"] == 64, (load, path, row)
    assert results["timing_bastion"]["coalesced_chunks"] == 0
    assert results["plain_c64_bastion"]["cpu_us_per_request"] > 0
    assert results["stream_c16_bastion"]["cpu_us_per_chunk"] > 0
    assert 0 < results["rss_idle_mib"] <= results["rss_load_mib"]
    table = (tmp_path / "results.md").read_text()
    assert "| CPU per request (µs) |" in table and "| stream c=16 streams/s |" in table
