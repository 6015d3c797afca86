"""A lean asyncio Redis client for the hot path: one pipelined connection, EVALSHA, explicit timeouts.

Why not coredis (or redis-py): bastion's limits make ~7 script calls per request, and coredis
spent ~130-160 µs of CPU on each (redis-py with hiredis ~100 µs); writing a RESP command and
parsing a small reply costs ~20 µs. This client does only that.

- One connection per client, shared by every concurrent caller: each call queues its command and
  a future; the commands queued in one loop iteration go out in one send, written by one
  `call_soon` callback (auto-pipelining: concurrent requests' calls, and one request's calls
  issued before it awaits any, share a syscall and a round trip); replies come back in order
  (RESP guarantees it), so they are matched FIFO in `data_received`. No task, lock or pool per
  call. A caller that is cancelled leaves its place in the queue: its reply is read and dropped.
  `issue` queues a command without awaiting (so a caller can queue another's before either
  waits); `writes` and `commands` count sends and commands (round trips per request, measured).
- Timeouts: connecting (TCP, TLS, AUTH, SELECT) and each reply get `timeout` seconds. The oldest
  pending call is the first due, so one timer watches the queue's head (armed when none is); a
  reply that does not come in time fails the connection and every call on it (`RedisTimeout`).
- Failures: any connection failure fails every pending call with `RedisUnavailable` and drops the
  connection; the next call opens a new one (callers that arrive while it opens share the attempt).
  Nothing is ever re-sent by the client: a script that reserved or counted something runs once or
  fails. Error replies are `ReplyError` (a bug) or `RedisUnavailable` (READONLY, NOAUTH, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import cast

from .errors import NoScript, RedisError, RedisTimeout, RedisUnavailable
from .resp import Arg, Parser, ProtocolError, Reply, bulk, encode
from .url import Endpoint, parse_url


class _Connection(asyncio.Protocol):
    """One socket to Redis: commands written as they come, replies matched to callers in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._pending: deque[tuple[asyncio.Future[Reply], float]] = deque()
        self._parser = Parser()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._outgoing: list[bytes] = []  # commands written at the end of this loop iteration
        self.failure: RedisUnavailable | None = None
        self.writes = 0  # sends on this socket (each one a round trip for the commands in it)
        self.commands = 0

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError as exc:
            self.fail(RedisUnavailable(f"Redis sent a malformed reply ({exc})"))
            return
        pending = self._pending
        for reply in replies:
            if not pending:
                self.fail(RedisUnavailable("Redis sent a reply nobody asked for"))
                return
            future = pending.popleft()[0]
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, RedisError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisUnavailable("the connection to Redis was closed"))

    def eof_received(self) -> bool | None:
        return None  # close our side too (connection_lost follows)

    # --- calls --------------------------------------------------------------------------
    def request(self, command: bytes) -> asyncio.Future[Reply]:
        """Write `command` now; the future gets its reply (or the connection's failure)."""
        if self.failure is not None:
            raise _again(self.failure)
        loop = self._loop
        future = loop.create_future()
        deadline = loop.time() + self._timeout
        self._pending.append((future, deadline))
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(command)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        return future

    def _flush(self) -> None:
        """Write the commands of this loop iteration in one send (on loopback a send costs ~10-30 µs of CPU)."""
        outgoing, self._outgoing = self._outgoing, []
        if self.failure is None and outgoing:
            self.writes += 1
            self.commands += len(outgoing)
            cast(asyncio.Transport, self._transport).write(b"".join(outgoing) if len(outgoing) > 1 else outgoing[0])

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._pending or self.failure is not None:
            return
        deadline = self._pending[0][1]
        if self._loop.time() >= deadline:
            self.fail(RedisTimeout(f"no reply from Redis within {self._timeout:g}s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def fail(self, failure: RedisUnavailable) -> None:
        """Close the connection and fail every call still waiting on it with `failure`."""
        if self.failure is None:
            self.failure = failure
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()
        pending, self._pending = self._pending, deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(_again(self.failure))


def _abandon(futures: list[asyncio.Future[Reply]]) -> None:
    """Calls whose caller is gone: cancelled while pending (the connection drops their replies); a failure already
    set is marked read (else each logs "Future exception was never retrieved" with a traceback)."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


def _again(failure: RedisUnavailable) -> RedisUnavailable:
    """A fresh exception like `failure` (one instance raised in many callers would pile up tracebacks)."""
    return type(failure)(*failure.args)


class Redis:
    """A client for one Redis server (see the module docstring). Call `aclose()` when done."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._opening: asyncio.Task[_Connection] | None = None
        self._writes = 0  # of connections already closed
        self._commands = 0

    @property
    def writes(self) -> int:
        """Sends so far, on every connection this client opened: each is one round trip."""
        connection = self._connection
        return self._writes + (connection.writes if connection is not None else 0)

    @property
    def commands(self) -> int:
        connection = self._connection
        return self._commands + (connection.commands if connection is not None else 0)

    @classmethod
    def from_url(cls, url: str, timeout: float) -> Redis:
        return cls(parse_url(url), timeout)

    def script(self, source: str) -> Script:
        return Script(self, source)

    async def execute(self, *args: Arg) -> Reply:
        """Run one command; its reply, or `RedisUnavailable` / `ReplyError`."""
        return await self.send(encode(args))

    def issue(self, command: bytes) -> asyncio.Future[Reply] | None:
        """Queue one already encoded command now, without awaiting: its reply's future (sent with whatever else
        this loop iteration queues), or None when there is no open connection (then `send` it: it connects)."""
        connection = self._connection
        if connection is None or connection.failure is not None:
            return None
        return connection.request(command)

    async def send(self, command: bytes) -> Reply:
        """Run one already encoded command."""
        connection = self._connection
        if connection is None or connection.failure is not None:
            connection = await self._connect()
        return await connection.request(command)

    async def pipeline(self, calls: Sequence[tuple[bytes, Script | None]]) -> list[Reply]:
        """Several already encoded commands in one send (each with its Script, if it is one); their replies in
        order, a failed one as its exception (not raised: each caller decides). One round trip instead of
        `len(calls)`. A script that got NOSCRIPT did not run: it is loaded and run again after the others (so
        after the calls that followed it: callers keep that in mind; it happens after a Redis restart only)."""
        try:
            connection = self._connection
            if connection is None or connection.failure is not None:
                connection = await self._connect()
            futures = [connection.request(command) for command, _ in calls]
        except RedisUnavailable as exc:
            return [_again(exc) for _ in calls]
        replies: list[Reply] = []
        try:
            for future in futures:
                try:
                    replies.append(await future)
                except RedisError as exc:
                    replies.append(exc)
        except BaseException:  # cancelled: nobody reads the rest (their replies are dropped, failures not logged)
            _abandon(futures)
            raise
        for i, ((command, script), reply) in enumerate(zip(calls, replies, strict=True)):
            if isinstance(reply, NoScript) and script is not None:
                try:
                    await script.load()
                    replies[i] = await self.send(command)
                except RedisError as exc:
                    replies[i] = exc
        return replies

    async def _connect(self) -> _Connection:
        opening = self._opening
        if opening is None:
            opening = self._opening = asyncio.get_running_loop().create_task(self._open())
            opening.add_done_callback(self._opened)
        return await asyncio.shield(opening)

    def _opened(self, task: asyncio.Task[_Connection]) -> None:
        current = task is self._opening  # not when `aclose()` came between the set-up's end and this callback
        if current:
            self._opening = None
        if task.cancelled() or task.exception() is not None:
            return
        if current:
            self._retire(self._connection)
            self._connection = task.result()
        else:
            task.result().fail(RedisUnavailable("the Redis client was closed"))

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        connection = _Connection(loop, self.timeout)
        failure: RedisUnavailable
        try:
            async with asyncio.timeout(self.timeout):
                if endpoint.path is not None:
                    await loop.create_unix_connection(lambda: connection, endpoint.path)
                else:
                    await loop.create_connection(
                        lambda: connection,
                        cast(str, endpoint.host),  # an Endpoint without a socket path has a host
                        endpoint.port,
                        ssl=endpoint.tls,
                        server_hostname=endpoint.host if endpoint.tls is not None else None,
                    )
                for command in endpoint.handshake():
                    await connection.request(encode(command))
        except (TimeoutError, RedisTimeout):
            failure = RedisTimeout(f"could not connect to Redis within {self.timeout:g}s")
        except OSError as exc:  # refused, unreachable, TLS handshake failed (ssl.SSLError is an OSError)
            failure = RedisUnavailable(f"cannot connect to Redis: {exc.strerror or type(exc).__name__}")
        except RedisUnavailable as exc:  # closed during the handshake, or AUTH refused (WRONGPASS, NOAUTH)
            failure = _again(exc)
        except RedisError as exc:  # any other refusal of AUTH or SELECT: a configuration we cannot work with
            word = str(exc).split(" ", 1)[0]  # the error code only: the rest could quote the command
            failure = RedisUnavailable(f"Redis refused the connection's set-up (AUTH/SELECT): {word}")
        except BaseException:
            connection.fail(RedisUnavailable("connecting to Redis was cancelled"))
            raise
        else:
            return connection
        connection.fail(failure)
        raise failure from None

    async def aclose(self) -> None:
        """Close the connection; calls waiting on it fail with `RedisUnavailable`."""
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.fail(RedisUnavailable("the Redis client was closed"))
        self._retire(connection)

    def _retire(self, connection: _Connection | None) -> None:
        """Keep the counts of a connection this client no longer holds."""
        if connection is not None:
            self._writes += connection.writes
            self._commands += connection.commands


class Script:
    """A Lua script run by EVALSHA; on NOSCRIPT (first use, a restarted server) it is loaded and run once more."""

    __slots__ = ("_client", "_head", "sha", "source")

    def __init__(self, client: Redis, source: str) -> None:
        self._client = client
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()  # noqa: S324 (Redis names scripts by SHA-1)
        self._head = b"$7\r\nEVALSHA\r\n$40\r\n" + self.sha + b"\r\n"

    def command(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> bytes:
        """The EVALSHA command for these keys and arguments (for `Redis.pipeline`)."""
        return b"*%d\r\n" % (3 + len(keys) + len(args)) + self._head + bulk([len(keys), *keys, *args])

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Reply:
        return await self.send(self.command(keys, args))

    async def send(self, command: bytes) -> Reply:
        """Run this script's `command` (from `command()`), loading the script on NOSCRIPT."""
        try:
            return await self._client.send(command)
        except NoScript:
            return await self._loaded_and_sent(command)

    async def _loaded_and_sent(self, command: bytes) -> Reply:
        await self.load()
        return await self._client.send(command)

    async def load(self) -> None:
        await self._client.execute(b"SCRIPT", b"LOAD", self.source)

    async def reply(self, issued: asyncio.Future[Reply] | None, command: bytes) -> Reply:
        """The reply to `command` queued by `Redis.issue` (None: it was not, so it is sent now); on NOSCRIPT the
        script is loaded and the command run once more."""
        if issued is None:
            return await self.send(command)
        try:
            return await issued
        except NoScript:
            return await self._loaded_and_sent(command)
