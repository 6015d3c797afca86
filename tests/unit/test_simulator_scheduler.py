"""The simulator's scheduler in-process: admission order, room, and clients that leave at awkward moments."""

from __future__ import annotations

import asyncio

import pytest

from bastion.simulator.scheduler import Scheduler
from bastion.simulator.settings import SchedulingPolicy, cli_flags


async def _queue(scheduler: Scheduler, order: list[str], name: str, seqs: int = 1, priority: int = 0) -> None:
    await scheduler.acquire(seqs, priority)
    order.append(name)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_room_is_taken_at_once_and_the_rest_wait_in_arrival_order() -> None:
    scheduler = Scheduler(2, SchedulingPolicy.FCFS)
    assert await scheduler.acquire(1) == 0.0
    assert await scheduler.acquire(1) == 0.0
    order: list[str] = []
    # fcfs ignores priorities, as vLLM V1 does
    tasks = [asyncio.create_task(_queue(scheduler, order, name, priority=p)) for name, p in [("a", 9), ("b", 0)]]
    await _settle()
    assert (scheduler.running, scheduler.waiting, order) == (2, 2, [])
    scheduler.release(1)
    await _settle()
    assert (scheduler.running, scheduler.waiting, order) == (2, 1, ["a"])
    scheduler.release(1)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert (scheduler.running, scheduler.waiting, order) == (2, 0, ["a", "b"])


async def test_priority_orders_the_queue_lower_first_ties_by_arrival() -> None:
    scheduler = Scheduler(1, SchedulingPolicy.PRIORITY)
    await scheduler.acquire(1)
    order: list[str] = []
    tasks = []
    for name, priority in [("p10-first", 10), ("p10-second", 10), ("p0", 0), ("p-5", -5)]:
        tasks.append(asyncio.create_task(_queue(scheduler, order, name, priority=priority)))
        await _settle()
    for _ in tasks:
        scheduler.release(1)
        await _settle()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order == ["p-5", "p0", "p10-first", "p10-second"]


async def test_a_waiting_client_that_leaves_is_out_of_the_queue_at_once() -> None:
    scheduler = Scheduler(1, SchedulingPolicy.FCFS)
    await scheduler.acquire(1)
    order: list[str] = []
    gone = asyncio.create_task(_queue(scheduler, order, "gone"))
    stays = asyncio.create_task(_queue(scheduler, order, "stays"))
    await _settle()
    assert scheduler.waiting == 2
    gone.cancel()
    await _settle()
    assert gone.cancelled() and scheduler.waiting == 1
    scheduler.release(1)
    await asyncio.wait_for(stays, 2)
    assert order == ["stays"] and (scheduler.running, scheduler.waiting) == (1, 0)


async def test_a_client_cancelled_in_the_instant_it_was_scheduled_gives_its_room_back() -> None:
    scheduler = Scheduler(1, SchedulingPolicy.FCFS)
    await scheduler.acquire(1)
    order: list[str] = []
    unlucky = asyncio.create_task(_queue(scheduler, order, "unlucky"))
    after = asyncio.create_task(_queue(scheduler, order, "after"))
    await _settle()
    scheduler.release(1)  # resolves unlucky's future; it has not run yet
    unlucky.cancel()
    await _settle()
    assert unlucky.cancelled()
    await asyncio.wait_for(after, 2)
    assert order == ["after"] and (scheduler.running, scheduler.waiting) == (1, 0)


async def test_a_head_that_needs_more_room_blocks_those_behind_it() -> None:
    scheduler = Scheduler(4, SchedulingPolicy.PRIORITY)
    await scheduler.acquire(3)
    order: list[str] = []
    wide = asyncio.create_task(_queue(scheduler, order, "wide", seqs=2))
    await _settle()
    narrow = asyncio.create_task(_queue(scheduler, order, "narrow", seqs=1))
    await _settle()
    assert order == [] and (scheduler.running, scheduler.waiting) == (3, 3)
    urgent = asyncio.create_task(_queue(scheduler, order, "urgent", seqs=1, priority=-1))
    await _settle()  # ahead of the wide head, and it fits
    assert order == ["urgent"] and (scheduler.running, scheduler.waiting) == (4, 3)
    scheduler.release(3)
    await asyncio.wait_for(asyncio.gather(wide, narrow, urgent), 2)
    assert order == ["urgent", "wide", "narrow"] and (scheduler.running, scheduler.waiting) == (4, 0)


async def test_abandoned_entries_do_not_pile_up_in_a_long_queue() -> None:
    scheduler = Scheduler(1, SchedulingPolicy.PRIORITY)
    await scheduler.acquire(1)
    order: list[str] = []
    waiters = [asyncio.create_task(_queue(scheduler, order, str(i), priority=100)) for i in range(300)]
    await _settle()
    for task in waiters[1:]:  # behind a head that stays: only a compaction removes them
        task.cancel()
    await _settle()
    assert scheduler.waiting == 1
    assert len(scheduler._queue) < 150
    scheduler.release(1)
    await asyncio.wait_for(waiters[0], 2)
    assert order == ["0"]


async def test_queue_time_is_what_was_waited() -> None:
    scheduler = Scheduler(1, SchedulingPolicy.FCFS)
    await scheduler.acquire(1)
    waiter = asyncio.create_task(scheduler.acquire(1))
    await asyncio.sleep(0.2)
    scheduler.release(1)
    assert 0.15 < await waiter < 1.0


def test_every_knob_but_the_key_is_a_flag_with_its_kind() -> None:
    flags = dict(cli_flags())
    assert "api_key" not in flags
    assert flags["max_num_seqs"] == {"type": int}
    assert flags["itl_per_seq"] == {"type": float}
    assert flags["scheduling_policy"] == {"choices": ["fcfs", "priority"]}


@pytest.mark.parametrize("policy", list(SchedulingPolicy))
async def test_free_room_never_waits(policy: SchedulingPolicy) -> None:
    scheduler = Scheduler(3, policy)
    assert [await scheduler.acquire(1, p) for p in (5, 0, 9)] == [0.0, 0.0, 0.0]
    assert scheduler._queue == []
