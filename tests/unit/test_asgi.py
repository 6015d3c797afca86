"""asgi.DisconnectWatch: cancel the forwarding task when the client goes, by the server's hook or by receive()."""

from __future__ import annotations

import asyncio

import pytest

from bastion.asgi import CONNECTION_HOOK, ConnectionHook, DisconnectWatch, Message


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError


async def _forward(scope: dict[str, object], receive: object, started: asyncio.Event) -> str:
    watch = DisconnectWatch(scope, receive, delay=0.05)  # type: ignore[arg-type]
    try:
        started.set()
        await asyncio.sleep(10)  # waiting on the upstream
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        return "client gone"
    finally:
        watch.finish()
    return "finished"


async def test_the_servers_hook_cancels_at_once_without_a_task() -> None:
    hook = ConnectionHook()
    started = asyncio.Event()
    task = asyncio.create_task(_forward({CONNECTION_HOOK: hook}, _never, started))
    await started.wait()
    await asyncio.sleep(0.1)  # past the fallback's delay
    assert len(asyncio.all_tasks()) == 2  # this test and the forwarding task: no watcher task
    assert hook.on_lost is not None
    hook.on_lost()  # what server.py does from connection_lost
    assert await asyncio.wait_for(task, 1) == "client gone"
    assert hook.on_lost is None  # finished: a later connection loss is just the end of the exchange


async def test_without_the_hook_receive_is_watched_after_the_delay() -> None:
    disconnected = asyncio.Event()

    async def receive() -> Message:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    started = asyncio.Event()
    task = asyncio.create_task(_forward({}, receive, started))
    await started.wait()
    disconnected.set()
    assert await asyncio.wait_for(task, 1) == "client gone"


async def test_a_cancellation_that_is_not_a_disconnect_propagates() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(_forward({CONNECTION_HOOK: ConnectionHook()}, _never, started))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
