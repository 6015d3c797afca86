"""Runs the model server as a child process and keeps it alive.

Shaped like uvicorn's supervisors: everything that happens (the child exited,
became healthy, stopped answering, a restart is due, shutdown) is an `Event` put
on one queue; one loop takes events in order and calls one method per kind.
Watchers and signal paths only enqueue, so no two decisions ever race. Every log
line names the child's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from ..config import Settings
from ..logs import redact_value
from .probe import answers_health
from .state import Phase, Upstream
from .vllm import child_command

log = logging.getLogger("bastion.upstream")
_PROGRESS_EVERY = 10.0  # seconds between "still loading" lines
# The guard runs by file path in isolated mode (-I): it needs only the standard library, so it works
# whatever PYTHONPATH the child is given (e.g. one where vLLM, not bastion, is importable).
_GUARD = (sys.executable, "-I", str(Path(__file__).with_name("guard.py")))
_STARTUP_POLL = 0.25


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # exited | healthy | unhealthy | start_timeout | restart_due | stop
    pid: int = 0
    detail: str = ""


def backoff_delay(crashes: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff: base, 2*base, 4*base ... capped, stretched by up to 25 % jitter (0 <= jitter < 1)."""
    return min(cap, base * 2.0 ** max(0, crashes - 1)) * (1 + 0.25 * jitter)


class Supervisor:
    """An async context manager: entering starts the child, leaving stops it and its whole process group."""

    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        client: httpx.AsyncClient,
        command: list[str],
        env: dict[str, str],
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._client = client
        self._command = command
        self._env = env
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._child: asyncio.subprocess.Process | None = None
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
            str(self._settings.stop_timeout),
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        self._loop_task = asyncio.create_task(self._run(), name="bastion-supervisor")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._events.put_nowait(Event("stop"))
        if self._loop_task is not None:
            await self._loop_task
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

    # --- events ---------------------------------------------------------------------

    async def _on_healthy(self, event: Event) -> bool:
        elapsed = time.monotonic() - self._started_at
        self._upstream.set(Phase.READY)
        log.info("upstream pid=%d ready after %.1fs", event.pid, elapsed)
        return False

    async def _on_unhealthy(self, event: Event) -> bool:
        log.warning("upstream pid=%d stopped answering (%s); restarting it", event.pid, event.detail)
        await self._terminate()
        return False

    async def _on_start_timeout(self, event: Event) -> bool:
        log.error(
            "upstream pid=%d not healthy after %.0fs (BASTION_STARTUP_TIMEOUT); restarting it",
            event.pid,
            self._settings.startup_timeout,
        )
        await self._terminate()
        return False

    async def _on_exited(self, event: Event) -> bool:
        self._forget_child()
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self._settings.restart_window:
            self._crashes.popleft()
        if len(self._crashes) >= self._settings.max_restarts:
            self._upstream.set(Phase.FAILED, f"crashed {len(self._crashes)} times; not restarting")
            log.error(
                "upstream pid=%d exited (%s); %d crashes within %.0fs: giving up, answering 503 until bastion is "
                "restarted",
                event.pid,
                event.detail,
                len(self._crashes),
                self._settings.restart_window,
            )
            return False
        delay = backoff_delay(
            len(self._crashes), self._settings.restart_backoff, self._settings.restart_backoff_max, random.random()
        )
        self._upstream.set(Phase.RESTARTING, f"exited ({event.detail}); restarting")
        self._upstream.retry_after = max(1, round(delay))
        log.warning("upstream pid=%d exited (%s); restarting in %.1fs", event.pid, event.detail, delay)
        asyncio.get_running_loop().call_later(delay, self._events.put_nowait, Event("restart_due"))
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
        try:
            child = await asyncio.create_subprocess_exec(
                *guard,
                *self._command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # its own process group: stopped as a whole, spared the terminal's ^C
                limit=1 << 20,
            )
        except OSError as exc:
            log.error("upstream could not be started: %s", exc)
            self._upstream.set(Phase.FAILED, f"could not start: {exc}")
            return
        self._child = child
        self._tell_watchdog(child.pid)
        log.info("upstream pid=%d started: %s", child.pid, " ".join(self._command))
        assert child.stdout is not None and child.stderr is not None
        # These end on their own when the child's pipes close and it exits.
        self._background(self._relay_output(child.stdout, child.pid))
        self._background(self._relay_output(child.stderr, child.pid))
        self._background(self._wait_exit(child))
        self._health_task = self._background(self._watch_health(child.pid))

    def _background(self, coroutine: Coroutine[None, None, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _terminate(self) -> None:
        """SIGTERM the child's process group, give it stop_timeout, then SIGKILL whatever is left."""
        child = self._child
        if child is None:
            return
        _signal_group(child.pid, signal.SIGTERM)
        _signal_group(child.pid, signal.SIGCONT)  # a stopped (hung) process must wake up to die
        try:
            await asyncio.wait_for(child.wait(), self._settings.stop_timeout)
        except TimeoutError:
            log.warning("upstream pid=%d ignored SIGTERM for %.0fs; killing it", child.pid, self._settings.stop_timeout)
        await self._reap_group(child.pid)

    async def _reap_group(self, group: int) -> None:
        """Wait briefly for the rest of the group (e.g. vLLM's engine process) to go, then SIGKILL it."""
        deadline = time.monotonic() + self._settings.stop_timeout
        while _group_alive(group) and time.monotonic() < deadline:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.1)
        _signal_group(group, signal.SIGKILL)

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

    async def _wait_exit(self, child: asyncio.subprocess.Process) -> None:
        code = await child.wait()
        await self._reap_group(child.pid)  # no leftovers holding the GPU before a restart
        self._events.put_nowait(Event("exited", child.pid, _describe_exit(code)))

    async def _relay_output(self, stream: asyncio.StreamReader, pid: int) -> None:
        while line := await stream.readline():
            log.info("upstream pid=%d | %s", pid, line.decode(errors="replace").rstrip())

    async def _watch_health(self, pid: int) -> None:
        url = self._upstream.base_url + "/health"
        settings = self._settings
        next_progress = self._started_at + _PROGRESS_EVERY
        while not await self._healthy(url):
            now = time.monotonic()
            if now - self._started_at > settings.startup_timeout:
                self._events.put_nowait(Event("start_timeout", pid))
                return
            if now >= next_progress:
                log.info("upstream pid=%d loading: %.0fs elapsed, waiting for /health", pid, now - self._started_at)
                next_progress += _PROGRESS_EVERY
            await asyncio.sleep(_STARTUP_POLL)
        self._events.put_nowait(Event("healthy", pid))
        failures = 0
        while failures < settings.health_failures:
            await asyncio.sleep(settings.health_interval)
            failures = 0 if await self._healthy(url) else failures + 1
        self._events.put_nowait(Event("unhealthy", pid, f"{failures} health probes failed"))

    async def _healthy(self, url: str) -> bool:
        return await answers_health(self._client, url, self._settings.health_timeout)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def supervised_upstream(settings: Settings, client: httpx.AsyncClient) -> tuple[Upstream, Supervisor]:
    """The upstream state and the supervisor for a child bastion owns.

    The child gets a fresh random API key through its environment (never argv),
    and none of bastion's own BASTION_* settings, which may hold secrets.
    """
    host = settings.upstream_host
    port = settings.upstream_port or _free_port(host)
    key = secrets.token_urlsafe(32)
    redact_value(key)
    upstream = Upstream(f"http://{_url_host(host)}:{port}", key, Phase.STARTING)
    env = {name: value for name, value in os.environ.items() if not name.startswith("BASTION_")}
    env.update(settings.upstream_env)
    env["VLLM_API_KEY"] = key
    return upstream, Supervisor(settings, upstream, client, child_command(settings, host, port), env)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
