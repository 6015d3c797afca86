"""server.HeadHoldingTransport: a response head and its body leave in one write, in order."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, cast

import pytest
import uvicorn

from bastion import proxy
from bastion.app import create_app
from bastion.asgi import DisconnectWatch
from bastion.config import Settings
from bastion.server import HeadHoldingTransport, server_config
from tests.support import TEST_KEY, free_port

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


async def test_a_client_that_leaves_mid_response_closes_the_upstream_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real server: the disconnect hook, not the receive() watcher (pushed out to 60 s here)."""
    monkeypatch.setattr(proxy, "DisconnectWatch", functools.partial(DisconnectWatch, delay=60.0))
    asked, upstream_closed = asyncio.Event(), asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        await reader.read()  # returns at EOF: the gateway closed the connection
        upstream_closed.set()
        writer.close()

    upstream = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = free_port()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_url=f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}",
        api_keys=TEST_KEY, port=port, audit_log="off",
    )  # fmt: skip
    server = uvicorn.Server(server_config(create_app(settings), settings))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn's Server has no event for it)
            await asyncio.sleep(0.01)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (TEST_KEY.encode(), len(body), body)
        )
        await asyncio.wait_for(asked.wait(), 5)
        writer.close()
        await asyncio.wait_for(upstream_closed.wait(), 2)
    finally:
        server.should_exit = True
        await serving
        upstream.close()
