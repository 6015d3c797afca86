"""Small plain-ASGI helpers shared by the proxy and the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyTimeout(Exception):
    """The client did not send its whole body within the allowed time."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (name in lower case)."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(receive: Receive, limit: int, declared: bytes | None = None, seconds: float | None = None) -> bytes:
    """Read the whole request body, refusing more than `limit` bytes or taking over `seconds`.

    A Content-Length above the limit is refused before a byte is read. A client that
    trickles its body (a slow-upload attack) gets `BodyTimeout` instead of pinning the
    request, and whatever it holds (a concurrency slot), forever.
    """
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    if seconds is None:
        return await _read_body(receive, limit)
    try:
        async with asyncio.timeout(seconds):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise BodyTimeout from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


class DisconnectWatch:
    """Cancel the current task as soon as the client goes away.

    ASGI servers drop writes to a closed connection silently, so a slow stream
    would otherwise keep the upstream generating until its next chunk. Once the
    request body has been read, the only message `receive()` can still deliver is
    `http.disconnect`; waiting for it in a side task lets us cancel the forwarding
    task at once. Check `.disconnected` (`absorb()`) after catching `CancelledError`.

    The side task starts only after `delay` seconds: most responses are over by then,
    and a task per request was a measurable share of the gateway's CPU. A client that
    leaves earlier is noticed when the delay ends (a disconnect waits in `receive()`).
    """

    __slots__ = ("_done", "_receive", "_task", "_timer", "_watcher", "disconnected")

    def __init__(self, receive: Receive, delay: float = 0.05) -> None:
        self._task = asyncio.current_task()
        self._receive = receive
        self._done = False
        self.disconnected = False
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if not self._done:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
        if not self._done and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def finish(self) -> None:
        """Mark the response complete: a later disconnect is just the end of the exchange."""
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: True (and the cancellation undone) if it was ours."""
        if self.disconnected and self._task is not None:
            self._task.uncancel()
            return True
        return False
