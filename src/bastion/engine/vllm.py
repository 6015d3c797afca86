"""The command line of the supervised child: vLLM's OpenAI server, or any command.

Flags target vLLM 0.26's `vllm.entrypoints.openai.api_server` (the module behind
`vllm serve`). The API key is never part of the command: vLLM reads
`VLLM_API_KEY` from its environment, which the supervisor sets.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys

from ..config import Settings


def child_command(settings: Settings, host: str, port: int) -> list[str]:
    python = settings.vllm_python or sys.executable
    if settings.upstream_command:
        filled = settings.upstream_command.format(host=host, port=port, python=python)
        return shlex.split(filled)
    return vllm_command(settings, python, host, port)


def vllm_command(settings: Settings, python: str, host: str, port: int) -> list[str]:
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model,
        "--host", host,
        "--port", str(port),
        "--dtype", settings.dtype,
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
    ]  # fmt: skip
    if settings.served_model_name:
        command += ["--served-model-name", settings.served_model_name]
    if settings.max_model_len:
        command += ["--max-model-len", str(settings.max_model_len)]
    return command + shlex.split(settings.vllm_extra_args)


def vllm_unavailable(settings: Settings) -> str | None:
    """Why the default vLLM child cannot start here, or None if it can be tried.

    Only checked when bastion runs vLLM with its own interpreter; a separate
    `vllm_python` is trusted as configured.
    """
    if settings.upstream_url or settings.upstream_command or settings.vllm_python:
        return None
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
