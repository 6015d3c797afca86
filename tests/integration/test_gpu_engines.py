"""The 2-GPU engines driver (bench/gpu_engines.py) in --simulate mode: two simulators as the replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import free_port

DRIVER = Path(__file__).parents[2] / "bench" / "gpu_engines.py"


def test_engines_driver_against_simulators(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    args = ["--simulate", "--out", str(tmp_path), "--port", str(free_port()), "--seconds", "2"]
    args += ["--restart-seconds", "1", "--kill-seconds", "3", "--load-procs", "2"]
    subprocess.run([sys.executable, str(DRIVER), *args], env=env, check=True, timeout=120, cwd="/tmp")
    results = json.loads((tmp_path / "results.json").read_text())
    two = results["through_bastion_2_replicas"]
    assert two["tokens_per_s"] > 0 and results["scaling_2_vs_1"] is not None
    assert two["load_procs"] == 2 and two["load_cpu_s"] > 0 and 0 < two["load_cpu_busiest_core"] < 2
    assert not results["skipped"] and set(results["steps_s"]) == {"start", "scaling", "rolling_restart",
                                                                  "engine_kill", "stop"}  # fmt: skip
    restart = results["rolling_restart"]
    assert restart["during"]["body"]["restarted"][0]["outcome"] == "restarted"
    assert restart["failed"] == 0 and restart["requests"] > 0
    assert results["engine_kill"]["failed_not_started"] == 0
