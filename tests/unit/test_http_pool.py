"""The pool's rules (`bastion.http.pool`) on real sockets: a request is written once, stale connections are
dropped before use, capacity is derived from state and survives every failure, idle connections are capped,
`close` ends everything, waiters hand over in order, and a second client is independent of the first."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest

from bastion.http import Client, HTTPError, PoolClosed, Timeouts, http1
from bastion.http.pool import Pool
from tests.unit.http_server import FAST, KeepAliveServer, ok, refusing_port, streaming, unaccepting_port

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def _get(pool: Pool, method: bytes = b"GET", body: bytes = b"") -> bytes:
    response = await pool.open(method, b"/", [], body)
    data = await response.read()
    response.release()
    return data


async def _hold(pool: Pool, count: int) -> list[http1.Response]:
    """`count` responses open at once (heads in, bodies unread): as many busy connections."""
    return list(await asyncio.gather(*(pool.open(b"GET", b"/", [], b"") for _ in range(count))))


async def _settled(pool: Pool) -> None:
    """Let the event loop run the callbacks of connections closing (connection_lost)."""
    for _ in range(5):
        await asyncio.sleep(0)


# --- 1. a request is written once; a stale idle connection is dropped before use ----------------
class _EndingUpstream(threading.Thread):
    """A blocking upstream in its own thread, so that it acts while our event loop is held still.

    It answers a first request, then on cue ends that kept-alive connection while still reading it:
    a FIN (half-close), or an unsolicited 408 as some servers send on an idle timeout. A second
    connection is answered normally. It records what reached it on the ended connection.
    """

    def __init__(self, how: str) -> None:
        super().__init__(daemon=True)
        self.how = how
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(2)
        self.port = self.listener.getsockname()[1]
        self.cue = threading.Event()
        self.on_ended = b"?"  # what arrived on the ended connection
        self.on_second = b""  # the request on the second connection

    def run(self) -> None:
        with self.listener:
            first, _ = self.listener.accept()
            with first:
                first.settimeout(2)
                _read_request(first)
                first.sendall(OK)
                self.cue.wait(2)
                if self.how == "fin":
                    first.shutdown(socket.SHUT_WR)
                else:
                    first.sendall(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                with contextlib.suppress(OSError):
                    second, _ = self.listener.accept()
                    with second:
                        second.settimeout(2)
                        self.on_second = _read_request(second)
                        second.sendall(OK)
                        second.recv(1)  # until the client closes
                first.settimeout(0.5)
                try:
                    self.on_ended = first.recv(65536)
                except TimeoutError:
                    self.on_ended = b"(nothing, still open)"
                except OSError:
                    self.on_ended = b""


def _read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    return data


@pytest.mark.parametrize("how", ["fin", "unsolicited 408"])
async def test_an_idle_connection_the_upstream_ended_is_dropped_before_anything_is_written(how: str) -> None:
    """The upstream ends a kept-alive connection (FIN, or an unsolicited 408) after its response was read, and
    our event loop has not run since: the socket is readable, so the pool drops the connection without writing
    on it, and the POST reaches the upstream once, on a new connection (before: sent on the ended one too)."""
    upstream = _EndingUpstream(how)
    upstream.start()
    pool = Pool("127.0.0.1", upstream.port, ssl_context=None, timeouts=FAST, max_connections=4, keepalive_expiry=30)
    assert await _get(pool) == b"ok"
    upstream.cue.set()
    time.sleep(0.1)  # noqa: ASYNC251 - the FIN or 408 lands in our socket; the loop must not run meanwhile
    assert await _get(pool, b"POST", b'{"n":1}') == b"ok"
    pool.close()
    await asyncio.to_thread(upstream.join, 5)
    assert upstream.on_second.startswith(b"POST")
    assert upstream.on_ended == b""  # closed by us, and nothing written on it


async def test_a_request_written_on_a_connection_that_closes_unanswered_is_never_resent() -> None:
    """Four kept-alive connections, each closed by the upstream after reading its next request: the POST is
    written once, and its failure is the caller's `RemoteProtocolError` (it was sent up to 5 times before)."""
    holding = asyncio.Event()

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if number == 0:
            await holding.wait()  # keep all four busy at once, so that four connections open
            writer.write(OK)
            return True
        writer.transport.abort()  # read it, then close without a word
        return False

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        gets = asyncio.gather(*(_get(pool) for _ in range(4)))
        await asyncio.sleep(0.1)
        holding.set()
        assert await gets == [b"ok"] * 4
        assert (server.connections, pool.idle) == (4, 4)
        with pytest.raises(http1.RemoteProtocolError, match="without answering"):
            await pool.open(b"POST", b"/", [], b'{"n":1}')
        assert sum(r.startswith(b"POST") for r in server.requests) == 1
        assert server.connections == 4  # no new connection was opened to resend it
        pool.close()


async def test_an_idle_connection_past_its_expiry_is_not_reused() -> None:
    async with KeepAliveServer(ok(b"ok")) as server:
        pool = server.pool(keepalive_expiry=0.05)
        assert await _get(pool) == b"ok"
        await asyncio.sleep(0.1)
        assert await _get(pool) == b"ok"
        assert server.connections == 2
        await asyncio.wait_for(server.closed.wait(), 2)  # the expired one was closed
        pool.close()


# --- 2 and 7. capacity is derived from state and stays right under every failure ----------------
async def _assert_capacity(pool: Pool, server: KeepAliveServer, limit: int) -> None:
    """Of `limit` + 1 requests at once, exactly `limit` get a connection (the upstream never sees more open)
    and one times out waiting; the pool counts what is open, and nothing once all are closed."""
    short = Timeouts(connect=1, read=1, write=1, pool=0.2)
    results = await asyncio.gather(
        *(pool.open(b"GET", b"/", [], b"", short) for _ in range(limit + 1)), return_exceptions=True
    )
    held = [result for result in results if isinstance(result, http1.Response)]
    try:
        assert server.most_open <= limit
        assert (len(held), pool.connections) == (limit, limit)
        assert [type(result) for result in results if not isinstance(result, http1.Response)] == [http1.PoolTimeout]
    finally:
        for response in held:
            response.close()
    await server.all_closed()
    assert pool.connections == 0


async def test_cancelled_connects_never_let_the_pool_exceed_its_limit() -> None:
    """A connect cancelled at every step of its progress (before, during and after the loop's connection_made)
    frees its place exactly once: the count once went below zero and the pool then opened more than its max."""
    async with KeepAliveServer(streaming) as server:
        pool = server.pool(max_connections=2)
        for steps in range(16):
            for _ in range(3):
                task = asyncio.create_task(pool.open(b"GET", b"/", [], b""))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    (await task).close()  # it finished before the cancel came
        await server.all_closed()
        await _assert_capacity(pool, server, 2)
        pool.close()


async def test_connect_timeouts_and_refusals_give_their_place_back() -> None:
    timeouts = Timeouts(connect=0.1, read=1, write=1, pool=0.1)
    with unaccepting_port() as port:
        pool = Pool("127.0.0.1", port, ssl_context=None, timeouts=timeouts, max_connections=2, keepalive_expiry=30)
        for _ in range(3):
            attempts = (pool.open(b"GET", b"/", [], b"") for _ in range(2))
            results = await asyncio.gather(*attempts, return_exceptions=True)
            assert all(isinstance(result, http1.ConnectTimeout) for result in results)
            assert pool.connections == 0
        pool.close()
    with refusing_port() as port:
        pool = Pool("127.0.0.1", port, ssl_context=None, timeouts=timeouts, max_connections=1, keepalive_expiry=30)
        for _ in range(3):  # never a PoolTimeout: each refused attempt gave its place back
            with pytest.raises(http1.ConnectError):
                await pool.open(b"GET", b"/", [], b"")
            assert pool.connections == 0
        pool.close()


async def test_a_waiting_caller_cancelled_leaves_no_trace() -> None:
    async with KeepAliveServer(ok(b"ok")) as server:
        pool = server.pool(max_connections=1)
        (first,) = await _hold(pool, 1)
        waiting = [asyncio.create_task(pool.open(b"GET", b"/", [], b"")) for _ in range(3)]
        await asyncio.sleep(0.05)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert await first.read() == b"ok"
        first.release()
        assert (pool.connections, pool.idle) == (1, 1)
        assert await asyncio.wait_for(_get(pool), 1) == b"ok"  # at once: no dead waiter was served first
        assert server.connections == 1
        await _assert_capacity(pool, server, 1)
        pool.close()


async def test_the_peer_closing_mid_response_frees_the_place() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/break" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            await writer.drain()
            writer.transport.abort()
            return False
        return await streaming(number, request, writer)

    async with KeepAliveServer(answer) as server:
        pool = server.pool(max_connections=2)
        for _ in range(3):
            responses = await asyncio.gather(*(pool.open(b"GET", b"/break", [], b"") for _ in range(2)))
            for response in responses:
                with pytest.raises(http1.RemoteProtocolError, match="before the response ended"):
                    await response.read()
                response.release()
        await _settled(pool)
        assert pool.connections == 0
        await _assert_capacity(pool, server, 2)
        pool.close()


# --- 4. the idle cap --------------------------------------------------------------------
async def test_at_most_max_keepalive_idle_connections_are_kept() -> None:
    async with KeepAliveServer(ok(b"ok")) as server:
        pool = server.pool(max_connections=4, max_keepalive=2)
        held = await _hold(pool, 4)
        for response in held:
            assert await response.read() == b"ok"
            response.release()
        assert (pool.connections, pool.idle) == (2, 2)
        await asyncio.wait_for(server.closed.wait(), 2)  # the extra two were closed
        assert server.open_now == 2
        for _ in range(4):  # the kept ones are reused
            assert await _get(pool) == b"ok"
        assert server.connections == 4
        pool.close()


async def test_the_client_passes_the_idle_cap_to_its_pools() -> None:
    async with KeepAliveServer(ok(b"ok")) as server:
        timeouts = Timeouts(connect=1, read=1, write=1, pool=1)
        async with Client(timeouts=timeouts, max_connections=3, max_keepalive=1, keepalive_expiry=30) as client:
            held = await asyncio.gather(*(client.open("GET", server.base, b"/", [], b"") for _ in range(3)))
            for response in held:
                await response.read()
                response.release()
            pool = client.pool("http", "127.0.0.1", server.port)
            assert (pool.connections, pool.idle) == (1, 1)


# --- 5. close() ends everything -------------------------------------------------------------
async def test_close_ends_busy_connections_and_waiters_cleanly() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/stream" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")  # then nothing
        elif b"/quick" in request:
            writer.write(OK)
        return True  # anything else: never answered

    async with KeepAliveServer(answer) as server:
        pool = server.pool(max_connections=3, timeouts=Timeouts(connect=5, read=30, write=30, pool=30))
        response = await pool.open(b"GET", b"/quick", [], b"")
        assert await response.read() == b"ok"
        response.release()  # one idle
        streaming = await pool.open(b"GET", b"/stream", [], b"")
        assert await streaming.read_some() == b"first"
        reading = asyncio.create_task(streaming.read_some())  # busy mid-body
        heading = asyncio.create_task(pool.open(b"GET", b"/silent", [], b""))  # busy before its head
        await asyncio.sleep(0.05)
        extra = asyncio.create_task(pool.open(b"GET", b"/silent", [], b""))  # takes the idle one
        waiter = asyncio.create_task(pool.open(b"GET", b"/silent", [], b""))  # waits for a free connection
        await asyncio.sleep(0.05)
        assert pool.connections == 3
        pool.close()
        for task in (reading, heading, extra, waiter):
            with pytest.raises(PoolClosed):
                await asyncio.wait_for(task, 1)  # promptly, with an HTTPError, never hanging
        await server.all_closed()
        assert pool.connections == 0
        with pytest.raises(PoolClosed):
            await pool.open(b"GET", b"/quick", [], b"")


async def test_leaving_the_client_closes_a_response_still_streaming() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        return True

    async with KeepAliveServer(answer) as server:
        async with Client(timeouts=FAST, max_connections=2, keepalive_expiry=30) as client:
            response = await client.open("GET", server.base, b"/", [], b"")
            assert await response.read_some() == b"first"
        with pytest.raises(HTTPError):
            await asyncio.wait_for(response.read_some(), 1)
        await server.all_closed()


# --- 6. waiters hand over on timeout and cancellation, deterministically -----------------------
async def test_a_connection_handed_to_a_waiter_that_is_cancelled_goes_to_the_next() -> None:
    async with KeepAliveServer(ok(b"ok")) as server:
        pool = server.pool(max_connections=1)
        (first,) = await _hold(pool, 1)
        assert await first.read() == b"ok"
        second = asyncio.create_task(pool.open(b"GET", b"/", [], b""))
        third = asyncio.create_task(pool.open(b"GET", b"/", [], b""))
        await asyncio.sleep(0.05)
        first.release()  # hands the connection to `second`...
        second.cancel()  # ...which is cancelled before it could run: it must pass the connection on
        with pytest.raises(asyncio.CancelledError):
            await second
        response = await asyncio.wait_for(third, 1)
        assert await response.read() == b"ok"
        response.release()
        assert (server.connections, pool.connections) == (1, 1)
        pool.close()


async def test_a_connection_handed_to_a_waiter_whose_time_ran_out_goes_to_the_next() -> None:
    async with KeepAliveServer(ok(b"ok")) as server:
        pool = server.pool(max_connections=1)
        (first,) = await _hold(pool, 1)
        assert await first.read() == b"ok"
        second = asyncio.create_task(pool.open(b"GET", b"/", [], b"", Timeouts(connect=1, read=1, write=1, pool=0.1)))
        third = asyncio.create_task(pool.open(b"GET", b"/", [], b""))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # both wait
        time.sleep(0.15)  # noqa: ASYNC251 - `second`'s pool timeout falls due; the loop must not run meanwhile
        await asyncio.sleep(0)  # this loop turn runs us first, then `second`'s due timeout
        first.release()  # so the connection is handed to `second` just before its timeout cancels it
        with pytest.raises(http1.PoolTimeout):
            await second
        response = await asyncio.wait_for(third, 1)
        assert await response.read() == b"ok"
        response.release()
        assert (server.connections, pool.connections) == (1, 1)
        pool.close()


# --- a second client is a dedicated channel -----------------------------------------------
async def test_a_second_small_client_answers_while_the_first_is_saturated() -> None:
    """What a probe channel needs: a second small Client to the same origin never waits behind the first."""

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/health" in request:
            writer.write(OK)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")  # a long stream
        return True

    timeouts = Timeouts(connect=1, read=30, write=1, pool=0.2)
    async with (
        KeepAliveServer(answer) as server,
        Client(timeouts=timeouts, max_connections=2, keepalive_expiry=30) as traffic,
        Client(timeouts=timeouts, max_connections=1, keepalive_expiry=30) as probes,
    ):
        streams = [await traffic.open("POST", server.base, b"/v1/chat", [], b"{}") for _ in range(2)]
        with pytest.raises(http1.PoolTimeout):
            await traffic.open("GET", server.base, b"/health", [], b"")
        started = time.monotonic()
        for _ in range(3):
            reply = await probes.http.get(server.base + "/health")
            assert (reply.status_code, reply.text) == (200, "ok")
        assert time.monotonic() - started < 0.2  # never waited for the pool timeout
        assert server.connections == 3
        for stream in streams:
            stream.close()
