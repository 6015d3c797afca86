"""server.HeadHoldingTransport: a response head and its body leave in one write, in order."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from bastion.server import HeadHoldingTransport

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
