"""vLLM's admission of requests, modelled: at most `max_num_seqs` sequences run, the rest wait.

vLLM's scheduler moves a request from its waiting queue to its running batch while the
batch has room: in arrival order under `fcfs`, or by the request's `priority` (lower
first, ties by arrival) under `priority`. A request that finishes or is aborted leaves
the batch at once, and one aborted while waiting leaves the queue. The simulator has no
KV cache, so the only room is the number of sequences, and nothing is preempted.

Cost: a request that finds room takes it at once (no future, no task, no clock read);
one that must wait awaits a single future that `release` resolves. Nothing per token.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from .settings import SchedulingPolicy

# (priority key, arrival number, sequences, future): arrival numbers are unique, so the
# comparison of two entries never reaches the future.
_Entry = tuple[int, int, int, "asyncio.Future[None]"]


class Scheduler:
    """Counts of running and waiting sequences, and the queue between them."""

    __slots__ = ("_arrivals", "_live", "_queue", "max_num_seqs", "policy", "running", "waiting")

    def __init__(self, max_num_seqs: int, policy: SchedulingPolicy) -> None:
        self.max_num_seqs = max_num_seqs
        self.policy = policy
        self.running = 0  # sequences generating now
        self.waiting = 0  # sequences queued (their clients still connected)
        self._queue: list[_Entry] = []
        self._live = 0  # entries of the queue whose client is still there
        self._arrivals = itertools.count()

    async def acquire(self, seqs: int, priority: int = 0) -> float:
        """Wait until `seqs` sequences may run; the seconds waited.

        `seqs` must not exceed `max_num_seqs`. A cancellation while waiting (the client
        left) takes the request out of the queue at once and lets the next one in.
        """
        if not self._live and self.running + seqs <= self.max_num_seqs:
            self.running += seqs
            return 0.0
        queued = time.monotonic()
        key = priority if self.policy is SchedulingPolicy.PRIORITY else 0
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (key, next(self._arrivals), seqs, future))
        self.waiting += seqs
        self._live += 1
        self._schedule()  # a lower priority than any waiting makes it the head, which may fit
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():  # still queued: `_schedule` skips its entry from now on
                self.waiting -= seqs
                self._live -= 1
                self._schedule()
                self._compact()
            else:  # scheduled in the same instant as cancelled: give the room back
                self.release(seqs)
            raise
        return time.monotonic() - queued

    def release(self, seqs: int) -> None:
        """The request's sequences finished or were aborted: their room goes to the queue."""
        self.running -= seqs
        if self._queue:
            self._schedule()

    def _schedule(self) -> None:
        queue = self._queue
        while queue:
            _, _, seqs, future = queue[0]
            if future.done():  # its client left (counted in `acquire`)
                heapq.heappop(queue)
                continue
            if self.running + seqs > self.max_num_seqs:
                return  # like vLLM, the head waits for room; nothing overtakes it
            heapq.heappop(queue)
            self.waiting -= seqs
            self._live -= 1
            self.running += seqs
            future.set_result(None)

    def _compact(self) -> None:
        """Drop abandoned entries once they are most of the heap, so a long queue does not hoard them."""
        stale = len(self._queue) - self._live
        if stale > 64 and stale * 2 > len(self._queue):
            self._queue = [entry for entry in self._queue if not entry[3].done()]
            heapq.heapify(self._queue)
