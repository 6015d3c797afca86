"""The GPU end-to-end driver (bench/gpu_e2e.py): on real vLLM where a GPU is, on the simulator here."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import free_port

DRIVER = Path(__file__).parents[2] / "bench" / "gpu_e2e.py"


def _run(out: Path, *args: str, timeout: float) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    subprocess.run([sys.executable, str(DRIVER), "--out", str(out), *args], env=env, check=True, timeout=timeout)
    return json.loads((out / "results.json").read_text())  # type: ignore[no-any-return]


def test_driver_against_the_simulator(tmp_path: Path) -> None:
    """Keeps the GPU script working between GPU sessions: every step, the simulator as vLLM."""
    results = _run(tmp_path, "--simulate", "--skip", "overhead", "--port", str(free_port()), timeout=120)
    functional = results["functional"]
    assert isinstance(functional, dict)
    assert functional["curl_stream_done"] and functional["wrong_key"] == "401"
    assert functional["key_in_any_argv"] == [] and functional["key_in_log"] is False
    assert results["disconnect"]["running_after"] == 0  # type: ignore[index]
    assert results["engine_kill"]["restarts"] == 1  # type: ignore[index]
    assert results["sigterm"]["stream_completed"] is True  # type: ignore[index]


def test_driver_measures_windows_of_each_length_against_the_simulator(tmp_path: Path) -> None:
    """The overhead step as the GPU runs use it: measured windows, two request lengths, the engine's counters,
    the load in two processes sharing each window."""
    skip = "functional,disconnect,kill,drain"
    args = ["--simulate", "--skip", skip, "--port", str(free_port()), "--concurrency", "4", "--rounds", "1"]
    window = ["--seconds", "1", "--warmup", "0.5", "--max-tokens", "8,4-12", "--load-procs", "2"]
    results = _run(tmp_path, *args, *window, timeout=120)
    rounds = results["overhead"]
    assert isinstance(rounds, dict)
    assert sorted(rounds) == ["bastion_c4_t4-12", "bastion_c4_t8", "direct_c4_t4-12", "direct_c4_t8"]
    for name, row in rounds.items():
        assert row["errors"] == 0 and row["engine_tokens_per_s"] > 0, name
        # 4 streams of one token per 5 ms (the simulator's --itl): the window holds no warm-up token
        assert 0 < row["tokens_per_s"] <= 4 / 0.005 * 1.1, name
        assert row["procs"] == 2, name
    assert rounds["bastion_c4_t8"]["cpu_us_per_chunk"] > 0
    assert 0.5 < results["tokens_per_s_ratio_c4_t8"] < 2  # type: ignore[operator]


def test_paired_rounds_run_both_paths_at_once_against_the_simulator(tmp_path: Path) -> None:
    """`--paired`: direct and bastion in one window, half the streams each, so the engine's own swings reach
    both alike; each half is reported on its own, the gateway's CPU with the bastion half. `--control` adds a
    round whose halves both go direct: the ratio's spread with no gateway in it."""
    skip = "functional,disconnect,kill,drain"
    args = ["--simulate", "--skip", skip, "--port", str(free_port()), "--concurrency", "8", "--rounds", "1"]
    window = ["--seconds", "1.5", "--warmup", "0.5", "--max-tokens", "8", "--load-procs", "4", "--paired", "--control"]
    results = _run(tmp_path, *args, *window, timeout=120)
    rounds = results["overhead"]
    assert isinstance(rounds, dict)
    assert sorted(rounds) == ["bastion_c8", "control_c8", "direct_a_c8", "direct_c8"]
    for name in ("direct_a_c8", "control_c8"):  # both halves of the control round went to the engine itself
        assert rounds[name]["url"] == rounds["direct_c8"]["url"] and "cpu_us_per_chunk" not in rounds[name]
    assert 0.5 < results["tokens_per_s_control_ratio_c8_rounds"][0] < 2  # type: ignore[index]
    direct, bastion = rounds["direct_c8"], rounds["bastion_c8"]
    for row in (direct, bastion):
        assert row["concurrency"] == 4 and row["procs"] == 2 and row["errors"] == 0
        assert row["requests"] > 0 and row["engine_tokens_per_s"] > 0
    # one window: the engine's counters over it are the same for both halves (read apart by a busy box's lag)
    assert abs(direct["engine_tokens_per_s"] - bastion["engine_tokens_per_s"]) <= 0.3 * direct["engine_tokens_per_s"]
    assert "cpu_us_per_chunk" in bastion and "cpu_us_per_chunk" not in direct
    assert 0.5 < results["tokens_per_s_ratio_c8"] < 2  # type: ignore[operator]


gpu_present = shutil.which("nvidia-smi") is not None and bool(
    os.environ.get("VLLM_PYTHONPATH") or importlib.util.find_spec("vllm")
)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_present, reason="needs an NVIDIA GPU and vLLM (see bench/gpu_e2e.sh)")
def test_real_vllm_end_to_end(tmp_path: Path) -> None:
    results = _run(tmp_path, timeout=1500)
    assert results["tokens_per_s_ratio_c64"] >= 0.98  # type: ignore[operator]
    assert results["sigterm"]["gpu_memory_used_mib"] in ("0", "")  # type: ignore[index]
