"""Runs one engine (a model server) as a child process and keeps it alive.

Shaped like uvicorn's supervisors: everything that happens (the child exited,
became healthy, stopped answering, a restart is due, shutdown) is an `Event` put
on one queue; one loop takes events in order and calls one method per kind.
Watchers and signal paths only enqueue, so no two decisions ever race. Every log
line names the child's pid.

Supervision never shares fate with traffic: health probes go over the engine's own
`ProbeChannel`, never the pool client requests use. And supervision is itself
watched: if the loop or a watcher dies, one line says so and the engine turns
not-ready (the loop) or is restarted (a watcher), never a silent stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import cast

from ..logs import redact_value
from .probe import ProbeChannel, Verdict
from .spec import EngineSpec
from .state import Phase, Upstream

log = logging.getLogger("bastion.upstream")
_PROGRESS_EVERY = 10.0  # seconds between "still loading" lines
# The guard runs by file path in isolated mode (-I): it needs only the standard library, so it works
# whatever PYTHONPATH the child is given (e.g. one where vLLM, not bastion, is importable).
_GUARD = (sys.executable, "-I", str(Path(__file__).with_name("guard.py")))
_STARTUP_POLL = 0.25
_KILL_WAIT = 5.0  # after SIGKILL, the longest wait for the kernel to report the exit
_CANNOT_EXEC = 127  # the guard's exit code when the command could not be run (as a shell's)
_LINE_LIMIT = 1 << 20  # the longest line of the child's output relayed


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # exited | healthy | unhealthy | start_timeout | restart_due | stop
    pid: int = 0
    detail: str = ""
    code: int | None = None  # exited: the exit status (negative: the signal)


def backoff_delay(crashes: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff: base, 2*base, 4*base ... capped, stretched by up to 25 % jitter (0 <= jitter < 1)."""
    return min(cap, base * 2.0 ** max(0, crashes - 1)) * (1 + 0.25 * jitter)


class Supervisor:
    """An async context manager: entering starts the child, leaving stops it and its whole process group."""

    def __init__(self, spec: EngineSpec, upstream: Upstream, channel: ProbeChannel) -> None:
        self._spec = spec
        self._upstream = upstream
        self._channel = channel
        self._env = dict(spec.env)
        if upstream.api_key:
            self._env["VLLM_API_KEY"] = upstream.api_key  # in the environment, never argv
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._child: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None  # the current child's, set the moment it exits
        self._health_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        self._crashes: deque[float] = deque()
        self._started_at = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.subprocess.Process | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        self._watchdog = await asyncio.create_subprocess_exec(
            *_GUARD,
            "watch",
            str(self._spec.stop_timeout),
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        self._loop_task = asyncio.create_task(self._run(), name=f"bastion-supervisor-{self._spec.name}")
        self._loop_task.add_done_callback(self._supervision_ended)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task = self._loop_task
        if task is not None and not task.done():
            self._events.put_nowait(Event("stop"))
            with contextlib.suppress(Exception):  # a crash is reported by _supervision_ended
                await task
        if self._child is not None:  # supervision ended without stopping it: stop it here
            await self._on_stop(Event("stop"))
        if self._watchdog is not None and self._watchdog.stdin is not None:
            self._watchdog.stdin.close()  # nothing left to guard: the watchdog exits
            await self._watchdog.wait()

    async def _run(self) -> None:
        await self._spawn()
        while True:
            event = await self._events.get()
            if event.pid and (self._child is None or event.pid != self._child.pid):
                continue  # about a child that is already gone
            handler = getattr(self, f"_on_{event.kind}")
            if await handler(event):
                return

    def _supervision_ended(self, task: asyncio.Task[None]) -> None:
        """The loop's done-callback: a loop that died of an exception must never go unnoticed."""
        error = None if task.cancelled() else task.exception()
        if error is None:
            return
        pid = self._child.pid if self._child is not None else 0
        if self._health_task is not None:
            self._health_task.cancel()
        self._upstream.set(Phase.FAILED, "bastion's supervision of it failed (see bastion's log)")
        log.error(
            "upstream pid=%d supervision crashed: %r at %s; the model server is no longer watched: answering 503 "
            "until bastion is restarted",
            pid,
            error,
            _where(error),
        )

    # --- events ---------------------------------------------------------------------

    async def _on_healthy(self, event: Event) -> bool:
        elapsed = time.monotonic() - self._started_at
        self._upstream.set(Phase.READY)
        log.info("upstream pid=%d ready after %.1fs", event.pid, elapsed)
        return False

    async def _on_unhealthy(self, event: Event) -> bool:
        self._upstream.set(Phase.RESTARTING, "stopped answering; restarting")  # before the kill, not after
        log.warning("upstream pid=%d stopped answering (%s); restarting it", event.pid, event.detail)
        await self._terminate()
        return False

    async def _on_start_timeout(self, event: Event) -> bool:
        self._upstream.set(Phase.RESTARTING, "not healthy within the startup timeout; restarting")
        log.error(
            "upstream pid=%d not healthy after %.0fs (BASTION_STARTUP_TIMEOUT); restarting it",
            event.pid,
            self._spec.startup_timeout,
        )
        await self._terminate()
        return False

    async def _on_exited(self, event: Event) -> bool:
        # Not ready from this moment: requests get 503 + Retry-After, not a 502 from a dead port,
        # while the rest of its process group is cleared below.
        spec = self._spec
        self._forget_child()
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > spec.restart_window:
            self._crashes.popleft()
        reason = event.detail
        if event.code == _CANNOT_EXEC:
            reason += f": its command could not be run (see the line above; check {spec.command_setting})"
        if len(self._crashes) >= spec.max_restarts:
            crashes = len(self._crashes)
            self._upstream.set(Phase.FAILED, f"it keeps crashing ({crashes} times within {spec.restart_window:.0f}s)")
            log.error(
                "upstream pid=%d exited (%s); %d crashes within %.0fs: giving up, answering 503 until an operator "
                "fixes it and restarts bastion",
                event.pid,
                reason,
                crashes,
                spec.restart_window,
            )
            await self._clear_group(event.pid)
            return False
        delay = backoff_delay(len(self._crashes), spec.backoff, spec.backoff_max, random.random())
        self._upstream.set(Phase.RESTARTING, f"exited ({event.detail}); restarting")
        self._upstream.retry_after = max(1, round(delay))
        log.warning("upstream pid=%d exited (%s); restarting in %.1fs", event.pid, reason, delay)
        await self._clear_group(event.pid)  # no leftovers holding the GPU before a restart
        left = max(0.0, delay - (time.monotonic() - now))
        asyncio.get_running_loop().call_later(left, self._events.put_nowait, Event("restart_due"))
        return False

    async def _on_restart_due(self, event: Event) -> bool:
        self._upstream.restarts += 1
        await self._spawn()
        return False

    async def _on_stop(self, event: Event) -> bool:
        self._upstream.set(Phase.STOPPING)
        child = self._child
        if child is not None:
            if self._health_task is not None:
                self._health_task.cancel()
            log.info("upstream pid=%d stopping", child.pid)
            await self._terminate()
            log.info("upstream pid=%d stopped (%s)", child.pid, _describe_exit(child.returncode))
        self._forget_child()
        return True

    # --- the child --------------------------------------------------------------------

    async def _spawn(self) -> None:
        guard = [*_GUARD, "exec", str(os.getpid()), "--"]
        self._started_at = time.monotonic()
        self._upstream.set(Phase.STARTING if self._upstream.restarts == 0 else Phase.RESTARTING)
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ChildProtocol(_LINE_LIMIT, loop),
                *guard,
                *self._spec.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # its own process group: stopped as a whole, spared the terminal's ^C
            )
        except OSError as exc:
            log.error("upstream could not be started: %s", exc)
            self._upstream.set(Phase.FAILED, f"could not start: {exc.strerror or exc}")
            return
        child = asyncio.subprocess.Process(transport, protocol, loop)
        self._child, self._exited = child, protocol.exited
        self._tell_watchdog(child.pid)
        log.info("upstream pid=%d started: %s", child.pid, " ".join(self._spec.command))
        assert child.stdout is not None and child.stderr is not None
        # These end on their own when the child's pipes close and it exits.
        self._background(self._relay_output(child.stdout, child.pid), "stdout relay", child.pid)
        self._background(self._relay_output(child.stderr, child.pid), "stderr relay", child.pid)
        self._background(self._wait_exit(child.pid, protocol.exited), "exit watcher", child.pid)
        self._health_task = self._background(self._watch_health(child.pid), "health watcher", child.pid)

    def _background(self, coroutine: Coroutine[None, None, None], what: str, pid: int) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=f"upstream-{pid}-{what}")
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            error = None if task.cancelled() else task.exception()
            if error is None:
                return
            log.error("upstream pid=%d %s crashed: %r at %s", pid, what, error, _where(error))
            # A child nobody watches any more is restarted rather than trusted blindly.
            self._events.put_nowait(Event("unhealthy", pid, f"its {what} failed"))

        task.add_done_callback(done)
        return task

    async def _terminate(self) -> None:
        """SIGTERM the child's process group; SIGKILL whatever is left after stop_timeout."""
        child, exited = self._child, self._exited
        if child is None or exited is None:
            return
        deadline = time.monotonic() + self._spec.stop_timeout
        _signal_group(child.pid, signal.SIGTERM)
        _signal_group(child.pid, signal.SIGCONT)  # a stopped (hung) process must wake up to die
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._spec.stop_timeout)
        except TimeoutError:
            log.warning("upstream pid=%d ignored SIGTERM for %.0fs; killing it", child.pid, self._spec.stop_timeout)
            _signal_group(child.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), _KILL_WAIT)
        await _reap_group(child.pid, deadline)

    async def _clear_group(self, group: int) -> None:
        """The leader exited: the rest of its group (e.g. vLLM's engine process) gets SIGTERM, then SIGKILL."""
        if await asyncio.to_thread(_group_alive, group):
            _signal_group(group, signal.SIGTERM)
            _signal_group(group, signal.SIGCONT)
            await _reap_group(group, time.monotonic() + self._spec.stop_timeout)

    def _forget_child(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        self._child = None
        self._tell_watchdog(0)

    def _tell_watchdog(self, group: int) -> None:
        if self._watchdog is not None and self._watchdog.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._watchdog.stdin.write(b"%d\n" % group)

    # --- watchers: they only enqueue ----------------------------------------------------

    async def _wait_exit(self, pid: int, exited: asyncio.Future[int]) -> None:
        code = await exited
        self._events.put_nowait(Event("exited", pid, _describe_exit(code), code))

    async def _relay_output(self, stream: asyncio.StreamReader, pid: int) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the 1 MiB limit: asyncio dropped it; keep relaying
                log.info("upstream pid=%d | [a line over 1 MiB, not shown]", pid)
                continue
            if not line:
                return
            log.info("upstream pid=%d | %s", pid, line.decode(errors="replace").rstrip())

    async def _watch_health(self, pid: int) -> None:
        spec = self._spec
        url = self._upstream.base_url
        next_progress = self._started_at + _PROGRESS_EVERY
        while not (await self._channel.health(url)).up:
            now = time.monotonic()
            if now - self._started_at > spec.startup_timeout:
                self._events.put_nowait(Event("start_timeout", pid))
                return
            if now >= next_progress:
                log.info("upstream pid=%d loading: %.0fs elapsed, waiting for /health", pid, now - self._started_at)
                next_progress += _PROGRESS_EVERY
            await asyncio.sleep(_STARTUP_POLL)
        self._events.put_nowait(Event("healthy", pid))
        failures = 0
        reason = ""
        while failures < spec.health_failures:
            await asyncio.sleep(spec.health_interval)
            probe = await self._channel.health(url)
            if probe.verdict is Verdict.BUSY:
                continue  # every probe connection taken: load, never a sign of death
            failures = 0 if probe.up else failures + 1
            reason = probe.detail
        self._events.put_nowait(Event("unhealthy", pid, f"{failures} health probes failed, the last: {reason}"))


class _ChildProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's protocol for a child with pipes, plus `exited`: set the moment the process exits.

    `Process.wait()` (CPython's asyncio) resolves only once the child's pipes are closed too, and a
    grandchild that inherited them (vLLM's engine process) keeps them open: the child's death would
    go unnoticed, and the gateway stay READY in front of a dead port, until the grandchild died.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[int] = loop.create_future()
        self._process: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._process = cast(asyncio.SubprocessTransport, transport)

    def process_exited(self) -> None:
        super().process_exited()
        code = self._process.get_returncode() if self._process is not None else None
        if not self.exited.done():
            self.exited.set_result(-1 if code is None else code)


def supervise(
    spec: EngineSpec, channel: ProbeChannel, on_key: Callable[[str], None] | None = None
) -> tuple[Upstream, Supervisor]:
    """The state and the supervisor of one engine bastion owns.

    The child gets a fresh random API key through its environment (never argv); the key is
    registered with the redacting log filter, and handed to `on_key` (the audit log's redactor):
    each (re)start mints a new one, which every redactor must learn as it is made.
    """
    key = secrets.token_urlsafe(32)
    redact_value(key)
    if on_key is not None:
        on_key(key)
    upstream = Upstream(spec.base_url, key, Phase.STARTING)
    return upstream, Supervisor(spec, upstream, channel)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _where(error: BaseException) -> str:
    """file:line in function, where an exception was raised: enough to find it, in one line."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


async def _reap_group(group: int, deadline: float) -> None:
    """Wait until `deadline` for the group to be gone, then SIGKILL whatever is left."""
    # (A /proc scan takes milliseconds: off the event loop that serves requests.)
    while await asyncio.to_thread(_group_alive, group) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    _signal_group(group, signal.SIGKILL)


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    """Does a process of the group still run? Zombies do not count: a dead grandchild that its new
    parent (PID 1 of a container, often) never reaps must not hold a restart back until stop_timeout."""
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc: trust the signal
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue  # gone meanwhile
        state, _, pgrp = stat[stat.rindex(b")") + 2 :].split(maxsplit=3)[:3]
        if int(pgrp) == group and state != b"Z":
            return True
    return False
