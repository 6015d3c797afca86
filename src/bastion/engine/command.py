"""The supervised child's command line, checked before anything is spawned.

A command that cannot work is refused at start-up with one line naming the
setting and the fix, instead of failing later in a way nobody connects to it: a
`KeyError` traceback for an unknown placeholder, a 13-line exec traceback on every
restart for a missing binary, or 30 minutes of "loading" while a child without
`{port}` serves on a port bastion never probes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import string
import sys
from dataclasses import dataclass, field

from .vllm import VllmArgs, vllm_command

PLACEHOLDERS = ("host", "port", "python")
COMMAND_SETTING = "BASTION_UPSTREAM_COMMAND"
PYTHON_SETTING = "BASTION_VLLM_PYTHON"


class CommandError(ValueError):
    """A child command that cannot work: one line that names the setting and the fix."""

    @property
    def setting(self) -> str:
        """The BASTION_* variable to fix: the one the message starts with."""
        return str(self).split(maxsplit=1)[0].rstrip(":")

    @property
    def reason(self) -> str:
        """The message without its leading setting name."""
        return str(self).removeprefix(self.setting).removeprefix(":").strip()


@dataclass(frozen=True, slots=True)
class CommandSource:
    """Where the command comes from: a template (BASTION_UPSTREAM_COMMAND) or vLLM's flags."""

    template: str | None = None
    python: str = ""  # BASTION_VLLM_PYTHON; "" = the interpreter running bastion
    vllm: VllmArgs = field(default_factory=VllmArgs)


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    setting: str  # the setting to name when it cannot be run


def build_command(source: CommandSource, *, host: str, port: int, port_fixed: bool, path: str | None) -> Command:
    """The child's argv with `{host}`, `{port}`, `{python}` filled in, checked; raises `CommandError`.

    `port_fixed`: the port is configured (BASTION_UPSTREAM_PORT), so a template may
    spell it out instead of writing `{port}`. `path`: the PATH the child will get.
    """
    python = source.python or sys.executable
    if source.template is None:
        try:
            argv = vllm_command(python, host, port, source.vllm)
        except ValueError as exc:
            raise CommandError(
                f"BASTION_VLLM_EXTRA_ARGS cannot be split into arguments ({exc}): check its quotes"
            ) from None
        setting = PYTHON_SETTING
    else:
        argv = _fill(source.template, host=host, port=port, python=python, port_fixed=port_fixed)
        setting = PYTHON_SETTING if source.python and argv[0] == source.python else COMMAND_SETTING
    _check_runnable(argv[0], path, setting)
    return Command(tuple(argv), setting)


def check_template(template: str) -> None:
    """The template's own mistakes (unknown placeholders, braces, quotes), before a host or port is known.

    Called when the settings load; `{port}` and the program are checked by `build_command`.
    """
    _fill(template, host="127.0.0.1", port=1, python=sys.executable, port_fixed=True)


def _fill(template: str, *, host: str, port: int, python: str, port_fixed: bool) -> list[str]:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise CommandError(
            f"{COMMAND_SETTING} is not a valid template ({exc}); write {{{{ or }}}} for a brace"
        ) from None
    unknown = sorted(fields - set(PLACEHOLDERS))
    if unknown:
        raise CommandError(
            f"{COMMAND_SETTING} uses {{{unknown[0]}}}, which bastion does not fill in: "
            "the placeholders are {host}, {port} and {python} (write {{ or }} for a brace)"
        )
    if "port" not in fields and not port_fixed:
        raise CommandError(
            f"{COMMAND_SETTING} has no {{port}}: the child would listen where bastion never looks; "
            "pass it the port bastion picked (e.g. --port {port}), or set BASTION_UPSTREAM_PORT to the port it uses"
        )
    try:
        argv = shlex.split(template.format(host=host, port=port, python=python))
    except ValueError as exc:
        raise CommandError(f"{COMMAND_SETTING} cannot be split into arguments ({exc}): check its quotes") from None
    if not argv:
        raise CommandError(f"{COMMAND_SETTING} is empty: give the command that starts the model server")
    return argv


def _check_runnable(program: str, path: str | None, setting: str) -> None:
    if os.sep in program:
        if os.path.isfile(program) and os.access(program, os.X_OK):
            return
        problem = "does not exist" if not os.path.exists(program) else "is not an executable file"
        where = f"{program} {problem}"
    elif shutil.which(program, path=path) is not None:
        return
    else:
        where = f"{program!r} is not an executable on PATH"
    if setting == PYTHON_SETTING:
        fix = "point it at the python of the environment vLLM is installed in (e.g. /opt/vllm/bin/python)"
    else:
        fix = "install it or give its full path"
    raise CommandError(f"{setting}: {where}; {fix}")
