from __future__ import annotations

from bastion.engine.command import CommandSource, build_command
from bastion.engine.supervisor import backoff_delay
from bastion.engine.vllm import VllmArgs, vllm_command


def test_default_vllm_command() -> None:
    command = vllm_command("/opt/vllm/bin/python", "127.0.0.1", 9000, VllmArgs())
    assert command == [
        "/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "Qwen/Qwen2.5-7B-Instruct",
        "--host", "127.0.0.1", "--port", "9000",
        "--dtype", "auto",
        "--gpu-memory-utilization", "0.9",
        "--tensor-parallel-size", "1",
    ]  # fmt: skip


def test_every_vllm_setting_reaches_argv() -> None:
    args = VllmArgs(
        model="/models/qwen",
        served_model_name="qwen2.5-7b-instruct",
        dtype="bfloat16",
        max_model_len=4096,
        gpu_memory_utilization=0.85,
        tensor_parallel_size=2,
        extra_args="--load-format dummy --chat-template '/t/my template.jinja'",
    )
    command = vllm_command("python3", "127.0.0.1", 1234, args)
    assert command[command.index("--model") + 1] == "/models/qwen"
    assert command[command.index("--served-model-name") + 1] == "qwen2.5-7b-instruct"
    assert command[command.index("--dtype") + 1] == "bfloat16"
    assert command[command.index("--max-model-len") + 1] == "4096"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.85"
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert command[-4:] == ["--load-format", "dummy", "--chat-template", "/t/my template.jinja"]
    assert not any("key" in part.lower() for part in command), "the API key travels in the environment"


def test_custom_command_placeholders() -> None:
    source = CommandSource(template="{python} -m bastion simulate --host {host} --port {port}", python="sh")
    command = build_command(source, host="::1", port=5, port_fixed=False, path=None)
    assert command.argv == ("sh", "-m", "bastion", "simulate", "--host", "::1", "--port", "5")


def test_backoff_doubles_caps_and_jitters() -> None:
    assert [backoff_delay(n, 1.0, 10.0, 0.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert backoff_delay(1, 1.0, 10.0, 1.0) == 1.25
