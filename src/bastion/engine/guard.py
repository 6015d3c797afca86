"""Two small guards that keep the supervised child from outliving the gateway.

`exec`: set PR_SET_PDEATHSIG, then exec the real command. The kernel kills the
child the moment the gateway dies, even by SIGKILL. It survives exec, and it
needs no `preexec_fn` (unsafe in a process with threads).

`watch`: a watchdog in its own session. The gateway tells it, over a pipe, which
process group the child leads; when the pipe closes (the gateway is gone, however
it died) the watchdog kills that whole group, grandchildren included (vLLM's
engine processes), which PDEATHSIG alone would not reach.

Usage: python -I guard.py exec PARENT_PID -- CMD... | python -I guard.py watch GRACE
(standard library only, run by path, so the child's PYTHONPATH does not matter)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
CANNOT_EXEC = 127  # as a shell's "command not found": the supervisor names the setting to check


def exec_with_deathsig(command: list[str], parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the gateway died before prctl took effect
        sys.exit(1)
    try:
        os.execvp(command[0], command)  # noqa: S606 (replacing this process is the point)
    except OSError as exc:  # one line, relayed by the supervisor; not a traceback on every restart
        print(f"bastion: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        sys.exit(CANNOT_EXEC)


def watch(grace: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = 0
    for line in sys.stdin:
        with contextlib.suppress(ValueError):
            group = int(line)
    if group > 0:
        _kill_group(group, grace)


def _kill_group(group: int, grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def main(argv: list[str]) -> None:
    if len(argv) >= 4 and argv[0] == "exec" and argv[2] == "--":
        exec_with_deathsig(argv[3:], int(argv[1]))
    elif len(argv) == 2 and argv[0] == "watch":
        watch(float(argv[1]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
