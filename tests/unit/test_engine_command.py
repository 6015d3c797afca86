"""The child's command is checked before anything is spawned: one line naming the setting and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.engine import guard
from bastion.engine.command import CommandError, CommandSource, build_command
from bastion.engine.vllm import VllmArgs

SIM = "{python} -m bastion simulate --host {host} --port {port}"


def build(
    template: str | None, python: str = "", *, port_fixed: bool = False, path: str | None = None
) -> tuple[str, ...]:
    source = CommandSource(template=template, python=python)
    return build_command(source, host="127.0.0.1", port=8123, port_fixed=port_fixed, path=path).argv


def refusal(template: str | None, python: str = "", *, port_fixed: bool = False, path: str | None = None) -> str:
    with pytest.raises(CommandError) as info:
        build(template, python, port_fixed=port_fixed, path=path)
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


def test_placeholders_are_filled() -> None:
    assert build(SIM) == (sys.executable, "-m", "bastion", "simulate", "--host", "127.0.0.1", "--port", "8123")
    assert build("sh -c 'echo {{not a placeholder}} {port}'") == ("sh", "-c", "echo {not a placeholder} 8123")


def test_an_unknown_placeholder_is_one_line_not_a_key_error() -> None:
    message = refusal("{python} -m bastion simulate --port {prot}")
    assert message.startswith("BASTION_UPSTREAM_COMMAND uses {prot}, which bastion does not fill in")
    assert "{host}, {port} and {python}" in message
    assert refusal("{} --port {port}").startswith("BASTION_UPSTREAM_COMMAND uses {}")
    assert "not a valid template" in refusal("sh --port {port")


def test_a_command_without_port_is_refused_unless_the_port_is_fixed() -> None:
    message = refusal("{python} -m bastion simulate --port 9000")
    assert message.startswith("BASTION_UPSTREAM_COMMAND has no {port}")
    assert "--port {port}" in message and "BASTION_UPSTREAM_PORT" in message
    assert build("{python} -m bastion simulate --port 9000", port_fixed=True)[-1] == "9000"


def test_quotes_and_empty_commands() -> None:
    assert "check its quotes" in refusal("sh -c 'unclosed {port}")
    assert "is empty" in refusal("  ", port_fixed=True)
    with pytest.raises(CommandError, match=r"^BASTION_VLLM_EXTRA_ARGS cannot be split"):
        build_command(
            CommandSource(vllm=VllmArgs(extra_args="--chat-template 'x")),
            host="h",
            port=1,
            port_fixed=False,
            path=None,
        )


def test_a_missing_binary_is_named(tmp_path: Path) -> None:
    message = refusal("no-such-model-server --port {port}", path=str(tmp_path))
    assert message == (
        "BASTION_UPSTREAM_COMMAND: 'no-such-model-server' is not an executable on PATH; "
        "install it or give its full path"
    )
    missing = tmp_path / "bin" / "server"
    assert refusal(f"{missing} --port {{port}}") == (
        f"BASTION_UPSTREAM_COMMAND: {missing} does not exist; install it or give its full path"
    )
    not_executable = tmp_path / "server.py"
    not_executable.write_text("print()")
    assert "is not an executable file" in refusal(f"{not_executable} --port {{port}}")
    # Found on the PATH the child will get (BASTION_UPSTREAM_ENV may change it), not bastion's.
    script = tmp_path / "model-server"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert build("model-server --port {port}", path=str(tmp_path))[0] == "model-server"


def test_a_wrong_vllm_python_is_named(tmp_path: Path) -> None:
    python = str(tmp_path / "venv" / "bin" / "python")
    message = refusal(None, python)
    assert message.startswith(f"BASTION_VLLM_PYTHON: {python} does not exist; point it at the python")
    assert refusal(SIM, python).startswith("BASTION_VLLM_PYTHON:"), "{python} in a command names its setting"


def test_the_guard_says_in_one_line_that_a_command_cannot_run(tmp_path: Path) -> None:
    """A binary gone between restarts: one line and exit 127, not a traceback on every restart."""
    missing = str(tmp_path / "vllm")
    result = subprocess.run(
        [sys.executable, "-I", guard.__file__, "exec", str(os.getpid()), "--", missing],  # we are its parent
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == guard.CANNOT_EXEC
    assert result.stderr == f"bastion: cannot run {missing}: No such file or directory\n"
