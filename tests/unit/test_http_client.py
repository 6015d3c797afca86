"""The HTTP/1.1 client (`bastion.http`): requests, bodies, timeouts, TLS and httpx over the pool, on real sockets.

The pool's rules (stale connections, capacity, the idle cap, closing) are in test_http_pool.py; the
protocol's odd corners (HEAD, 1xx, 101, trailers) in test_http_protocol.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.errors import upstream_failure
from bastion.http import Client, Timeouts, http1
from bastion.http.pool import Pool
from tests.support import make_cert
from tests.unit.http_server import FAST, KeepAliveServer, UnreadReset, dying_listener, ok


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


async def _pushing(pool: Pool) -> tuple[http1.Response, list[bytes]]:
    """A GET whose body is pushed to a sink that takes everything; what it took."""
    response = await pool.open(b"GET", b"/", [], b"")
    pushed: list[bytes] = []
    response.push_to(lambda data, framed: pushed.append(data) is None)
    return response, pushed


async def test_pushed_bytes_go_to_the_sink_while_the_reader_waits() -> None:
    """`push_to`: chunks arriving while the reader is parked go to the sink, in order, and the reader
    wakes only at the end (one wake-up per response instead of one per chunk)."""
    gate = asyncio.Event()

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await gate.wait()
        for index in range(5):
            writer.write(b"1\r\n%d\r\n" % index)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response, pushed = await _pushing(pool)
        reader = asyncio.ensure_future(response.read_some())
        await asyncio.sleep(0.05)
        gate.set()
        assert await reader == b""  # woken once: by the end
        assert b"".join(pushed) == b"01234" and len(pushed) == 5
        response.release()
        pool.close()


def _stepped_chunks(writes: tuple[bytes, ...] | list[bytes], step: asyncio.Event) -> Any:
    """An answer: a chunked response's head, then each of `writes` as its own segment, one each time `step` is set."""

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for data in writes:
            await step.wait()
            step.clear()
            writer.write(data)
            await writer.drain()
        return True

    return answer


async def _read_pushed(pool: Pool) -> tuple[http1.Response, list[tuple[bytes, bytes | None]], asyncio.Future[bytes]]:
    """A GET whose body is pushed to a sink that takes everything, and read to its end meanwhile: the response,
    what the sink got ((data, framed) per call) and the reader."""
    response = await pool.open(b"GET", b"/", [], b"")
    calls: list[tuple[bytes, bytes | None]] = []
    response.push_to(lambda data, framed: calls.append((data, framed)) is None)
    return response, calls, asyncio.ensure_future(response.read())


async def _pushed_reads(writes: list[bytes]) -> tuple[list[tuple[bytes, bytes | None]], bytes, http1.Response]:
    """A chunked answer whose body is written as `writes`, each its own segment (so each is one read), pushed
    to a sink that takes everything: what the sink got, (data, framed) per call, and what the reader got."""
    step = asyncio.Event()
    async with KeepAliveServer(_stepped_chunks(writes, step)) as server:
        pool = server.pool()
        response, calls, reader = await _read_pushed(pool)
        for _ in writes:
            await asyncio.sleep(0.02)
            step.set()
        read = await asyncio.wait_for(reader, 5)
        response.release()
        pool.close()
    return calls, read, response


async def test_a_read_of_whole_chunks_skips_the_parser_and_comes_with_its_framing() -> None:
    """The pushed fast path: a read of one or several whole chunks goes to the sink as it came (its framing, for a
    relay that frames its client's response the same way) with its data; the parser still ends the body."""
    writes = [b"1\r\na\r\n", b"6\r\nevent\n\r\n", b"2\r\nbc\r\n3\r\ndef\r\n", b"A\r\n0123456789\r\n", b"0\r\n\r\n"]
    calls, read, response = await _pushed_reads(writes)
    # The first chunk is parsed (the parser is not known to stand between chunks until it ended one).
    assert calls == [
        (b"a", None),
        (b"event\n", writes[1]),
        (b"bcdef", writes[2]),
        (b"0123456789", writes[3]),
    ]
    assert read == b"" and response.complete


async def test_whatever_is_not_whole_chunks_goes_to_the_parser_and_the_body_stays_exact() -> None:
    """Part of a chunk, a chunk with extensions or a size that is not plain hex, whole chunks followed by part
    of one, the last chunk with the bytes before it: parsed, and nothing lost, doubled or reframed."""
    writes = [
        b"1\r\na\r\n",
        b"5\r\nhel",  # part of a chunk
        b"lo\r\n",
        b"3;ext=1\r\nxyz\r\n",  # an extension
        b"2\r\nkl\r\n1\r\n",  # a whole chunk, then part of the next
        b"m\r\n",
        b"3\r\nnop\r\n0\r\n\r\n",  # the last read: a chunk and the end
    ]
    calls, read, response = await _pushed_reads(writes)
    assert all(framed is None for _, framed in calls), calls
    assert b"".join(data for data, _ in calls) + read == b"ahelloxyzklmnop"
    assert response.complete


async def test_a_size_line_split_across_reads_is_parsed_not_taken_for_whole_chunks() -> None:
    """A read that ends a chunk and starts the next one's size line leaves the parser inside that line, not
    between chunks: the next read may look like whole chunks on its own (here `5`, then `b`) while it is the
    rest of the size (`15`) and that chunk's 0x15 bytes. It is parsed: the body is the upstream's, and the
    parser, not left behind, ends the response."""
    data = b"abcde\r\nb\r\n0123456789X"  # 21 bytes that also read as a 5-byte chunk and an 11-byte one
    writes = [b"1\r\na\r\n", b"2\r\nbc\r\n1", b"5\r\n" + data + b"\r\n", b"0\r\n\r\n"]
    calls, read, response = await _pushed_reads(writes)
    assert b"".join(body for body, _ in calls) + read == b"abc" + data
    assert all(framed is None for _, framed in calls), calls
    assert response.complete


async def test_a_connection_whose_chunks_skipped_the_parser_is_reused_cleanly() -> None:
    """After reads that bypassed the parser, it ends the response (trailers included) and the connection, given
    back, carries the next responses exactly: a chunked one read without a sink, then a content-length one."""
    step = asyncio.Event()

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if number == 0:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for data in (b"1\r\na\r\n", b"2\r\nbc\r\n", b"3\r\ndef\r\n1\r\ng\r\n", b"0\r\nx-t: 1\r\n\r\n"):
                await step.wait()
                step.clear()
                writer.write(data)
                await writer.drain()
        elif number == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nthere")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response, calls, reader = await _read_pushed(pool)
        for _ in range(4):
            await asyncio.sleep(0.02)
            step.set()
        assert await asyncio.wait_for(reader, 5) == b"" and response.trailers == [(b"x-t", b"1")]
        assert [framed is not None for _, framed in calls] == [False, True, True], calls
        response.release()
        for body in (b"hi", b"there"):
            again = await pool.open(b"GET", b"/", [], b"")
            assert await again.read() == body
            again.release()
        assert server.connections == 1
        pool.close()


async def test_seven_hex_digits_are_whole_chunks_anywhere_in_a_read_and_eight_are_parsed() -> None:
    """The fast path takes size lines of up to seven hex digits (zero-padded sizes are plain HTTP) for the
    first chunk of a read and for those after it alike; eight go to the parser; the body is the same."""
    seven, eight = b"000000A\r\n0123456789\r\n", b"0000000A\r\n0123456789\r\n"
    writes = [b"1\r\na\r\n", seven, b"1\r\nb\r\n" + seven, eight, b"1\r\nc\r\n" + eight, b"0\r\n\r\n"]
    calls, read, response = await _pushed_reads(writes)
    assert calls == [
        (b"a", None),
        (b"0123456789", writes[1]),
        (b"b0123456789", writes[2]),
        (b"0123456789", None),
        (b"c0123456789", None),
    ]
    assert read == b"" and response.complete


@pytest.mark.parametrize(
    "bad", [b"3\r\nxyzXY", b"+2\r\nqq\r\n", b" 2\r\nqq\r\n", b"0x2\r\nqq\r\n", b"1_0\r\n" + b"q" * 16 + b"\r\n"]
)
async def test_what_only_looks_like_a_chunk_is_refused_by_the_parser(bad: bytes) -> None:
    """A read that looks like a chunk but is not one (data not followed by CRLF, a size `int()` would take but
    HTTP does not: a sign, a space, 0x, an underscore) is not taken as one: the parser sees it and fails the
    response, as it would have."""
    step = asyncio.Event()

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await step.wait()
        writer.write(bad)
        await writer.drain()
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response, calls, reader = await _read_pushed(pool)
        await asyncio.sleep(0.02)
        step.set()
        with pytest.raises(http1.RemoteProtocolError):
            await asyncio.wait_for(reader, 5)
        assert all(framed is None for _, framed in calls)
        response.close()
        pool.close()


async def test_bytes_the_sink_refuses_are_read_in_order_and_nothing_overtakes_them() -> None:
    """A refused chunk (say the client's buffer is full) is buffered and wakes the reader; chunks behind it
    queue after it, and nothing is pushed while the reader is away (it may hold bytes), so order holds."""
    step = asyncio.Event()
    # b and c in one segment: c arrives while b waits unread
    answer = _stepped_chunks((b"1\r\na\r\n", b"1\r\nb\r\n1\r\nc\r\n", b"1\r\nd\r\n", b"1\r\ne\r\n0\r\n\r\n"), step)

    async def next_write() -> None:
        step.set()
        await asyncio.sleep(0.05)

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response = await pool.open(b"GET", b"/", [], b"")
        accept = True
        pushed: list[bytes] = []

        def sink(data: bytes, framed: bytes | None) -> bool:
            if accept:
                pushed.append(data)
            return accept

        response.push_to(sink)
        reader = asyncio.ensure_future(response.read_some())
        await asyncio.sleep(0.02)
        await next_write()  # a: pushed, the reader stays parked
        assert pushed == [b"a"] and not reader.done()
        accept = False
        await next_write()  # b refused: buffered, the reader woken; c queues behind it
        accept = True
        assert await reader == b"bc" and pushed == [b"a"]
        await next_write()  # d arrives while nobody waits: buffered, not pushed
        assert await response.read_some() == b"d" and pushed == [b"a"]
        reader = asyncio.ensure_future(response.read_some())
        await next_write()  # parked again: e arrives with the end, so the reader gets it (to send with the end)
        assert await reader == b"e" and pushed == [b"a"] and response.complete
        response.release()
        pool.close()


async def test_a_read_holding_several_chunks_is_one_push() -> None:
    """The sink (one write to the client) is called once per read from the upstream, not once per chunk
    in it; chunk sizes, extensions and a chunk split across two reads change nothing in the bytes."""
    step = asyncio.Event()
    answer = _stepped_chunks(
        (b"1\r\na\r\n2;ext=1\r\nbc\r\nA\r\n0123", b"456789\r\n3\r\ndef\r\n", b"0\r\nx-t: 1\r\n\r\n"), step
    )

    async with KeepAliveServer(answer) as server:
        pool = server.pool()
        response, pushed = await _pushing(pool)
        reader = asyncio.ensure_future(response.read_some())
        await asyncio.sleep(0.02)
        for _ in range(2):
            step.set()
            await asyncio.sleep(0.05)
        assert pushed == [b"abc0123", b"456789def"] and not reader.done()
        step.set()
        assert await asyncio.wait_for(reader, 5) == b"" and response.trailers == [(b"x-t", b"1")]
        response.release()
        pool.close()


async def test_pushed_bytes_count_as_activity_for_the_read_timeout() -> None:
    """A pushed stream longer than the read timeout is not cut; silence after it still is."""

    async with KeepAliveServer(_trickle_then_silence) as server:
        pool = server.pool(timeouts=http1.Timeouts(connect=1, read=0.25, write=1, pool=1))
        response, pushed = await _pushing(pool)
        with pytest.raises(http1.ReadTimeout):
            await response.read_some()
        assert b"".join(pushed) == b"x" * 6
        response.close()
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


async def _trickle_then_silence(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
    """A chunked answer never silent for 0.25 s during 0.6 s, then silent for 0.5 s before its end."""
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    for _ in range(6):
        await asyncio.sleep(0.1)
        writer.write(b"1\r\nx\r\n")
    await asyncio.sleep(0.5)
    writer.write(b"0\r\n\r\n")
    return True


async def test_the_read_timeout_bounds_silence_not_the_whole_response() -> None:
    async with KeepAliveServer(_trickle_then_silence) as server:
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


async def test_on_sent_says_when_the_request_was_handed_to_a_connection_and_only_then() -> None:
    """`on_sent` is called once the request is on a connection: not for a refused connection, nor for a request
    still waiting for a free one when it is cancelled (the server never saw a byte of either)."""
    sent: list[str] = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        pool = Pool("127.0.0.1", port, ssl_context=None, timeouts=FAST, max_connections=1, keepalive_expiry=30)
        with pytest.raises(http1.ConnectError):
            await pool.open(b"GET", b"/", [], b"", on_sent=lambda: sent.append("refused"))
    gate = asyncio.Event()

    async def answer(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        await gate.wait()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    async with KeepAliveServer(answer) as server:
        pool = server.pool(max_connections=1)
        first = asyncio.ensure_future(pool.open(b"GET", b"/", [], b"", on_sent=lambda: sent.append("first")))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(pool.open(b"GET", b"/", [], b"", on_sent=lambda: sent.append("waiting")))
        await asyncio.sleep(0.05)
        waiting.cancel()  # its client left while it waited for the one connection
        gate.set()
        response = await asyncio.wait_for(first, 5)
        assert await response.read() == b"ok"
        response.release()
        pool.close()
    assert sent == ["first"] and len(server.requests) == 1


async def test_a_reset_before_any_answer_is_connection_reset_an_orderly_close_is_not() -> None:
    """A reset means the request was never read (the proxy answers 503 for its own child); a connection
    closed after the request was read stays a plain `RemoteProtocolError` (502: it may have cost the engine)."""
    async with UnreadReset() as server:
        pool = Pool("127.0.0.1", server.port, ssl_context=None, timeouts=FAST, max_connections=1, keepalive_expiry=30)
        with pytest.raises(http1.ConnectionReset, match="without reading the request"):
            await pool.open(b"POST", b"/v1/chat/completions", [], b'{"a":1}')
        assert server.resets == 1
        pool.close()

    async def read_then_close(number: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.transport.abort()  # read, then closed without a word
        return False

    async with KeepAliveServer(read_then_close) as server:
        pool = server.pool()
        with pytest.raises(http1.RemoteProtocolError, match="without answering") as caught:
            await pool.open(b"POST", b"/", [], b"{}")
        assert not isinstance(caught.value, http1.ConnectionReset)
        pool.close()


async def test_a_request_in_the_backlog_of_a_closing_listener_is_never_taken() -> None:
    """What an exiting upstream does to the next request: its connections close before its listener does, so
    a connect succeeds into the backlog, the request is written, and the listener's close resets it."""
    with dying_listener() as listener:
        pool = Pool("127.0.0.1", listener.getsockname()[1], ssl_context=None, timeouts=FAST, max_connections=1,
                    keepalive_expiry=30)  # fmt: skip
        opened = asyncio.create_task(pool.open(b"POST", b"/v1/chat/completions", [], b'{"a":1}'))
        waiting = asyncio.get_running_loop().create_future()  # the handshake is done: it waits in the backlog
        asyncio.get_running_loop().add_reader(listener.fileno(), lambda: waiting.done() or waiting.set_result(None))
        try:
            await asyncio.wait_for(waiting, 5)
        finally:
            asyncio.get_running_loop().remove_reader(listener.fileno())
        await asyncio.sleep(0.05)  # the request is written (the same loop: the task ran meanwhile)
        listener.close()
        # Reset after the request was written (or, had the loop not written it yet, as it was opened): not taken.
        with pytest.raises((http1.ConnectionReset, http1.ConnectError)):
            await opened
        pool.close()


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
        broken = [
            [(b"x-a", b"1\r\nx-injected: 1")],
            [(b"x-a", b"1\nx-injected: 1")],  # a bare LF, which many servers take as a line end
            [(b"x-a", b"1\rx")],
            [(b"x-ok", b"1"), (b"x-a\r\nx-injected", b"1")],  # in a name
        ]
        for headers in broken:
            for method, body in ((b"GET", b""), (b"POST", b"{}")):
                with pytest.raises(ValueError):
                    await pool.open(method, b"/", headers, body)
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
        for _ in range(3):  # kept alive over TLS too: an idle TLS connection is not taken for a stale one
            response = await trusting.open(b"GET", b"/", [], b"")
            assert await response.read() == b"secret"
            response.release()
        assert server.connections == 1
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


async def test_a_body_the_upstream_never_reads_is_a_write_timeout() -> None:
    """A request body larger than the socket buffers waits for the upstream to take it, for the write timeout."""
    stalled = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()
        writer.close()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    timeouts = http1.Timeouts(connect=1, read=5, write=0.3, pool=1)
    pool = Pool("127.0.0.1", port, ssl_context=None, timeouts=timeouts, max_connections=1, keepalive_expiry=30)
    try:
        with pytest.raises(http1.WriteTimeout):
            await asyncio.wait_for(pool.open(b"POST", b"/", [], b"x" * (64 << 20)), 5)
    finally:
        pool.close()
        stalled.set()
        server.close()
        await server.wait_closed()
