"""The upstream HTTP/1.1 client (upstream.http1, upstream.pool) against real sockets on 127.0.0.1 that answer on cue."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from bastion.errors import upstream_failure
from bastion.http import Client, Timeouts, http1
from bastion.http.pool import Pool
from tests.support import content_length, make_cert

# (request number on this connection, request head+body, writer) -> keep the connection open?
Answer = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]
FAST = http1.Timeouts(connect=1.0, read=1.0, write=1.0, pool=1.0)


class KeepAliveServer:
    """Serves many requests per connection; counts connections and requests."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # a client closed a connection
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> KeepAliveServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    def pool(
        self, max_connections: int = 8, timeouts: http1.Timeouts = FAST, tls: ssl.SSLContext | None = None
    ) -> Pool:
        return Pool(
            "127.0.0.1", self.port, ssl_context=tls, timeouts=timeouts, max_connections=max_connections,
            keepalive_expiry=30,
        )  # fmt: skip

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
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
            self.closed.set()
            writer.close()


def ok(body: bytes = b"{}") -> Answer:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        return True

    return answer


async def test_a_connection_is_reused_and_the_request_is_well_formed() -> None:
    async with KeepAliveServer(ok(b"hello")) as server:
        pool = server.pool()
        for _ in range(3):
            response = await pool.open(b"POST", b"/v1/x?a=1", [(b"x-test", b"1")], b'{"a":1}')
            assert (response.status, await response.read()) == (200, b"hello")
            response.release()
        assert server.connections == 1
        assert server.requests[0] == (
            b'POST /v1/x?a=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nx-test: 1\r\ncontent-length: 7\r\n\r\n{"a":1}'
            % server.port
        )
        pool.close()


async def test_chunks_are_handed_over_as_they_arrive() -> None:
    gate = asyncio.Event()

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await gate.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response = await pool.open(b"GET", b"/", [], b"")
        assert await response.read_some() == b"first"  # before the rest was even written
        gate.set()
        assert await response.read_some() == b"second"
        assert await response.read_some() == b""
        response.release()
        pool.close()


async def test_a_body_that_ends_with_the_connection_is_complete() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        writer.close()
        return False

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response = await pool.open(b"GET", b"/", [], b"")
        assert await response.read() == b"all of it"
        response.release()
        pool.close()


async def test_informational_responses_are_skipped_and_head_has_no_body() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if request.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response = await pool.open(b"POST", b"/", [], b"x")
        assert (response.status, await response.read()) == (201, b"ok")
        response.release()
        response = await pool.open(b"HEAD", b"/", [], b"")
        assert (response.status, await response.read()) == (200, b"")
        response.release()
        pool.close()


async def test_bytes_beyond_the_response_end_the_connection() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" * 2)  # one request, two answers
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response = await pool.open(b"GET", b"/", [], b"")
        assert await response.read() == b"ok"
        response.release()
        again = await pool.open(b"GET", b"/", [], b"")
        assert await again.read() == b"ok"
        again.release()
        assert server.connections == 2  # the confused connection was not reused
        pool.close()


async def test_a_stale_kept_alive_connection_is_retried_once_on_a_new_one() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if number == 1:  # the second request on a connection: closed unanswered, as an idle timeout would
            writer.transport.abort()
            return False
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        for _ in range(2):
            response = await pool.open(b"POST", b"/", [], b"{}")
            assert await response.read() == b"ok"
            response.release()
        assert server.connections == 2
        assert len(server.requests) == 3  # the second POST was sent twice: once lost, once answered
        pool.close()


async def test_a_fresh_connection_closed_unanswered_is_not_retried() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.transport.abort()
        return False

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        with pytest.raises(http1.RemoteProtocolError):
            await pool.open(b"POST", b"/", [], b"{}")
        assert len(server.requests) == 1
        pool.close()


async def test_garbage_is_a_protocol_error() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        with pytest.raises(http1.RemoteProtocolError):
            await pool.open(b"GET", b"/", [], b"")
        pool.close()


async def test_silence_is_a_read_timeout_and_closes_the_connection() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        return True  # never answers

    async with KeepAliveServer(answer) as server:
        pool = server.pool(timeouts=http1.Timeouts(connect=1, read=0.2, write=1, pool=1))
        with pytest.raises(http1.ReadTimeout):
            await pool.open(b"GET", b"/", [], b"")
        await asyncio.wait_for(server.closed.wait(), 2)
        pool.close()


async def test_the_read_timeout_bounds_silence_not_the_whole_response() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, never silent for 0.25 s
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
        await asyncio.sleep(0.5)  # then silent for longer than the read timeout
        writer.write(b"0\r\n\r\n")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool(timeouts=http1.Timeouts(connect=1, read=0.25, write=1, pool=1))
        response = await pool.open(b"GET", b"/", [], b"")
        received = b""
        with pytest.raises(http1.ReadTimeout):
            while chunk := await response.read_some():
                received += chunk
        assert received == b"x" * 6
        response.close()
        pool.close()


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        pool = Pool("127.0.0.1", port, ssl_context=None, timeouts=FAST, max_connections=1, keepalive_expiry=30)
        with pytest.raises(http1.ConnectError):
            await pool.open(b"GET", b"/", [], b"")
        with pytest.raises(http1.ConnectError):  # the failed attempt gave its slot back
            await pool.open(b"GET", b"/", [], b"")


async def test_the_pool_waits_for_a_free_connection_then_times_out() -> None:
    async with KeepAliveServer(ok(b"ok")) as server:
        pool = server.pool(max_connections=1, timeouts=http1.Timeouts(connect=1, read=1, write=1, pool=0.2))
        first = await pool.open(b"GET", b"/", [], b"")
        with pytest.raises(http1.PoolTimeout):
            await pool.open(b"GET", b"/", [], b"")
        waiting = asyncio.create_task(pool.open(b"GET", b"/", [], b""))
        await asyncio.sleep(0.05)
        assert await first.read() == b"ok"
        first.release()  # hands the connection to the waiting request
        second = await asyncio.wait_for(waiting, 1)
        assert await second.read() == b"ok"
        second.release()
        assert server.connections == 1
        pool.close()


async def test_closing_mid_body_closes_the_connection_and_frees_its_slot() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool(max_connections=1)
        response = await pool.open(b"GET", b"/", [], b"")
        assert await response.read_some() == b"first"
        response.close()
        await asyncio.wait_for(server.closed.wait(), 2)  # the upstream sees the disconnect
        again = await pool.open(b"GET", b"/", [], b"")  # the slot is free again
        again.close()
        pool.close()


async def test_a_large_body_is_received_whole_with_flow_control(monkeypatch: pytest.MonkeyPatch) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, more than the read-pause threshold
    calls: list[str] = []
    for name in ("pause_reading", "resume_reading"):
        original = getattr(http1.Connection, name)
        monkeypatch.setattr(http1.Connection, name, lambda self, _o=original, _n=name: (calls.append(_n), _o(self))[1])

    async with KeepAliveServer(ok(body)) as server:
        pool = server.pool()
        response = await pool.open(b"POST", b"/", [], body)
        assert server.requests and len(server.requests[0]) > len(body)
        await asyncio.sleep(0.1)  # the unread body fills the buffer: the connection stops reading
        assert calls == ["pause_reading"]
        assert await response.read() == body
        assert calls[:2] == ["pause_reading", "resume_reading"]
        response.release()
        pool.close()


async def test_a_line_break_in_a_header_is_refused() -> None:
    async with KeepAliveServer(ok()) as server:
        pool = server.pool()
        with pytest.raises(ValueError):
            await pool.open(b"GET", b"/", [(b"x-a", b"1\r\nx-injected: 1")], b"")
        assert server.requests == []
        pool.close()


async def test_httpx_runs_over_the_pool_with_its_errors_and_timeouts() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/slow" not in request:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    async with KeepAliveServer(answer) as server, _client() as client:
        base = f"http://127.0.0.1:{server.port}"
        reply = await client.http.get(base + "/health")
        assert (reply.status_code, reply.text) == (200, "ok")
        with pytest.raises(httpx.ReadTimeout) as raised:
            await client.http.get(base + "/slow", timeout=0.2)
        assert upstream_failure(raised.value).status == 504
        response = await client.open("GET", base, b"/v1/models", [], b"")  # the hot path shares the pool
        assert await response.read() == b"ok"
        response.release()
        assert server.connections <= 2


async def test_https_upstreams_are_verified(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    async with KeepAliveServer(ok(b"secret"), tls=server_side) as server:
        trusting = server.pool(tls=ssl.create_default_context(cafile=str(cert)))
        response = await trusting.open(b"GET", b"/", [], b"")
        assert await response.read() == b"secret"
        response.release()
        trusting.close()
        async with _client() as client:  # the system's CAs: a self-signed upstream is refused
            with pytest.raises(http1.ConnectError):
                await client.open("GET", f"https://127.0.0.1:{server.port}", b"/", [], b"")
        assert b"host: 127.0.0.1:%d" % server.port in server.requests[0]


async def test_failures_map_to_gateway_statuses() -> None:
    assert upstream_failure(http1.ConnectError("x")).status == 502
    busy = upstream_failure(http1.PoolTimeout("x"))
    assert (busy.status, busy.code, busy.headers) == (503, "upstream_busy", [(b"retry-after", b"1")])
    assert upstream_failure(http1.ConnectTimeout("x")).status == 502
    assert upstream_failure(http1.ReadTimeout("x")).code == "upstream_timeout"
    assert upstream_failure(http1.RemoteProtocolError("x")).status == 502


def _client() -> Client:
    return Client(timeouts=Timeouts(connect=5, read=600, write=60, pool=30), max_connections=1024, keepalive_expiry=30)
