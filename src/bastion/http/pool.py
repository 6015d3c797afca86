"""The pool: keep-alive connections (`http1.Connection`) to one upstream origin.

Its state is two collections, as in httpcore: every connection that counts (connecting, busy
or idle) and, among them, the idle ones. Capacity is derived from that state, never kept in a
counter: a connection stops counting exactly once, when it leaves the set (`retire`).

At most `max_connections` count at once; a request waits up to the pool timeout for one
(then `PoolTimeout`, a 503 to the client). Waiters are served in order: a connection given
back, or a slot freed, is handed straight to the first waiter, so a newcomer never overtakes
one. Idle connections are reused newest first, at most `max_keepalive` are kept, and one
that expired (`keepalive_expiry`), was closed, or is readable while idle (the upstream closed
it, or talks out of turn) is dropped before anything is written on it. A request written
on a connection is never written again: a connection that closes unanswered is a
`RemoteProtocolError` (POSTs to a model server are not idempotent).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable

from .http1 import (
    ConnectError,
    Connection,
    ConnectTimeout,
    Headers,
    PoolClosed,
    PoolTimeout,
    Response,
    Timeouts,
)

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# Idle connections kept per origin unless told otherwise (httpx keeps 20 of 100; a model server's bursts are larger).
DEFAULT_MAX_KEEPALIVE = 100


class Pool:
    """Keep-alive connections to one origin, at most `max_connections` open at once."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        timeouts: Timeouts,
        max_connections: int,
        keepalive_expiry: float,
        max_keepalive: int = DEFAULT_MAX_KEEPALIVE,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.timeouts = timeouts
        self._ssl = ssl_context  # None: plain HTTP
        default_port = 80 if ssl_context is None else 443
        authority = f"[{host}]" if ":" in host else host
        self._host_header = (authority if port == default_port else f"{authority}:{port}").encode("ascii")
        self._max = max_connections
        self._max_idle = min(max_keepalive, max_connections)
        self._expiry = keepalive_expiry
        self._connections: set[Connection] = set()  # connecting, busy or idle: what counts against the limit
        self._idle: list[Connection] = []  # the idle ones among them, newest last
        # Callers waiting for a connection, in order; each is handed a connection (a new one: not yet connected).
        self._waiters: deque[asyncio.Future[Connection]] = deque()
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections that count against `max_connections`: connecting, busy or idle."""
        return len(self._connections)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def open(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes,
        timeouts: Timeouts | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Response:
        """Send a request; return once the response head is in.

        The request is written once, on one connection: a kept-alive connection found stale
        is dropped before anything is written on it, and a connection that fails after the
        request went out is not retried. `on_sent` is called the moment the request is handed
        to the connection: before it, a failure or a cancellation (waiting for a connection,
        connecting) means the server never saw a byte of it.
        """
        timeouts = timeouts or self.timeouts
        head = self._head(method, target, headers, body)
        connection = await self._acquire(timeouts)
        if connection.transport is None:
            await self._connect(connection, timeouts)
        response = connection.send(method, head, body, timeouts.read)
        if on_sent is not None:
            on_sent()
        try:
            if connection.draining:  # only a large body waits for the kernel to take it
                await connection.drain(timeouts.write)
            await response.wait_head()
        except BaseException:
            response.close()
            raise
        return response

    def _head(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> bytes:
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", self._host_header, b"\r\n"]
        lines = 3 + len(headers)  # the request line, host, each header, the blank line
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if body or method in _BODY_METHODS:
            parts += (b"content-length: ", str(len(body)).encode(), b"\r\n")
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Two counts over the head, not four searches per header: a line break in a name or value (or in the
        # target) shows as more of them than the lines written.
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("a header name or value holds a line break")
        return head

    # --- taking a connection ---------------------------------------------------------
    async def _acquire(self, timeouts: Timeouts) -> Connection:
        """An idle connection checked for use, or a new one (not yet connected) that already counts."""
        deadline: float | None = None
        while True:
            if self._closed:
                raise PoolClosed("the HTTP client was closed")
            connection = self._take_idle()
            if connection is not None:
                return connection
            if len(self._connections) < self._max:
                return self._new()
            deadline = deadline or self.loop.time() + timeouts.pool
            waiter: asyncio.Future[Connection] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._give_back(waiter.result())  # handed one just as we left (timeout, cancel): pass it on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise PoolTimeout(f"all {self._max} upstream connections stayed busy") from None
                raise
            if not connection.closed:
                return connection
            # Closed before we could use it (by the upstream, or `close`): it no longer counts; start again.

    def _take_idle(self) -> Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            connection = idle.pop()
            connection.idle = False
            if connection.closed or now - connection.idle_since >= self._expiry or connection.readable():
                connection._abort()  # stale: nothing was written on it
                continue
            return connection
        return None

    def _new(self) -> Connection:
        connection = Connection(self)
        self._connections.add(connection)
        return connection

    async def _connect(self, connection: Connection, timeouts: Timeouts) -> None:
        try:
            async with asyncio.timeout(timeouts.connect):
                transport, _ = await self.loop.create_connection(
                    lambda: connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            self.retire(connection)
            raise ConnectTimeout(f"connecting to {self.host}:{self.port} took too long") from None
        except OSError as exc:
            self.retire(connection)
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        except BaseException:
            self.retire(connection)
            raise
        connection.transport = transport  # uvloop may call connection_made only after this returns
        if self._closed:
            connection.fail(PoolClosed("the HTTP client was closed"))
            raise PoolClosed("the HTTP client was closed")
        if connection.closed:  # nothing was written: sending now would wait for an answer that cannot come
            raise ConnectError(f"{self.host}:{self.port} closed the connection as it was opened")

    # --- giving connections back --------------------------------------------------------
    def put_back(self, connection: Connection) -> None:
        """A response was read to its end on a keep-alive connection: hand it over, keep it, or close it."""
        if self._closed:
            connection._abort()
            return
        connection.idle_since = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if len(self._idle) >= self._max_idle:
            connection._abort()  # over the idle cap
            return
        connection.idle = True
        self._idle.append(connection)

    def _give_back(self, connection: Connection) -> None:
        """A waiter left holding a connection it was handed: the next waiter gets it (or the slot)."""
        if connection.transport is None:
            self.retire(connection)  # a new one, never connected: only the slot to pass on
        elif connection.closed:
            pass  # retired already
        else:
            self.put_back(connection)

    def retire(self, connection: Connection) -> None:
        """A connection is gone (closed by us or the upstream, or never connected): it stops counting, once."""
        if connection not in self._connections:
            return
        self._connections.remove(connection)
        if connection.idle:
            connection.idle = False
            self._idle.remove(connection)
        while self._waiters and len(self._connections) < self._max:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._new())

    def close(self) -> None:
        """Close every connection, busy ones included; waiting and in-flight requests fail with `PoolClosed`."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("the HTTP client was closed"))
        for connection in list(self._connections):
            connection.fail(PoolClosed("the HTTP client was closed"))
        self._idle.clear()
