"""uvicorn, with the bounds on slow and oversized request heads that it lacks, and two hooks.

uvicorn arms its keep-alive timer only after a response: a fresh connection that
sends nothing, or sends its headers one byte at a time (slowloris), is kept
forever, and httptools buffers a request head of any size. `guarded_protocol`
returns uvicorn's httptools protocol with these additions:

- a head timeout, armed when a connection opens and again when a response ends
  (waiting for the next request), disarmed when the headers are complete: a
  connection whose head is not in within it is closed (408 if it sent anything);
- a head size limit: a head past `max_header_bytes` gets 431 and is closed, whether
  it is still incomplete (counted as received) or parsed (counted per header);
- a write timeout: a client that stops reading (its connection's write buffer stays
  paused, above the high-water mark) for `write_timeout` seconds has its connection
  aborted. Without it a stream nobody reads holds its concurrency slot and the vLLM
  sequence forever; the abort goes through `connection_lost`, so the request hook
  stops the upstream and the exchange ends as a client disconnect;
- a `ConnectionHook` on every request's scope: its `on_lost` is called from
  `connection_lost` while the response is unfinished, so the proxy stops a generation
  the moment its client goes (asgi.DisconnectWatch) without a watcher task per request;
  its `abort` ends a response that broke after it started with one closed connection
  and the proxy's own log line, not uvicorn's "Exception in ASGI application" traceback;
  its `writer` (`ChunkWriter`) puts a chunk of a started chunked response straight on
  the transport (the proxy's relay of a stream, with no ASGI `send` per chunk), whenever
  uvicorn's own `send` would write it at once: not after the end, not for HEAD, never
  while the client's buffer is full (then the proxy falls back to `send`, which waits);
- `HeadHoldingTransport`, so a response's head and body leave in one write.

The body is bounded separately, by `client_body_timeout` in `asgi.read_body`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import weakref
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .asgi import CONNECTION_HOOK, ASGIApp, ConnectionHook
from .config import Settings

log = logging.getLogger("bastion.server")


class HeadHoldingTransport:
    """The connection's transport, holding a response head back for the rest of the loop iteration.

    uvicorn writes a response's head and its body with two `transport.write` calls, so every
    response cost two syscalls (and, on loopback, two wake-ups of the reader). A head is held
    until the next write (the body, normally in the same iteration) or until the iteration
    ends (`call_soon`), whichever comes first, so the head and body leave in one write
    and nothing waits longer than one iteration. Writes are never reordered.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing and uvicorn calls `send_400_response`."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout = 10.0
    max_header_bytes = 64 * 1024
    write_timeout = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = False
        # The response went out before its request's body had all arrived (a 401 to a large upload): the rest
        # of that body is still coming, and is neither the next head's bytes nor its slowness.
        self._draining = False
        self._received = 0  # bytes received while the head was incomplete
        self._head_size = 0  # bytes of the current head, as parsed

    # --- the head timer -------------------------------------------------------------
    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._awaiting_head = True
        self._received = self._head_size = 0
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self.transport.is_closing():
            if self._received:
                self._reject(b"408 Request Timeout", b"Request headers not received in time.")
            else:
                self.transport.close()

    def _reject(self, status: bytes, message: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, len(message), message)
        )
        self.transport.close()

    # --- the write timer ------------------------------------------------------------
    def pause_writing(self) -> None:
        """The transport's buffer is full: the client has this long to read some of it."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._write_too_slow)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_too_slow(self) -> None:
        self._write_timer = None
        if self.flow.write_paused:
            log.info(
                "connection from %s closed: it read nothing for %gs (BASTION_CLIENT_WRITE_TIMEOUT)",
                self.client[0] if self.client else "?",
                self.write_timeout,
            )
            # abort, not close: close() would wait for a buffer this client never reads.
            self.transport.abort()

    # --- uvicorn's hooks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = cast(asyncio.Transport, HeadHoldingTransport(transport, self.loop))
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_write_timer()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            hook: ConnectionHook | None = cycle.scope.get(CONNECTION_HOOK)  # type: ignore[assignment]
            if hook is not None and hook.on_lost is not None:
                hook.on_lost()  # the proxy stops waiting on the upstream at once

    def data_received(self, data: bytes) -> None:
        awaiting = self._awaiting_head and not self._draining
        if awaiting:
            self._received += len(data)
        super().data_received(data)
        if (
            awaiting
            and self._awaiting_head
            and self._received > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._reject(b"431 Request Header Fields Too Large", b"Request headers too large.")

    def on_message_begin(self) -> None:
        self._head_size = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._grow_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # `_grow_head` inline: this runs for every header of every request.
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_header_bytes:
            raise HeadTooLarge
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if self._head_size > self.max_header_bytes:
            self._reject(b"431 Request Header Fields Too Large", b"Request headers too large.")
        else:
            super().send_400_response(msg)

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.max_header_bytes:
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        hook = ConnectionHook()
        self.scope[CONNECTION_HOOK] = hook  # type: ignore[literal-required]
        super().on_headers_complete()
        # A weak reference: cycle -> scope -> hook -> cycle would make every request a reference
        # cycle, left for the garbage collector (measured: ~35 µs more CPU per request).
        cycle = weakref.ref(self.cycle)
        hook.abort = functools.partial(_abort, cycle)
        hook.writer = ChunkWriter(cycle)
        hook.body_received = functools.partial(_body_received, cycle)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._draining:  # the previous request's body is all in: the next head's time starts now
            self._draining = False
            if self._awaiting_head:
                self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle, waiting for the next request's head
            self._await_head()
            # Still draining the request's body: counted as head bytes it drew a 431 (or a 408) written after
            # the response, read by the client as the answer to its next request. Draining past the head
            # timeout still closes the connection (plainly: nothing is counted).
            self._draining = self.cycle.more_body


def _abort(ref: weakref.ref[RequestResponseCycle]) -> None:
    """Close the connection of a response that cannot be finished, marked so uvicorn does not log it again."""
    cycle = ref()
    if cycle is not None:
        cycle.disconnected = True  # else: "ASGI callable returned without completing response."
        cycle.transport.close()


def _body_received(ref: weakref.ref[RequestResponseCycle]) -> bool:
    """The message is complete and not yet read, so `receive()` returns without waiting."""
    cycle = ref()
    return cycle is not None and not cycle.more_body and cycle.message_event.is_set()


class ChunkWriter:
    """A streamed body's chunks straight onto the connection, framed as uvicorn's `send` frames them.

    Only when `send` would write at once: the response started chunked (not HEAD), is not done,
    the client is there and its write buffer is not full (then `send` waits, and so must the caller).
    """

    __slots__ = ("_cycle",)

    def __init__(self, cycle: weakref.ref[RequestResponseCycle]) -> None:
        self._cycle = cycle

    def serves(self, send: Any) -> bool:
        return getattr(send, "__self__", None) is self._cycle()

    def writable(self) -> bool:
        cycle = self._cycle()
        return (
            cycle is not None
            and cycle.chunked_encoding is True  # started, chunked, not HEAD
            and not cycle.response_complete
            and not cycle.disconnected
            and not cycle.flow.write_paused
        )

    def started(self) -> bool:
        cycle = self._cycle()
        return cycle is None or cycle.response_started or cycle.disconnected

    def write(self, data: bytes) -> None:
        cycle = self._cycle()
        if cycle is not None:
            transport: Any = cycle.transport
            if type(transport) is HeadHoldingTransport and transport._held is None:
                transport = transport._transport  # the head is out: nothing to hold, one call less per chunk
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def write_framed(self, chunk: bytes) -> bool:
        # `writable` and `write` in one call, for bytes framed already (a relay's fast path: one frame per chunk).
        cycle = self._cycle()
        if (
            cycle is None
            or cycle.chunked_encoding is not True
            or cycle.response_complete
            or cycle.disconnected
            or cycle.flow.write_paused
        ):
            return False
        transport: Any = cycle.transport
        if type(transport) is HeadHoldingTransport and transport._held is None:
            transport = transport._transport
        transport.write(chunk)
        return True


def guarded_protocol(
    header_timeout: float, max_header_bytes: int, write_timeout: float = 60.0
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with these bounds (uvicorn instantiates it per connection)."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes, "write_timeout": write_timeout},
    )


def server_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.client_header_timeout, settings.max_header_bytes, settings.client_write_timeout),
        log_config=None,
        access_log=False,
        log_level=settings.log_level,
        lifespan="on",
        proxy_headers=False,  # client IPs are resolved by bastion's own trusted-proxy rules
        server_header=False,
        # An idle keep-alive connection is closed by the head timer (client_header_timeout), not by uvicorn's
        # own 5 s: httpx and the openai SDK drop an idle connection after 5 s too, and at the same 5 s a
        # request can go out on a connection the server is closing.
        timeout_keep_alive=math.ceil(settings.client_header_timeout) + 1,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )
