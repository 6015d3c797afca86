"""Small plain-ASGI helpers shared by the proxy and the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

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


# Scope key: a `ConnectionHook` that bastion's own server (server.py) puts on every request.
CONNECTION_HOOK = "bastion.connection_hook"


class BodyWriter(Protocol):
    """A direct way to write a streamed body, from bastion's server (server.ChunkWriter)."""

    def serves(self, send: Send) -> bool:
        """Whether `send` is the server's own, unwrapped: only then may chunks bypass it."""

    def writable(self) -> bool:
        """Whether `write` can send a chunk now, as `send` would at once."""

    def write(self, data: bytes) -> None:
        """One chunk of the started chunked response, straight to the connection (after `writable`)."""

    def write_framed(self, chunk: bytes) -> bool:
        """Bytes framed already as chunks of the response (size lines, CRLFs), as they are, if `writable`: else
        nothing is written and False returned."""

    def started(self) -> bool:
        """Whether the response's head went out (or the connection is gone): no other answer can follow."""


class ConnectionHook:
    """What ASGI lacks, from bastion's server: news of a lost client, a way to end a broken response,
    and a direct way to write a streamed body.

    The server calls `on_lost` the moment the client's connection is lost before its
    response ended, and gives `abort`, which closes the connection quietly (the app
    logged why) when a response that has started cannot be finished. `writer` writes
    a chunk of the started chunked response straight to the connection whenever the
    server's `send` would write it at once: the proxy relays a stream's chunks so, from
    the upstream's `data_received`, without a task switch and an ASGI `send` per chunk.
    """

    __slots__ = ("abort", "body_received", "on_lost", "writer")

    def __init__(self) -> None:
        self.on_lost: Callable[[], None] | None = None
        self.abort: Callable[[], None] | None = None
        self.writer: BodyWriter | None = None
        # Whether the whole request body is already here, so that reading it cannot wait: no read timer needed.
        self.body_received: Callable[[], bool] | None = None


def unanswered(scope: Scope) -> bool:
    """Whether the server says nothing of this request's response has gone out, so that an error can still
    be answered instead (False where the server offers no way to know)."""
    hook: ConnectionHook | None = scope.get(CONNECTION_HOOK)
    writer = hook.writer if hook is not None else None
    return writer is not None and not writer.started()


def body_received(scope: Scope) -> bool:
    """Whether the server says the request's whole body has arrived (reading it then returns at once)."""
    hook: ConnectionHook | None = scope.get(CONNECTION_HOOK)
    return hook is not None and hook.body_received is not None and hook.body_received()


class DisconnectWatch:
    """Cancel the current task as soon as the client goes away.

    ASGI servers drop writes to a closed connection silently, so a slow stream
    would otherwise keep the upstream generating until its next chunk. Under
    bastion's own server the scope carries a `ConnectionHook`, whose `on_lost` it calls from
    `connection_lost`: the task is cancelled at once, at no cost per request.
    Under any other server the only sign is `receive()` returning
    `http.disconnect`, awaited in a side task that starts after `delay` seconds
    (most responses are over by then, and a task per request was a measurable
    share of the gateway's CPU). Check `absorb()` after catching `CancelledError`.
    """

    __slots__ = ("_done", "_hook", "_receive", "_task", "_timer", "_watcher", "disconnected")

    def __init__(self, scope: Scope, receive: Receive, delay: float = 0.05) -> None:
        self._task = asyncio.current_task()
        self._receive = receive
        self._done = False
        self.disconnected = False
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._hook: ConnectionHook | None = scope.get(CONNECTION_HOOK)
        if self._hook is not None:
            self._hook.on_lost = self._gone
        else:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if not self._done:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
        self._gone()

    def _gone(self) -> None:
        if not self._done and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def finish(self) -> None:
        """Mark the response complete: a later disconnect is just the end of the exchange."""
        self._done = True
        if self._hook is not None:
            self._hook.on_lost = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()

    def body_writer(self, send: Send) -> BodyWriter | None:
        """The server's direct writer for this response's body, if it offers one and `send` is its own.

        A stage that wrapped `send` (to see the body) turns pushing off: every chunk then goes through it.
        """
        writer = self._hook.writer if self._hook is not None else None
        return writer if writer is not None and writer.serves(send) else None

    def abort_connection(self) -> bool:
        """End the watch and close the client's connection; False where the server offers no way to."""
        self.finish()
        if self._hook is None or self._hook.abort is None:
            return False
        self._hook.abort()
        return True

    def absorb(self) -> bool:
        """After a CancelledError: True (and the cancellation undone) if it was ours."""
        if self.disconnected and self._task is not None:
            self._task.uncancel()
            return True
        return False
