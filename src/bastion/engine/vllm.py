"""vLLM's OpenAI server as a command line, and whether it can run here.

Flags target vLLM 0.26's `vllm.entrypoints.openai.api_server` (the module behind
`vllm serve`). The API key is never part of the command: vLLM reads
`VLLM_API_KEY` from its environment, which the supervisor sets.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VllmArgs:
    """The vLLM flags bastion sets (each one a BASTION_* setting)."""

    model: str = "Qwen/Qwen2.5-7B-Instruct"
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    extra_args: str = ""  # shell-quoted; split here (a bad quote: ValueError)
    # "priority" when priority classes are on (BASTION_FAIRNESS): vLLM refuses a nonzero `priority` otherwise.
    scheduling_policy: str | None = None


def vllm_command(python: str, host: str, port: int, args: VllmArgs) -> list[str]:
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", args.model,
        "--host", host,
        "--port", str(port),
        "--dtype", args.dtype,
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--tensor-parallel-size", str(args.tensor_parallel_size),
    ]  # fmt: skip
    if args.served_model_name:
        command += ["--served-model-name", args.served_model_name]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    extra = shlex.split(args.extra_args)
    if args.scheduling_policy and not any(a.split("=")[0] == "--scheduling-policy" for a in extra):
        command += ["--scheduling-policy", args.scheduling_policy]
    return command + extra


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run with bastion's own interpreter here, or None if it can be tried.

    Only asked when bastion runs vLLM itself with its own interpreter; a separate
    BASTION_VLLM_PYTHON is trusted as configured (its file is checked before spawning).
    """
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this environment (pip install 'bastion[vllm]')"
    if not (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0")):
        return "no NVIDIA GPU is visible (no nvidia-smi, no /dev/nvidia0)"
    return None


NO_VLLM_HINT = """\
bastion: cannot start the model server: {reason}.
  - on a GPU host: pip install 'bastion[vllm]' and run bastion serve again;
  - for a demo without a GPU, supervise the built-in simulator instead:
      bastion serve --upstream-command '{{python}} -m bastion simulate --host {{host}} --port {{port}}'
  - or point bastion at a server you run yourself:
      bastion serve --upstream-url http://127.0.0.1:8001"""
