"""The GPU fairness driver (bench/gpu_fairness.py), run here against the simulator so it works on the GPU day."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).parents[2] / "bench" / "gpu_fairness.py"


def test_driver_against_the_simulator(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    argv = [sys.executable, str(DRIVER), "--simulate", "--out", str(tmp_path), "--window", "4", "--warmup", "2"]
    subprocess.run(argv, env=env, check=True, timeout=150, cwd="/tmp")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["simulated"] is True and results["idle"]["ttft_p50_ms"] > 0
    assert len(results["rounds"]) == 2
    for entry in results["rounds"]:
        assert entry["flood_alone"]["batch_tokens_per_s"] > 0 and entry["classes_on"]["batch_tokens_per_s"] > 0
        assert entry["classes_on"]["interactive_requests"] > 0 and entry["batch_share"] > 0
    assert {"engine.log", "bastion-fair.log", "bastion-plain.log"} <= {p.name for p in tmp_path.iterdir()}
