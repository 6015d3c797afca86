"""The pool: keep-alive connections (`http1.Connection`) to one upstream origin.

At most `max_connections` are open at once; a request waits up to the pool timeout for
one to come free (then `PoolTimeout`, a 503 to the client). Idle connections are reused
newest first and dropped after `keepalive_expiry` or as soon as the upstream closes them.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque

from .http1 import (
    ConnectError,
    Connection,
    ConnectTimeout,
    Headers,
    PoolTimeout,
    RemoteProtocolError,
    Response,
    Timeouts,
)

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


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
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.timeouts = timeouts
        self._ssl = ssl_context  # None: plain HTTP
        default_port = 80 if ssl_context is None else 443
        authority = f"[{host}]" if ":" in host else host
        self._host_header = (authority if port == default_port else f"{authority}:{port}").encode("ascii")
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._idle: list[Connection] = []
        self._open = 0  # connecting, busy or idle
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def open(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes,
        timeouts: Timeouts | None = None,
    ) -> Response:
        """Send a request; return once the response head is in.

        A kept-alive connection that the upstream closed just as it was picked fails before a
        byte is answered: the request is then sent once more on a new connection (the only
        retry; a refused connection or a connection that answered anything is not retried).
        """
        timeouts = timeouts or self.timeouts
        head = self._head(method, target, headers, body)
        while True:
            connection = await self._acquire(timeouts)
            response = connection.send(method, head, body, timeouts.read)
            try:
                await connection.drain(timeouts.write)
                await response.wait_head()
                return response
            except RemoteProtocolError:
                response.close()
                if connection.reused and not response.received:
                    continue
                raise
            except BaseException:
                response.close()
                raise

    def _head(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> bytes:
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", self._host_header, b"\r\n"]
        for name, value in headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise ValueError("a header name or value holds a line break")
            parts += (name, b": ", value, b"\r\n")
        if body or method in _BODY_METHODS:
            parts += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # --- the pool -------------------------------------------------------------------------
    async def _acquire(self, timeouts: Timeouts) -> Connection:
        deadline: float | None = None
        while True:
            now = time.monotonic()
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed and now - connection.idle_since < self._expiry:
                    connection.reused = True
                    return connection
                connection._abort()
            if self._open < self._max:
                return await self._connect(timeouts)
            deadline = deadline or now + timeouts.pool
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(self.loop.time() + max(0.0, deadline - now)):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving (timed out or cancelled): the free slot goes on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise PoolTimeout(f"all {self._max} upstream connections stayed busy") from None
                raise

    async def _connect(self, timeouts: Timeouts) -> Connection:
        self._open += 1
        try:
            async with asyncio.timeout(timeouts.connect):
                transport, connection = await self.loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            self._slot_freed()
            raise ConnectTimeout(f"connecting to {self.host}:{self.port} took too long") from None
        except OSError as exc:
            self._slot_freed()
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        except BaseException:
            self._slot_freed()
            raise
        connection.transport = transport  # uvloop may call connection_made only after this returns
        return connection

    def put_back(self, connection: Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        self._wake_one()

    def retire(self, connection: Connection) -> None:
        """A connection is gone (closed by us or the upstream): free its slot once."""
        if connection.retired:
            return
        connection.retired = True
        if connection in self._idle:
            self._idle.remove(connection)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for connection in list(self._idle):
            connection._abort()
        self._idle.clear()
