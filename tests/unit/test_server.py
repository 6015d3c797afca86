"""server.py: a response head and its body leave in one write, in order (HeadHoldingTransport); the
connection hook (a lost client, a broken response, a streamed body written straight to the connection)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import httpx
import pytest
import uvicorn

from bastion import proxy, server
from bastion.app import create_app
from bastion.asgi import ConnectionHook, DisconnectWatch, Receive, Scope, Send, body_received, read_body
from bastion.config import Settings
from bastion.context import Exchange, Listener, Outcome
from bastion.engine.router import Backend, Router
from bastion.http import http1
from bastion.server import HeadHoldingTransport, guarded_protocol, server_config
from tests.support import TEST_KEY, content_length, free_port

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def holding(recorder: Recorder) -> HeadHoldingTransport:
    return HeadHoldingTransport(cast(asyncio.Transport, recorder), asyncio.get_running_loop())


async def test_head_and_body_leave_in_one_write() -> None:
    recorder = Recorder()
    transport = holding(recorder)
    transport.write(HEAD)
    assert recorder.writes == []
    transport.write(b"ok")
    assert recorder.writes == [HEAD + b"ok"]
    await asyncio.sleep(0)
    assert recorder.writes == [HEAD + b"ok"]  # the scheduled flush finds nothing left


async def test_a_lone_head_leaves_when_the_iteration_ends() -> None:
    recorder = Recorder()
    transport = holding(recorder)
    transport.write(HEAD)
    await asyncio.sleep(0)
    assert recorder.writes == [HEAD]
    transport.write(b"ok")  # a body written later goes on its own, after the head
    assert recorder.writes == [HEAD, b"ok"]


async def test_close_flushes_first_and_other_calls_pass_through() -> None:
    recorder = Recorder()
    transport = holding(recorder)
    transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    transport.close()
    assert recorder.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n"]
    assert recorder.closed and transport.is_closing()
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)


async def test_body_bytes_are_never_held() -> None:
    recorder = Recorder()
    transport = holding(recorder)
    transport.write(b"data: {}\n\n")
    assert recorder.writes == [b"data: {}\n\n"]


@contextlib.asynccontextmanager
async def real_server(
    upstream_port: int, *, listeners: Sequence[Listener] = (), **overrides: Any
) -> AsyncIterator[int]:
    """The gateway under bastion's own server (server_config), in this event loop; yields its port."""
    port = free_port()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_url=f"http://127.0.0.1:{upstream_port}", api_keys=TEST_KEY, port=port, audit_log="off",
        shutdown_grace=2, **overrides,
    )  # fmt: skip
    server = uvicorn.Server(server_config(create_app(settings, listeners=listeners), settings))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn's Server has no event for it)
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await serving


CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
STREAM_CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'  # the gateway adds usage


async def post_chat(
    port: int, limit: int = 2**16, sock: socket.socket | None = None, body: bytes = CHAT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if sock is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
    else:
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (TEST_KEY.encode(), len(body), body)
    )
    return reader, writer


async def test_a_client_that_leaves_mid_response_closes_the_upstream_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real server: the connection hook, not the receive() watcher (pushed out to 60 s here)."""
    monkeypatch.setattr(proxy, "DisconnectWatch", functools.partial(DisconnectWatch, delay=60.0))
    asked, upstream_closed = asyncio.Event(), asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        await reader.read()  # returns at EOF: the gateway closed the connection
        upstream_closed.set()
        writer.close()

    upstream = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    async with real_server(upstream.sockets[0].getsockname()[1]) as port:
        _, writer = await post_chat(port)
        await asyncio.wait_for(asked.wait(), 5)
        writer.close()
        await asyncio.wait_for(upstream_closed.wait(), 2)
    upstream.close()


async def test_a_body_that_breaks_after_the_head_closes_the_connection_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def half_a_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"id":')
        await writer.drain()
        writer.transport.abort()

    upstream = await asyncio.start_server(half_a_body, "127.0.0.1", 0)
    caplog.set_level(logging.INFO)
    async with real_server(upstream.sockets[0].getsockname()[1]) as port:
        reader, writer = await post_chat(port)
        received = await asyncio.wait_for(reader.read(), 5)  # to EOF: the gateway closed the connection
        writer.close()
    upstream.close()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b'{"id":')
    messages = [record.getMessage() for record in caplog.records]
    assert any("the upstream failed mid-response" in message for message in messages), messages
    assert not any("ASGI" in message for message in messages), messages  # uvicorn stayed quiet


@pytest.mark.parametrize("stream", [False, True], ids=["json", "pushed-stream"])
async def test_requests_leave_no_reference_cycles_behind(stream: bool) -> None:
    """A per-request reference cycle on the hot path is garbage only the collector frees: it cost ~35 µs a request."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(content_length(head))
                body = b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}'
                if stream:  # the head first, the event a moment later: it is pushed, not read
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
                                 % (len(body) + 8))  # fmt: skip
                    await writer.drain()
                    await asyncio.sleep(0.002)
                    writer.write(b"data: %s\n\n" % body)
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with real_server(upstream.sockets[0].getsockname()[1]) as port:

        async def one() -> None:
            reader, writer = await post_chat(port)
            if stream:
                assert b'"usage"' in await read_events(reader)
            else:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                await reader.readexactly(content_length(head))
            writer.close()
            await writer.wait_closed()

        for _ in range(10):  # warm-up: pools, caches
            await one()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(50):
                await one()
            await asyncio.sleep(0.1)
            gc.collect()
            kinds = {type(thing).__name__ for thing in gc.garbage}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    upstream.close()
    ours = {"RequestResponseCycle", "Exchange", "ConnectionHook", "DisconnectWatch", "Response", "Connection"}
    assert not kinds & ours, sorted(kinds)


def numbered_events(count: int, size: int = 0) -> list[bytes]:
    pad = b"x" * size
    return [b'data: {"n":%d,"choices":[{"delta":{"content":"%s"}}]}\n\n' % (n, pad) for n in range(count)]


def sse_upstream(events: list[bytes], pause: float = 0.0) -> Any:
    """Chat completions stream `events`; anything else (the gateway's health probes) gets a small JSON answer."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(content_length(head))
        if not head.startswith(b"POST /v1/chat/completions "):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in [*events, b"data: [DONE]\n\n"]:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return answer


async def _relayed(answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> bytes:
    """The events a streamed chat brings back through a real gateway in front of `answer`."""
    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with real_server(upstream.sockets[0].getsockname()[1]) as port:
        reader, writer = await post_chat(port)
        body = await asyncio.wait_for(read_events(reader), 10)
        writer.close()
    upstream.close()
    return body


async def read_events(reader: asyncio.StreamReader) -> bytes:
    """The decoded body of a chunked response, to its end."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    body = []
    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
        body.append((await reader.readexactly(size + 2))[:-2])
    await reader.readexactly(2)
    return b"".join(body)


async def test_a_stream_is_pushed_without_a_wake_up_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real server, an event stream goes from the upstream's data_received straight to the client:
    the relaying task wakes a few times per response, not once per event, and the bytes are the upstream's."""
    reads = 0
    read_some = http1.Response.read_some

    async def counted(self: http1.Response) -> bytes:
        nonlocal reads
        reads += 1
        return await read_some(self)

    monkeypatch.setattr(http1.Response, "read_some", counted)
    events = numbered_events(40)
    assert await _relayed(sse_upstream(events, pause=0.005)) == b"".join(events) + b"data: [DONE]\n\n"
    assert reads < 10, reads  # pulled: one read per event (41)


async def test_a_streams_tail_and_its_end_leave_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Events that arrive in one read are one write to the client (not one per chunk), and a read that also
    holds the upstream's end goes out with the gateway's end: the tail of a stream (last token, usage, [DONE],
    end marker: one segment from vLLM) is one write, and the bytes are the upstream's."""
    writes: list[bytes] = []

    class Counting:
        def __init__(self, transport: asyncio.Transport) -> None:
            self._transport = transport

        def write(self, data: bytes) -> None:
            writes.append(bytes(data))
            self._transport.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

    holding_init = HeadHoldingTransport.__init__

    def counted(self: HeadHoldingTransport, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        holding_init(self, cast(asyncio.Transport, Counting(transport)), loop)

    monkeypatch.setattr(HeadHoldingTransport, "__init__", counted)
    events = numbered_events(6)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(content_length(head))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        framed = [b"%x\r\n%s\r\n" % (len(event), event) for event in [*events, b"data: [DONE]\n\n"]]
        for chunk in (framed[0], framed[1], framed[2] + framed[3], framed[4], b"".join(framed[5:]) + b"0\r\n\r\n"):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.02)

    assert await _relayed(answer) == b"".join(events) + b"data: [DONE]\n\n"
    stream = [w for w in writes if b"data: " in w or w == b"0\r\n\r\n"]
    assert b"".join(stream).count(b"\r\n" + events[2]) == 1
    assert any(events[2] in w and events[3] in w for w in stream), stream  # one read, one write
    tail = events[5] + b"data: [DONE]\n\n"
    assert stream[-1] == b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail), stream  # the tail and the end: one write


async def test_a_size_line_split_across_reads_reaches_the_client_as_the_upstream_sent_it() -> None:
    """An upstream read that ends with the first digit of the next chunk's size (`1` of `15`), then one that
    holds the rest and the chunk's 0x15 bytes, which on their own also read as two whole chunks (5 bytes, 11
    bytes): the client gets the upstream's 0x15 bytes, not the 16 the fast path would take, and the end."""
    event = b"data: {}\n\n"
    inner = b"x: 1\n\r\nb\r\ndata: {1}\n\n"  # 0x15 bytes; as chunks, 5 (b"x: 1\n") then 0xb (b"data: {1}\n\n")
    assert len(inner) == 0x15

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(content_length(head))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        framed = b"%x\r\n%s\r\n" % (len(event), event)
        for chunk in (framed, framed + b"1", b"5\r\n" + inner + b"\r\n", framed, b"0\r\n\r\n"):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.03)

    assert await _relayed(answer) == event * 2 + inner + event


async def test_a_client_that_cannot_keep_up_gets_every_event_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the client's buffer is full the hook refuses to write, the proxy falls back to send (which waits),
    and pushing resumes after: nothing lost, nothing reordered, across the switches."""
    answers: list[bool] = []
    writable, write_framed = server.ChunkWriter.writable, server.ChunkWriter.write_framed

    def recorded(self: server.ChunkWriter) -> bool:
        answers.append(writable(self))
        return answers[-1]

    def recorded_framed(self: server.ChunkWriter, chunk: bytes) -> bool:  # the fast path: its own check
        answers.append(write_framed(self, chunk))
        return answers[-1]

    monkeypatch.setattr(server.ChunkWriter, "writable", recorded)
    monkeypatch.setattr(server.ChunkWriter, "write_framed", recorded_framed)
    events = numbered_events(6000, size=1000)  # ~6 MB: more than the kernel buffers between us hold
    upstream = await asyncio.start_server(sse_upstream(events), "127.0.0.1", 0)
    async with real_server(upstream.sockets[0].getsockname()[1]) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await post_chat(port, limit=2**23, sock=sock)
        writer.transport.pause_reading()  # a client that reads nothing for a while
        await asyncio.sleep(0.5)
        writer.transport.resume_reading()
        body = await asyncio.wait_for(read_events(reader), 20)
        writer.close()
    upstream.close()
    assert body == b"".join(events) + b"data: [DONE]\n\n"
    assert True in answers and False in answers, "both paths ran: pushed, and refused while the client was full"


def test_pushing_is_only_for_the_servers_own_send() -> None:
    """A stage that wrapped `send` (to see the body) must see every chunk: the writer is not offered then."""

    class Cycle:
        async def send(self, message: Any) -> None: ...

    cycle = Cycle()
    hook = ConnectionHook()
    hook.writer = server.ChunkWriter(weakref.ref(cycle))  # type: ignore[arg-type]

    async def wrapped(message: Any) -> None:
        await cycle.send(message)

    watch = object.__new__(DisconnectWatch)
    watch._hook = hook
    assert watch.body_writer(cycle.send) is hook.writer
    assert watch.body_writer(wrapped) is None


# --- the pushed relay on today's request path: accounting, the router's count, slow and leaving clients -------


class Watched:
    """What a pushed stream must keep: the chunks pushed (and refused), every exchange as the gateway finished
    it, and every backend the router counted a request in on (each must be counted out by the end)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pushed = 0
        self.refused = 0
        self.backends: list[Backend] = []
        self._exchanges: asyncio.Queue[Exchange] = asyncio.Queue()
        write, writable, acquire = server.ChunkWriter.write, server.ChunkWriter.writable, Router.acquire
        write_framed = server.ChunkWriter.write_framed

        def counted_write(writer: server.ChunkWriter, data: bytes) -> None:
            self.pushed += 1
            write(writer, data)

        def counted_write_framed(writer: server.ChunkWriter, chunk: bytes) -> bool:
            written = write_framed(writer, chunk)
            self.pushed += written
            self.refused += not written
            return written

        def counted_writable(writer: server.ChunkWriter) -> bool:
            answer = writable(writer)
            self.refused += not answer
            return answer

        def recorded_acquire(router: Router, *args: Any) -> Backend | None:
            backend = acquire(router, *args)
            if backend is not None:
                self.backends.append(backend)
            return backend

        monkeypatch.setattr(server.ChunkWriter, "write", counted_write)
        monkeypatch.setattr(server.ChunkWriter, "write_framed", counted_write_framed)
        monkeypatch.setattr(server.ChunkWriter, "writable", counted_writable)
        monkeypatch.setattr(Router, "acquire", recorded_acquire)

    def listener(self, exchange: Exchange) -> None:
        self._exchanges.put_nowait(exchange)

    async def finished(self) -> Exchange:
        return await asyncio.wait_for(self._exchanges.get(), 10)

    @property
    def released(self) -> bool:
        return bool(self.backends) and all(backend.outstanding == 0 for backend in self.backends)


def paced_upstream(events: list[bytes], closed: asyncio.Event, *, pause: float = 0.005, forever: bool = False) -> Any:
    """Chat completions stream `events` one write each, `pause` apart (so they arrive while the relay waits:
    pushed), then end; `forever` repeats them until the gateway closes the connection, which sets `closed`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(content_length(head))
        if not head.startswith(b"POST /v1/chat/completions "):  # the gateway's health probes
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        gone = asyncio.ensure_future(reader.read())  # returns at EOF: the gateway closed the connection
        sent = 0
        try:
            while not gone.done():
                if sent == len(events) and not forever:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    break
                event = events[sent % len(events)]
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                sent += 1
                if pause:
                    await asyncio.sleep(pause)
            await gone
        except ConnectionError:
            pass
        finally:
            gone.cancel()
            closed.set()
            writer.close()

    return answer


USAGE_EVENT = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":20,"total_tokens":27}}\n\n'


@pytest.mark.parametrize("usage", [True, False], ids=["usage", "no-usage"])
async def test_a_pushed_stream_is_read_for_usage_and_settled_like_a_pulled_one(
    monkeypatch: pytest.MonkeyPatch, usage: bool
) -> None:
    """Pushed chunks go through the usage tap: the usage event the gateway asked for is read and removed, the
    events are counted, a stream without usage is charged an estimate (and counted in the metric), and the
    router's count is given back."""
    watched = Watched(monkeypatch)
    events = numbered_events(20)
    closed = asyncio.Event()
    upstream = await asyncio.start_server(
        paced_upstream([*events, *([USAGE_EVENT] if usage else []), b"data: [DONE]\n\n"], closed), "127.0.0.1", 0
    )
    async with real_server(upstream.sockets[0].getsockname()[1], listeners=[watched.listener]) as port:
        reader, writer = await post_chat(port, body=STREAM_CHAT)
        body = await asyncio.wait_for(read_events(reader), 10)
        exchange = await watched.finished()
        writer.close()
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    upstream.close()
    assert body == b"".join(events) + b"data: [DONE]\n\n"  # the usage event the gateway asked for is not passed on
    assert watched.pushed >= 15, watched.pushed  # pushed, not read: the seam under test
    assert exchange.outcome is Outcome.OK and exchange.status == 200 and exchange.first_byte is not None
    assert exchange.events == 21
    estimated = 'bastion_usage_estimated_total{route="/v1/chat/completions"} 1.0'
    if usage:
        assert exchange.usage is not None and exchange.usage.total_tokens == 27
        assert not exchange.usage_estimated and estimated not in metrics
    else:
        assert exchange.usage is None and exchange.usage_estimated and estimated in metrics
    assert watched.released


async def test_a_client_that_leaves_a_pushed_stream_stops_the_upstream_and_is_accounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The events pushed before the client left are counted (a disconnect is charged by them), the upstream
    connection is closed at once (vLLM aborts the generation), and the router's count is given back."""
    watched = Watched(monkeypatch)
    closed = asyncio.Event()
    upstream = await asyncio.start_server(paced_upstream(numbered_events(10), closed, forever=True), "127.0.0.1", 0)
    async with real_server(upstream.sockets[0].getsockname()[1], listeners=[watched.listener]) as port:
        reader, writer = await post_chat(port, body=STREAM_CHAT)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        while watched.pushed < 20:  # noqa: ASYNC110 (counted by the writer, which has no event)
            await asyncio.sleep(0.01)
        writer.transport.abort()
        await asyncio.wait_for(closed.wait(), 2)
        exchange = await watched.finished()
    upstream.close()
    assert exchange.outcome is Outcome.CLIENT_DISCONNECT and exchange.status == 200
    assert exchange.events >= 20 and exchange.usage is None
    assert watched.released


async def test_a_client_that_stops_reading_a_pushed_stream_is_cut_by_the_write_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pushing stops when the client's buffer is full; the relay then waits in `send` and the write timeout
    still ends it: the connection aborted, the upstream closed, a client disconnect, the router's count back."""
    watched = Watched(monkeypatch)
    closed = asyncio.Event()
    events = numbered_events(10, size=1000)
    upstream = await asyncio.start_server(paced_upstream(events, closed, pause=0, forever=True), "127.0.0.1", 0)
    async with real_server(
        upstream.sockets[0].getsockname()[1], listeners=[watched.listener], client_write_timeout=0.5
    ) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        _, writer = await post_chat(port, sock=sock, body=STREAM_CHAT)
        writer.transport.pause_reading()  # a client that reads nothing
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(closed.wait(), 10)
        exchange = await watched.finished()
        waited = asyncio.get_running_loop().time() - started
        writer.close()
    upstream.close()
    assert watched.pushed > 0 and watched.refused > 0, (watched.pushed, watched.refused)  # pushed, then refused
    assert 0.5 <= waited < 5, waited
    assert exchange.outcome is Outcome.CLIENT_DISCONNECT and exchange.status == 200
    assert watched.released


async def test_the_server_says_when_a_body_is_already_whole_so_it_is_read_without_a_timer() -> None:
    """A body that arrived with its head is read with no timer; one still arriving keeps the read timeout."""
    seen: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen.append(body_received(scope))
        body = await read_body(receive, 1024, None, 5.0)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=guarded_protocol(5.0, 8192), lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn's Server has no event for it)
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\n\r\n"
        writer.write(head + b"whol")
        assert (await asyncio.wait_for(reader.readuntil(b"whol"), 5)).endswith(b"\r\n\r\nwhol")
        writer.write(head + b"pa")  # half the body: reading it may wait, so the timer stays
        await asyncio.sleep(0.05)
        writer.write(b"rt")
        assert (await asyncio.wait_for(reader.readuntil(b"part"), 5)).endswith(b"\r\n\r\npart")
        writer.close()
        assert seen == [True, False]
    finally:
        server.should_exit = True
        await serving
