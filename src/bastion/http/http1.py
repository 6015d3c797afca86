"""A lean HTTP/1.1 client for the upstream: keep-alive connections on asyncio protocols.

Why not aiohttp's or httpx's client: measured in the running gateway on the 2-core
reference machine, aiohttp's `ClientSession.request` spent ~110 µs of CPU per
proxied request (URL objects, header multidicts, cookie and timeout machinery,
payload registry) — half the whole per-request budget — and httpx's own pool
2-3 ms. This client does only what a reverse proxy to one trusted model server
needs: write the request head and body in one write, parse the response with
httptools (the parser uvicorn uses), hand body bytes over as they arrive, and keep
connections for reuse. httpx's API runs on top of it (`transport.PoolTransport`).

Timeouts are explicit: connect, waiting for a free connection (pool), sending a
large body (write), and the longest silence between two reads (read) — a bound on
silence, not on the whole response, so a long generation is never cut.

Held to httpcore's behaviour: a HEAD response leaves the connection reusable, 1xx
informational responses are skipped, a 101 upgrade is refused (the connection closes
and the caller gets `RemoteProtocolError`), and trailers after a chunked body are kept
apart from the response headers (`Response.trailers`).
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import Protocol, cast

import httptools

# Above this many unread bytes the connection stops reading until the consumer catches up.
_HIGH_WATER = 256 * 1024
# What a chunk's size line may hold on a pushed stream's fast path: hex digits, no extensions, no more than
# seven (anything else goes to the parser). `bytes.strip` of these leaving nothing is the check (half a regex's cost).
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_MOST_HEX = 7

Headers = list[tuple[bytes, bytes]]


class HTTPError(Exception):
    """Talking to the upstream failed."""


class ConnectError(HTTPError):
    """The upstream refused or could not be reached."""


class ConnectTimeout(HTTPError):
    """Connecting took too long."""


class PoolTimeout(ConnectTimeout):
    """No connection came free in time (all `max_connections` busy)."""


class ReadTimeout(HTTPError):
    """The upstream fell silent for longer than the read timeout."""


class WriteTimeout(HTTPError):
    """The upstream stopped reading the request body."""


class RemoteProtocolError(HTTPError):
    """The upstream closed the connection early or answered something that is not HTTP/1.1."""


class ConnectionReset(RemoteProtocolError):
    """The upstream reset the connection before any byte of an answer: the request was never read.

    A reset (not an orderly close) is what the kernel sends for a connection still waiting in the
    backlog of a listener that closes, or for a socket closed with the request unread: a server
    that is exiting, whose connections can close before its listener does (so a connection opened
    just after its last answer failed is accepted, then reset). The server never took the request.
    """


class PoolClosed(HTTPError):
    """The client was closed: waiting and in-flight requests end with this."""


class Owner(Protocol):
    """What a connection needs from its pool (`pool.Pool`): the loop, and where it goes when done."""

    loop: asyncio.AbstractEventLoop

    def put_back(self, connection: Connection) -> None:
        """A response was read to its end on a keep-alive connection: keep or hand over the connection."""

    def retire(self, connection: Connection) -> None:
        """The connection is closed (by us or the upstream): it no longer counts."""


class Timeouts:
    __slots__ = ("connect", "pool", "read", "write")

    def __init__(self, connect: float, read: float, write: float, pool: float) -> None:
        self.connect, self.read, self.write, self.pool = connect, read, write, pool


class Response:
    """A response whose head is in; the body is read with `read_some` or `read` (or pushed: `push_to`).

    Ends with `release()` (a fully read response gives its connection back to the
    pool; anything else closes it) or `close()` (always closes: the upstream sees
    the disconnect, which is how vLLM learns to abort a generation). Trailer fields
    after a chunked body land in `trailers`, never in `headers`.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_connection",
        "_error",
        "_pushing",
        "_quiet_since",
        "_read_timeout",
        "_sink",
        "_timer",
        "_waiter",
        "headers",
        "keep_alive",
        "status",
        "trailers",
    )

    def __init__(self, connection: Connection, read_timeout: float) -> None:
        self._connection = connection
        self._read_timeout = read_timeout
        self.status = 0
        self.headers: Headers = []  # names in lower case, values as received
        self.keep_alive = False
        self.trailers: Headers = []  # fields after the last chunk of a chunked body, names in lower case
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: HTTPError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # One lazily re-armed timer per response, not one per wait: a stream waits once per chunk.
        self._timer: asyncio.TimerHandle | None = None
        self._quiet_since = 0.0  # loop time the current wait began, or the last byte pushed to the sink arrived
        self._sink: Callable[[bytes, bytes | None], bool] | None = None
        # Body bytes of the current `data_received` bound for the sink: handed over once the whole read is
        # parsed, so a read holding several chunks is one sink call (one write to the client), not one each.
        self._pushing: list[bytes] = []

    @property
    def complete(self) -> bool:
        return self._complete and not self._chunks

    async def read_some(self) -> bytes:
        """The body bytes that have arrived (waiting for some if none has); b"" at the end."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                if self._buffered > _HIGH_WATER:
                    self._connection.resume_reading()
                self._buffered = 0
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    def push_to(self, sink: Callable[[bytes, bytes | None], bool]) -> None:
        """From now on, hand body bytes to `sink` as they arrive, while the reader waits with nothing unread.

        Relaying a stream through `read_some` costs a task wake-up per chunk. With a sink, bytes that
        arrive while the reader is parked in `read_some` with nothing buffered go to `sink` straight
        from `data_received`, and the reader stays parked until the end or an error. Bytes the sink
        refuses (it returns False: say the client stopped reading) are buffered and wake the reader,
        which reads them as usual. Order is kept: nothing is pushed while bytes wait unread, or
        while the reader holds some (it is not parked then). The sink gets one call per read from the
        upstream, whatever number of chunks it held; the bytes of a read that also ends the response are
        not pushed but left to the reader, so they leave with the end of the response in one write.

        The sink is called as `sink(data, framed)`: `framed` is None, except for a chunked body's read of
        whole chunks (none the last), which skips the parser and comes as it arrived too (size lines and
        CRLFs included): a relay whose client gets the same chunked framing can write it as it is.
        """
        self._sink = sink

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_some():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        self._stop_timer()
        self._connection.finish(self, reuse=self.complete and self.keep_alive)

    def close(self) -> None:
        self._stop_timer()
        self._connection.finish(self, reuse=False)

    # --- waiting (consumer side) -----------------------------------------------------
    async def wait_head(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def _wait(self) -> None:
        loop = self._connection.loop
        waiter = self._waiter = loop.create_future()
        self._quiet_since = now = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(now + self._read_timeout, self._check_silence)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_silence(self) -> None:
        """The timer: fail the wait if nothing arrived for the whole read timeout, else re-arm."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits; the next wait arms the timer again
        deadline = self._quiet_since + self._read_timeout
        if self._connection.loop.time() >= deadline:
            waiter.set_exception(ReadTimeout("the upstream sent nothing within the read timeout"))
        else:
            self._timer = self._connection.loop.call_at(deadline, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- feeding (called by the connection) --------------------------------------------
    def _head(self, status: int, keep_alive: bool) -> None:
        self.status, self.keep_alive = status, keep_alive
        self._wake()

    def _feed(self, data: bytes) -> None:
        pushing = self._pushing
        if pushing:  # this read's earlier bytes go to the sink: so do these, after them
            pushing.append(data)
            return
        sink, waiter = self._sink, self._waiter
        if sink is not None and waiter is not None and not waiter.done() and not self._chunks:
            pushing.append(data)  # handed to the sink by `_push`, once the connection parsed the whole read
            return
        self._queue(data)

    def _push(self) -> None:
        """Hand this read's pushed bytes to the sink; the reader gets them instead if the sink refuses them
        or if the same read ended the response (they then go out with its end, in one write)."""
        pushing = self._pushing
        data = pushing[0] if len(pushing) == 1 else b"".join(pushing)
        pushing.clear()
        sink = self._sink
        if self._complete or self._error is not None or sink is None or not sink(data, None):
            self._queue(data)
            return
        self._quiet_since = self._connection.loop.time()  # bytes arrived: the read timeout starts again

    def _queue(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _done(self) -> None:
        if self._error is None:
            self._complete = True
            self._wake()

    def _fail(self, error: HTTPError) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._wake()


class Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls the `on_*` methods while parsing.

    The pool creates it before connecting, so that a connection being opened already counts
    against `max_connections`, and hands it to `loop.create_connection` as the protocol.
    """

    def __init__(self, pool: Owner) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None  # None until connected
        self.response: Response | None = None
        self.closed = False
        self.idle = False  # in the pool's idle list
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._poller: select.poll | None = None
        self._in_head = False  # between a message's first line and the end of its headers
        self._informational = False
        self._head_only = False  # the request was HEAD: no body follows, whatever the head announces
        self._renew_parser = False
        self._drained: asyncio.Future[None] | None = None
        # The parser stands between two chunks of a chunked body: a read of whole chunks may bypass it.
        self._between_chunks = False

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked: a confused upstream; do not reuse the connection
            self._abort()
            return
        sink = response._sink
        if sink is not None and self._between_chunks:
            # A pushed chunked body's fast path (inline: it runs for every token of a stream): a read of whole
            # chunks, while the reader is parked with nothing unread, goes to the sink with its framing, the
            # parser skipped (it stays between chunks, where it would be after parsing them). Anything else (part
            # of a chunk, the last chunk) is parsed.
            line = data.find(b"\r\n", 0, _MOST_HEX + 2)
            waiter = response._waiter
            if line > 0 and waiter is not None and not waiter.done() and not response._chunks:
                size = data[:line]
                start = line + 2
                end = start + int(size, 16) if not size.strip(_HEX_DIGITS) else start
                if start < end and end + 2 == len(data) and data.endswith(b"\r\n"):  # one chunk, not the last
                    body: bytes | None = data[start:end]
                elif data.endswith(b"\r\n0\r\n\r\n"):  # a stream's tail: its last events with the end
                    body = None
                else:
                    body = _whole_chunks(data, start, end)
                if body is not None:
                    if sink(body, data):
                        response._quiet_since = self.loop.time()  # bytes arrived: the read timeout starts again
                    else:
                        response._queue(body)  # refused (the client is full): the reader gets it
                    return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101: `on_headers_complete` failed the response
            self._abort()
        except httptools.HttpParserError as exc:
            if response._pushing:  # the valid chunks before the fault still go out, as they arrived
                response._push()
            response._fail(RemoteProtocolError(f"the upstream's response is not valid HTTP/1.1: {exc}"))
            self._abort()
        else:
            if response._pushing:
                response._push()
        if self._between_chunks and data[-1] != 0x0A:
            # Bytes after the chunk that ended (the start of the next size line: they end a read with no LF,
            # which would have finished the line): the parser is inside that line, not between chunks.
            self._between_chunks = False
        if self._renew_parser:  # a HEAD response ended with its head; this parser would wait for the body
            self._renew_parser = False
            self._parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None:
            if not response.status and isinstance(exc, ConnectionResetError | BrokenPipeError):
                response._fail(ConnectionReset("the upstream reset the connection without reading the request"))
            elif not response.status:
                response._fail(RemoteProtocolError("the upstream closed the connection without answering"))
            elif exc is None and _ends_at_close(response.headers):
                response._done()  # a body without length or chunking ends when the connection does
            else:
                response._fail(RemoteProtocolError("the upstream closed the connection before the response ended"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self.pool.retire(self)

    def pause_writing(self) -> None:
        self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # --- httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._between_chunks = False
        response = self.response
        if response is not None and response._complete:  # a second answer to one request: never reuse this
            self._abort()
            self.response = None
        elif response is not None:
            response.headers.clear()  # after a 1xx, the real response's headers start afresh

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is not None:
            (response.headers if self._in_head else response.trailers).append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        response = self.response
        if response is None:
            return
        status = self._parser.get_status_code()
        if status == 101:  # the upstream switched protocols: nothing here speaks the new one
            response._fail(RemoteProtocolError("the upstream answered 101 Switching Protocols; upgrades are refused"))
            self._abort()
            return
        # 1xx (100 Continue, 103 Early Hints) is followed by the real response on the same connection.
        self._informational = 100 <= status < 200
        if self._informational:
            return
        response._head(status, self._parser.should_keep_alive())
        if self._head_only:  # no body follows; the connection stays reusable
            response._done()
            self._renew_parser = True

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            if self._head_only:  # bytes after a HEAD response's head: a confused upstream
                self._abort()
            else:
                response._feed(body)

    def on_chunk_header(self) -> None:
        self._between_chunks = False

    def on_chunk_complete(self) -> None:
        self._between_chunks = True  # after a chunk's closing CRLF (the last chunk's: after its trailers)

    def on_message_complete(self) -> None:
        self._between_chunks = False
        if self.response is not None and not self._informational and not self._head_only:
            self.response._done()

    # --- used by Pool and Response ------------------------------------------------------
    def send(self, method: bytes, head: bytes, body: bytes, read_timeout: float) -> Response:
        transport = self.transport
        assert transport is not None
        self._head_only = method == b"HEAD"
        response = self.response = Response(self, read_timeout)
        if len(body) < 65536:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        return response

    @property
    def draining(self) -> bool:
        """Whether `drain` would wait (the request's bytes are not all with the kernel yet)."""
        return self._drained is not None

    async def drain(self, seconds: float) -> None:
        """Wait until the kernel took the request (only ever waits for large bodies)."""
        if self._drained is None:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._drained
        except TimeoutError:
            raise WriteTimeout("the upstream did not read the request body in time") from None

    def readable(self) -> bool:
        """Whether bytes or an end of stream wait unread in the socket.

        On an idle connection either means the upstream closed it (or talks out of turn), even
        when the event loop has not yet run the callbacks that would say so (httpcore's check).
        """
        poller = self._poller
        if poller is None:
            sock = self.transport.get_extra_info("socket") if self.transport is not None else None
            if sock is None:
                return False
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def finish(self, response: Response, reuse: bool) -> None:
        if self.response is not response:
            return  # already finished
        self.response = None
        if reuse and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.pool.put_back(self)
        else:
            self._abort()

    def fail(self, error: HTTPError) -> None:
        """Close at once, busy or not: the response in flight ends with `error`."""
        if self.response is not None:
            self.response._fail(error)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self.pool.retire(self)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _abort(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():  # unsent bytes would keep the socket open until the peer reads
                transport.abort()
            else:
                transport.close()
        self.pool.retire(self)


def _whole_chunks(data: bytes, start: int, end: int) -> bytes | None:
    """The data of `data`'s chunks if it is nothing but whole chunks, none the last (the first's data at
    `start:end`, empty if its size line was not plain hex); None otherwise."""
    parts = []
    while True:
        if start == end or end + 2 > len(data) or data[end : end + 2] != b"\r\n":
            return None
        parts.append(data[start:end])
        if end + 2 == len(data):
            return b"".join(parts)
        line = data.find(b"\r\n", end + 2, end + 4 + _MOST_HEX)  # up to seven digits, then CRLF
        size = data[end + 2 : line]
        if line < 0 or not size or size.strip(_HEX_DIGITS):
            return None
        start = line + 2
        end = start + int(size, 16)


def _ends_at_close(headers: Headers) -> bool:
    return not any(name in (b"content-length", b"transfer-encoding") for name, _ in headers)
