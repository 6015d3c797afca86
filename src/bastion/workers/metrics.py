"""`/metrics` with several workers: every worker's page, merged, each sample labelled `worker`.

A scrape lands on one worker (the kernel hands the connection to whichever accepts it), so
that worker asks the master for every worker's page (over their private lines, never a
port) and merges them (`metrics_relay.MergedPages`, as for several engines' pages):
counters stay per worker (`sum without (worker)` adds them up), and a worker that did not
answer in time is visible as `bastion_worker_scrape_up{worker} 0` instead of a silent dip.
The worker label is the worker's index (0..N-1), kept by its replacement when one is
restarted, so series stay bounded (the master logs which pid each index has).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..asgi import Scope, Send
from ..errors import GatewayError, send_error
from ..metrics_http import Protected, ScrapeGuard, answer
from ..metrics_relay import MergedPages

WORKER_LABEL = "worker"
WORKER_UP = ("bastion_worker_scrape_up", "Whether the worker answered this scrape with its page (1) or not (0).")

Pages = Callable[[], Awaitable[list[tuple[int, str | None]]]]


class WorkersMetricsEndpoint(Protected):
    def __init__(self, guard: ScrapeGuard, pages: Pages) -> None:
        super().__init__(guard)
        self._pages = pages

    async def serve(self, scope: Scope, send: Send, *, head: bool) -> None:
        try:
            pages = await self._pages()
        except (TimeoutError, RuntimeError, ConnectionError):  # no answer, no line, the master gone
            await send_error(send, GatewayError(503, "The workers' metrics could not be gathered; retry."))
            return
        body = await asyncio.to_thread(merge, pages)  # a few hundred kB of text: off the event loop
        await answer(send, 200, body, CONTENT_TYPE_LATEST, head)


def merge(pages: Sequence[tuple[int, str | None]]) -> bytes:
    merged = MergedPages(WORKER_LABEL, WORKER_UP)
    for index, page in sorted(pages, key=lambda item: item[0]):
        try:
            if page is None:
                raise ValueError(index)
            merged.add(str(index), page)
        except ValueError:
            merged.missing(str(index))
    return merged.render()
