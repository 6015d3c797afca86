"""HTTP/1.1's odd corners in the client (`bastion.http.http1`), on real sockets, held to httpcore's behaviour:
HEAD responses, 1xx informational responses, a 101 upgrade, trailers after a chunked body."""

from __future__ import annotations

import asyncio

import pytest

from bastion.http import http1
from tests.unit.http_server import KeepAliveServer


async def test_a_head_response_leaves_the_connection_reusable() -> None:
    """A HEAD response announces a body (content-length or chunked) that never comes: it ends with its head,
    and the connection serves the next request (before, every HEAD closed its connection)."""

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if request.startswith(b"HEAD /chunked"):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        elif request.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        for method, target, expected in [
            (b"HEAD", b"/", b""),
            (b"HEAD", b"/chunked", b""),
            (b"GET", b"/", b"ok"),
            (b"HEAD", b"/", b""),
            (b"GET", b"/", b"ok"),
        ]:
            response = await asyncio.wait_for(pool.open(method, target, [], b""), 1)
            assert (response.status, await response.read(), response.complete) == (200, expected, True)
            response.release()
        assert server.connections == 1
        assert len(server.requests) == 5
        pool.close()


async def test_a_body_after_a_head_response_ends_the_connection() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody")  # a body a HEAD response must not have
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        for _ in range(2):
            response = await pool.open(b"HEAD", b"/", [], b"")
            assert (response.status, await response.read()) == (200, b"")
            response.release()
        assert server.connections == 2  # the confused connection was not reused
        pool.close()


async def test_informational_responses_are_skipped() -> None:
    """100 Continue and 103 Early Hints (with headers of its own, sent apart) come before the real response;
    their headers are not the response's, and the connection stays reusable."""

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-final: 1\r\n\r\nok")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        for _ in range(2):
            response = await pool.open(b"POST", b"/", [], b"x")
            assert (response.status, await response.read()) == (201, b"ok")
            assert response.headers == [(b"content-length", b"2"), (b"x-final", b"1")]
            response.release()
        assert server.connections == 1
        pool.close()


async def test_a_101_upgrade_is_refused_with_a_clear_error_and_the_connection_closed() -> None:
    """An upstream that switches protocols: the caller gets RemoteProtocolError naming the 101, the connection
    is closed and its place freed (before, the parser's upgrade exception escaped `data_received` and the
    caller was handed a 101 response on a dead connection)."""

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x05hello"
        )
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool(max_connections=1)
        for _ in range(2):  # the place is free again after each
            with pytest.raises(http1.RemoteProtocolError, match="101"):
                await asyncio.wait_for(pool.open(b"GET", b"/", [(b"upgrade", b"websocket")], b""), 1)
        await server.all_closed()
        assert (server.connections, pool.connections) == (2, 0)
        pool.close()


async def test_trailers_are_kept_apart_from_the_headers() -> None:
    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
            b"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n"
        )
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        for _ in range(2):
            response = await pool.open(b"GET", b"/", [], b"")
            assert await response.read() == b"ok"
            assert response.headers == [(b"transfer-encoding", b"chunked"), (b"trailer", b"x-checksum")]
            assert response.trailers == [(b"x-checksum", b"abc")]
            response.release()
        assert server.connections == 1
        pool.close()
