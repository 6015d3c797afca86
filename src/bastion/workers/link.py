"""A worker's side of the line to its master (`bastion serve --workers N`).

What goes over it:
- master -> worker: the engines' state (`engines`, versioned), a request for this worker's
  metrics page (`page`), the answers to this worker's own asks (`pages`, `restarted`);
- worker -> master: `started` once it accepts connections, its in-flight counts per engine
  child (`in_flight`, with the snapshot version it has applied), its page, and asks: every
  worker's page for a scrape (`scrape`), a rolling restart (`restart`).

The master gone (the line closed) means the worker is orphaned: it shuts down gracefully
(SIGTERM to itself, so uvicorn drains as on any stop) instead of serving without engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..engine.fleet import RestartOutcome, RestartReport
from ..engine.router import Router
from .channel import Channel, Message
from .engines import EngineMirror, parse_snapshot

log = logging.getLogger("bastion.workers")
REPORT_INTERVAL = 0.05  # while a replaced engine child still has requests here: how often the master hears
ASK_TIMEOUT = 10.0  # a scrape's pages; a restart waits as long as it takes (the master bounds it)

Page = Callable[[], Awaitable[bytes]]


class MasterGone(ConnectionError):
    """The line to the master is closed: an ask cannot be answered (the worker is stopping)."""


class MasterLink:
    """The worker's end: built before the app (which takes its mirror), run in the app's lifespan."""

    def __init__(self, sock: socket.socket, index: int, mirror: EngineMirror) -> None:
        self.index = index
        self.mirror = mirror
        self._sock = sock
        self._channel: Channel | None = None
        self._version = 0
        self._asks = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._page: Page | None = None
        self._last_report: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        self._gone = False  # the master's line closed: asks fail at once

    @asynccontextmanager
    async def running(self, router: Router, page: Page | None) -> AsyncIterator[MasterLink]:
        self.mirror.attach(router)
        self._page = page
        self._channel = await Channel.open(self._sock)
        tasks = [
            asyncio.create_task(self._listen(), name="bastion-worker-link"),
            asyncio.create_task(self._report_loop(), name="bastion-worker-report"),
        ]
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._channel.close()

    def started(self) -> None:
        """Called once the worker's server accepts connections."""
        if self._channel is not None:
            self._channel.send({"t": "started", "pid": os.getpid()})

    # --- asks to the master -------------------------------------------------------------

    async def pages(self) -> list[tuple[int, str | None]]:
        """Every worker's metrics page (None for one that did not answer in time), this one's included."""
        async with asyncio.timeout(ASK_TIMEOUT):
            answer = await self._ask({"t": "scrape"})
        return [(int(index), text) for index, text in answer.get("pages", [])]

    async def restart(self, model: str | None) -> list[RestartReport]:
        """The master's rolling restart; LookupError for an unknown model (as `Fleet.restart`)."""
        answer = await self._ask({"t": "restart", "model": model})  # as long as it takes: the master bounds it
        if answer.get("unknown"):
            raise LookupError(model)
        return [
            RestartReport(str(r["engine"]), RestartOutcome(r["outcome"]), str(r["detail"]))
            for r in answer.get("reports", [])
        ]

    async def _ask(self, message: Message) -> Message:
        if self._channel is None:
            raise RuntimeError("the worker's line to its master is not open")
        if self._gone:
            raise MasterGone("the master is gone")
        ask = next(self._asks)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[ask] = future
        self._channel.send({**message, "id": ask})
        try:
            return await future
        finally:
            self._waiting.pop(ask, None)

    # --- what the master sends ------------------------------------------------------------

    async def _listen(self) -> None:
        assert self._channel is not None
        while (message := await self._channel.receive()) is not None:
            kind = message.get("t")
            if kind == "engines":
                self.mirror.apply(parse_snapshot(message.get("replicas")))
                self._version = int(message.get("v", 0))
                self._report(force=True)
            elif kind == "page":
                task = asyncio.create_task(self._send_page(int(message.get("id", 0))), name="bastion-worker-page")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind in ("pages", "restarted"):
                future = self._waiting.get(int(message.get("id", 0)))
                if future is not None and not future.done():
                    future.set_result(message)
        log.warning("worker %d: the master (pid %d) is gone; stopping", self.index, os.getppid())
        # Asks waiting on it get no answer now: fail them (else a restart asked here holds this orphaned
        # worker's graceful stop up for the whole BASTION_SHUTDOWN_GRACE).
        self._gone = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(MasterGone("the master is gone"))
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop: in-flight requests finish

    async def _send_page(self, ask: int) -> None:
        text: str | None = None
        if self._page is not None:
            with contextlib.suppress(Exception):
                text = (await self._page()).decode()
        if self._channel is not None:
            self._channel.send({"t": "page", "id": ask, "text": text})

    # --- in-flight counts -------------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            if self.mirror.draining or any(self._last_report.values()):  # the master may be waiting on a count
                self._report(force=False)

    def _report(self, *, force: bool) -> None:
        counts = self.mirror.in_flight()
        if not force and counts == self._last_report:
            return
        self._last_report = counts
        if self._channel is not None:
            self._channel.send({"t": "in_flight", "v": self._version, "counts": counts})


def report_dicts(reports: list[RestartReport]) -> list[dict[str, Any]]:
    return [{"engine": r.engine, "outcome": r.outcome.value, "detail": r.detail} for r in reports]
