"""The GPU fairness driver (bench/gpu_fairness.py), run here against the simulator so it works on the GPU day."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).parents[2] / "bench" / "gpu_fairness.py"


# Batch tokens are counted as requests finish within 2 s windows: on a busy machine none may finish (seen
# beside another test: a round with 0 batch tokens/s). Run alone.
@pytest.mark.serial
def test_driver_against_the_simulator(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    argv = [sys.executable, str(DRIVER), "--simulate", "--out", str(tmp_path), "--window", "2", "--warmup", "1"]
    argv += ["--rounds", "1", "--idle-window", "1", "--configs", "reserve=2;reserve=2,backlog=64,lead=0.1"]
    subprocess.run(argv, env=env, check=True, timeout=120, cwd="/tmp")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["simulated"] is True and results["idle"]["ttft_p50_ms"] > 0
    assert len(results["rounds"]) == 1
    for entry in results["rounds"]:
        assert entry["flood_alone"]["batch_tokens_per_s"] > 0
        assert set(entry["configs"]) == {"reserve=2", "reserve=2,backlog=64,lead=0.1"}
        for result in entry["configs"].values():
            assert result["batch_tokens_per_s"] > 0 and result["interactive_requests"] > 0 and result["batch_share"] > 0
            # The engine's own view of the window: its batch held requests, never more than --max-num-seqs.
            assert 0 < result["engine_running_mean"] <= 64
    assert set(results["summary"]) == {"reserve=2", "reserve=2,backlog=64,lead=0.1"}
    logs = {p.name for p in tmp_path.iterdir()}
    assert {"engine.log", "bastion-plain.log", "bastion-fair1.log", "bastion-fair2.log"} <= logs
