"""`bastion serve --workers N`: one master process, N gateway workers on one port.

The master binds the port (so a busy port is still one line, before anything starts),
starts the engines (the same fleet and supervisors one process runs) and spawns the
workers with the bound sockets, as uvicorn's multiprocess supervisor does. uvicorn's
supervisor itself does not fit: it blocks the main thread in a polling loop (the
engines' supervisors need an event loop), pickles the app into each worker, and says
neither a dead worker's exit code nor how to reach the engines.

The master then:
- restarts a worker that dies (one line with its pid and exit code; with backoff if it
  keeps dying at start-up, and not at all if it could not build the app: exit code 3);
- keeps every worker's view of the engines current (`engines.snapshot`, sent on change)
  and hears back how many requests each carries per engine child, so a rolling restart
  (SIGUSR1 to the master, or the admin route on any worker, which asks the master) drains
  an old child only once no worker has a request on it;
- gathers every worker's metrics page for the worker a scrape landed on;
- on SIGTERM/SIGINT stops the workers first (each drains its in-flight requests within
  BASTION_SHUTDOWN_GRACE, as one process does) and the engines last; SIGHUP (reload the key
  file) is passed on to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from ..app import build_engines, engine_entries, engine_spec, one_engine
from ..config import ConfigError, Settings
from ..engine.fleet import Carried, Fleet
from ..engine.probe import ProbeChannel
from ..engine.router import Backend, Router
from ..engine.supervisor import supervise
from ..listen import bind, urls
from ..preflight import problems
from .channel import Channel, Message
from .engines import ReplicaState, snapshot
from .link import report_dicts
from .worker import STARTUP_FAILURE, WORKER_IGNORES, run_worker

log = logging.getLogger("bastion.workers")
PUBLISH_INTERVAL = 0.05  # how often the engines' state is compared with what the workers were last told
PAGE_TIMEOUT = 5.0  # a worker's metrics page for a scrape
QUICK_DEATH = 10.0  # a worker dying this soon after its start is restarted with backoff
BACKOFF_MAX = 30.0
STOP_MARGIN = 10.0  # beyond BASTION_SHUTDOWN_GRACE, before a worker that has not exited is killed
_SPAWN = multiprocessing.get_context("spawn")


def serve_workers(settings: Settings) -> int:
    """The master's life: checked settings, bound sockets, then the event loop until a stop signal."""
    found = problems(settings)
    if found:
        raise ConfigError(found)
    try:
        master = Master(settings)
    except (ValueError, OSError) as exc:
        raise ConfigError([f"cannot start: {exc}"]) from None
    # Bound before the engines start: a busy port is one line, and no model starts for nothing.
    sockets = bind(settings.host, settings.port, host_setting="BASTION_HOST", port_setting="BASTION_PORT")
    return asyncio.run(master.run(sockets))


@dataclass(slots=True)
class Engines:
    """What the master runs: the fleet, its router, the probe channel of the one-engine case."""

    router: Router
    fleet: Fleet
    probes: ProbeChannel | None


def _engines(settings: Settings, in_flight: Callable[[Backend], Carried]) -> Engines | None:
    """The supervised engines, built as one process builds them; None when every engine is an external URL."""
    entries = engine_entries(settings)
    if entries:
        router, fleet = build_engines(settings, entries, in_flight=in_flight)
        return Engines(router, fleet, None)
    elif settings.upstream_url is not None:
        return None
    else:
        probes = ProbeChannel(settings.health_timeout)
        upstream, supervisor = supervise(engine_spec(settings), probes)
        router, fleet = one_engine(settings, upstream, supervisor, in_flight=in_flight)
        return Engines(router, fleet, probes)


@dataclass(slots=True, eq=False)
class Worker:
    index: int
    process: BaseProcess
    started: float
    channel: Channel | None = None
    ready: bool = False
    acked: int = -1  # the latest engines snapshot it has applied (-1: none yet)
    told: set[str] = field(default_factory=set)  # every engine child URL it was ever sent: it may route there
    hup_missed: bool = False  # a SIGHUP came while it was starting: passed on once it has started
    counts: dict[str, int] = field(default_factory=dict)  # its requests in flight per engine child URL
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid or 0


class Master:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sockets: list[socket.socket] = []
        self._engines = _engines(settings, self.in_flight)
        self._workers: dict[int, Worker] = {}
        self._stopping = asyncio.Event()
        self._failed = False
        self._announced = False
        self._crashes: dict[int, int] = {}  # index -> quick deaths in a row
        self._version = 0
        self._published: tuple[ReplicaState, ...] = ()
        self._asks = itertools.count(1)
        self._pages: dict[int, asyncio.Future[str | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self, sockets: list[socket.socket]) -> int:
        self._sockets = sockets
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        log.info("master pid=%d: starting %d workers", os.getpid(), self._settings.workers)
        async with AsyncExitStack() as stack:
            if self._engines is not None:  # the engines outlive the workers: entered first, left last
                if self._engines.probes is not None:
                    await stack.enter_async_context(self._engines.probes)
                await stack.enter_async_context(self._engines.fleet)
                self._published = snapshot(self._engines.router)
                self._spawn_task(self._publish_loop(), "bastion-master-publish")
            for index in range(self._settings.workers):
                self._start(index)
            await self._stopping.wait()
            await self._stop_workers()
            for task in list(self._tasks):
                task.cancel()
        log.info("master pid=%d: stopped", os.getpid())
        return 1 if self._failed else 0

    def _on_stop(self, sig: int) -> None:
        if not self._stopping.is_set():
            log.info("%s: stopping the workers (in-flight requests finish), then the engines", signal.Signals(sig).name)
        self._stopping.set()

    def _forward(self, sig: int) -> None:
        """SIGHUP to every started worker; one still starting (its handler not installed yet: the signal's default
        action would kill it) gets it once it has started."""
        if self._stopping.is_set():
            return
        for worker in self._workers.values():
            if worker.exited.is_set():  # its replacement reads the key file as it starts
                continue
            if not worker.ready:
                worker.hup_missed = True
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, sig)

    async def _stop_workers(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            if not worker.exited.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        # The port closes once the workers close their copies too: new connections are refused at once
        # (a load balancer moves on) instead of waiting in a queue nobody accepts from.
        for sock in self._sockets:
            sock.close()
        waits = [asyncio.create_task(worker.exited.wait()) for worker in workers]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self._settings.shutdown_grace + STOP_MARGIN)
            if late:
                for worker in workers:
                    if not worker.exited.is_set():
                        log.warning("worker %d (pid %d) did not stop in time: killing it", worker.index, worker.pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.pid, signal.SIGKILL)
                await asyncio.wait(late, timeout=5.0)
        for worker in workers:
            if worker.task is not None:
                worker.task.cancel()

    # --- workers ------------------------------------------------------------------------

    def _start(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        process = _SPAWN.Process(
            target=run_worker,
            args=(self._settings, self._sockets, index, theirs),
            name=f"bastion-worker-{index}",
            daemon=True,  # if the master ends by surprise, multiprocessing's exit hook still stops it
        )
        # Born with the master's signals blocked (a mask survives fork and exec): a SIGHUP or SIGUSR1 that reaches
        # the worker while it imports stays pending until `run_worker` ignores them, instead of killing it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORES)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        worker = Worker(index, process, time.monotonic())
        self._workers[index] = worker
        asyncio.get_running_loop().add_reader(process.sentinel, self._exited, worker)
        worker.task = asyncio.create_task(self._serve(worker, ours), name=f"bastion-master-worker-{index}")

    def _exited(self, worker: Worker) -> None:
        asyncio.get_running_loop().remove_reader(worker.process.sentinel)
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        worker.exited.set()
        if worker.channel is not None:
            self._spawn_task(worker.channel.close(), "bastion-master-close")
            worker.channel = None
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        if self._stopping.is_set():
            log.info("worker %d (pid %d) stopped (%s)", worker.index, worker.pid, how)
            return
        if code == STARTUP_FAILURE and not worker.ready:
            log.error(
                "worker %d (pid %d) could not start the gateway (see its lines above): stopping",
                worker.index,
                worker.pid,
            )
            self._failed = True
            self._stopping.set()
            return
        quick = time.monotonic() - worker.started < QUICK_DEATH
        crashes = self._crashes[worker.index] = self._crashes.get(worker.index, 0) + 1 if quick else 0
        delay = min(BACKOFF_MAX, 0.5 * 2 ** (crashes - 1)) if crashes else 0.0
        log.warning(
            "worker %d (pid %d) exited with %s; starting a new one%s",
            worker.index,
            worker.pid,
            how,
            f" in {delay:g}s" if delay else "",
        )
        self._spawn_task(self._restart(worker.index, delay), "bastion-master-restart")

    async def _restart(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopping.is_set():
            self._start(index)

    async def _serve(self, worker: Worker, sock: socket.socket) -> None:
        channel = worker.channel = await Channel.open(sock)
        if self._engines is not None:
            self._tell(worker, self._engines_message())
        while (message := await channel.receive()) is not None:
            kind = message.get("t")
            if kind == "in_flight":
                worker.acked = int(message.get("v", 0))
                counts = message.get("counts")
                worker.counts = {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}
            elif kind == "started":
                worker.ready = True
                log.info("worker %d started (pid %d)", worker.index, worker.pid)
                if worker.hup_missed and not self._stopping.is_set():
                    worker.hup_missed = False
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGHUP)
                if not self._announced and all(w.ready for w in self._workers.values()):
                    self._announced = True
                    log.info("listening on %s (%d workers)", urls(self._sockets), len(self._workers))
            elif kind == "page":
                future = self._pages.get(int(message.get("id", 0)))
                if future is not None and not future.done():
                    text = message.get("text")
                    future.set_result(text if isinstance(text, str) else None)
            elif kind == "scrape":
                self._spawn_task(self._scrape(channel, message), "bastion-master-scrape")
            elif kind == "restart":
                self._spawn_task(self._restart_engines(channel, message), "bastion-master-engines-restart")

    def _spawn_task(self, coroutine: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- asks from a worker ---------------------------------------------------------------

    async def _scrape(self, asker: Channel, message: Message) -> None:
        live = [w for w in self._workers.values() if w.channel is not None and not w.exited.is_set()]
        pages = await asyncio.gather(*(self._page(worker) for worker in live))
        answered = [[worker.index, page] for worker, page in zip(live, pages, strict=True)]
        asker.send({"t": "pages", "id": message.get("id"), "pages": answered})

    async def _page(self, worker: Worker) -> str | None:
        """A worker's /metrics page; None if it does not answer in time or exited since the scrape began
        (then it shows as `bastion_worker_scrape_up 0`, and the scrape is not held up)."""
        channel = worker.channel
        if channel is None:
            return None
        ask = next(self._asks)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pages[ask] = future
        try:
            channel.send({"t": "page", "id": ask})
            async with asyncio.timeout(PAGE_TIMEOUT):
                return await future
        except TimeoutError:
            return None
        finally:
            self._pages.pop(ask, None)

    async def _restart_engines(self, asker: Channel, message: Message) -> None:
        model = message.get("model")
        answer: Message = {"t": "restarted", "id": message.get("id")}
        if self._engines is None:
            answer["reports"] = []
        else:
            try:
                answer["reports"] = report_dicts(await self._engines.fleet.restart(model if model else None))
            except LookupError:
                answer["unknown"] = True
        asker.send(answer)

    # --- the engines' state -----------------------------------------------------------------

    def _engines_message(self) -> Message:
        return {"t": "engines", "v": self._version, "replicas": [state.as_message() for state in self._published]}

    async def _publish_loop(self) -> None:
        assert self._engines is not None
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            current = snapshot(self._engines.router)
            if current != self._published:
                self._version += 1
                self._published = current
                message = self._engines_message()
                for worker in self._workers.values():
                    self._tell(worker, message)

    def _tell(self, worker: Worker, message: Message) -> None:
        if worker.channel is not None:
            worker.told.update(state.url for state in self._published)
            worker.channel.send(message)

    def in_flight(self, backend: Backend) -> Carried:
        """What the workers carry on `backend`'s child: the requests they reported, and which live workers have
        not yet heard the latest state (they may still send new requests there). A dead worker carries nothing,
        nor does one never told of this child (started after the switch): a crash-looping worker holds no drain
        up, and is never counted as a request that was cut."""
        assert self._engines is not None
        url = backend.upstream.base_url
        publishing = snapshot(self._engines.router) != self._published  # not yet sent to anyone
        requests = 0
        unheard = []
        for worker in self._workers.values():
            if worker.channel is None or worker.exited.is_set() or url not in worker.told:
                continue
            requests += worker.counts.get(url, 0)
            if publishing or worker.acked < self._version:
                unheard.append(f"worker {worker.index} (pid {worker.pid})")
        return Carried(requests, tuple(unheard))
