"""Real upstream sockets on 127.0.0.1 for the HTTP client's tests (`bastion.http`): they answer on cue."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator

from bastion.http import http1
from bastion.http.pool import Pool
from tests.support import LoopbackServer, content_length

# (request number on this connection, request head+body, writer) -> keep the connection open?
Answer = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]
FAST = http1.Timeouts(connect=1.0, read=1.0, write=1.0, pool=1.0)


class KeepAliveServer(LoopbackServer):
    """Serves many requests per connection; counts connections (in all, open now, most open at once) and requests."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # a client closed a connection
        self._none_open = asyncio.Event()
        self._none_open.set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pool(
        self,
        max_connections: int = 8,
        timeouts: http1.Timeouts = FAST,
        tls: ssl.SSLContext | None = None,
        max_keepalive: int = 100,
        keepalive_expiry: float = 30,
    ) -> Pool:
        return Pool(
            "127.0.0.1", self.port, ssl_context=tls, timeouts=timeouts, max_connections=max_connections,
            max_keepalive=max_keepalive, keepalive_expiry=keepalive_expiry,
        )  # fmt: skip

    async def all_closed(self) -> None:
        """Wait (2 s at most) until the client closed every connection it opened."""
        await asyncio.wait_for(self._none_open.wait(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self._none_open.clear()
        self.most_open = max(self.most_open, self.open_now)
        number = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head + await reader.readexactly(content_length(head)))
                if not await self.answer(number, self.requests[-1], writer):
                    break
                number += 1
            await reader.read()  # wait for the client to close
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            if not self.open_now:
                self._none_open.set()
            self.closed.set()
            writer.close()


def ok(body: bytes = b"{}") -> Answer:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        return True

    return answer


async def streaming(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
    """Answers a head and a first chunk, then nothing: a long generation."""
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    return True


async def silent(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
    """Reads requests, never answers."""
    return True


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def unaccepting_port() -> Iterator[int]:
    """A listener that never accepts, its backlog already full: a connect hangs (the SYN goes unanswered)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                fillers.append(filler)
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


class UnreadReset:
    """Takes each connection, waits until a request's head is in (peeking, never reading), then closes it.

    Closed with the request unread, the socket sends a reset, not an orderly close: what a server's
    connections do when it exits with a request not taken yet (the backlog of its closing listener
    included; `dying_listener` shows that one). `resets` counts them.
    """

    def __init__(self) -> None:
        self.resets = 0
        self.port = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> UnreadReset:
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._listener.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self._listener)
            with connection:
                connection.setblocking(False)
                async with asyncio.timeout(5):
                    # Polled: the bytes must stay unread, and a reader callback would fire again at once.
                    while b"\r\n\r\n" not in _peek(connection):  # noqa: ASYNC110
                        await asyncio.sleep(0.002)
            self.resets += 1


def _peek(connection: socket.socket) -> bytes:
    try:
        return connection.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


@contextlib.contextmanager
def dying_listener() -> Iterator[socket.socket]:
    """A listener that never accepts; closing it resets the connections waiting in its backlog.

    The kernel completes their handshakes, so a client connects and writes its request; then the
    listener closes (its server is exiting) and the connection is reset, the request never read.
    """
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        yield listener
