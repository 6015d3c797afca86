"""Upstream failure paths against a scripted upstream: a real socket that misbehaves on cue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from bastion.app import create_app
from bastion.config import Settings
from bastion.exchange import Exchange
from bastion.upstream.state import Phase, Upstream
from tests.support import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


class ScriptedUpstream:
    """Answers every request with `script`; records what it received."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            self.requests.append(head + await reader.readexactly(length))
            await self.script(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def respond(status: int, body: bytes, content_type: bytes = b"application/json") -> Script:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (status, content_type, len(body), body)
        )
        await writer.drain()

    return script


def sse(*events: bytes, then_break: bool = False) -> Script:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        if not then_break:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return script


async def hang(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


def gateway_client(
    port: int, seen: list[Exchange] | None = None, upstream: Upstream | None = None, **settings: object
) -> httpx.AsyncClient:
    config = Settings(_env_file=None, upstream_url=f"http://127.0.0.1:{port}", **settings)  # type: ignore[arg-type]
    app = create_app(config, upstream=upstream, listeners=[seen.append] if seen is not None else ())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_connection_refused_is_502() -> None:
    async with gateway_client(free_port()) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


async def test_no_answer_within_read_timeout_is_504() -> None:
    seen: list[Exchange] = []
    async with (
        ScriptedUpstream(hang) as upstream,
        gateway_client(upstream.port, seen, upstream_read_timeout=0.3) as client,
    ):
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"
    assert (seen[0].outcome, seen[0].reason) == ("upstream_error", "upstream_timeout")


@pytest.mark.parametrize("status", [400, 404, 422, 500, 503])
async def test_upstream_status_and_body_pass_through(status: int) -> None:
    body = b'{"object":"error","message":"from upstream","code":%d}' % status
    async with ScriptedUpstream(respond(status, body)) as upstream, gateway_client(upstream.port) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == status
    assert response.content == body


async def test_client_credentials_never_reach_upstream() -> None:
    async with ScriptedUpstream(respond(200, b"{}")) as upstream:
        state = Upstream(f"http://127.0.0.1:{upstream.port}", "internal-secret-key")
        async with gateway_client(upstream.port, upstream=state) as client:
            await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer client-key"})
    sent = upstream.requests[0].lower()
    assert b"authorization: bearer internal-secret-key" in sent
    assert b"client-key" not in sent


async def test_not_ready_is_503_with_retry_after() -> None:
    state = Upstream("http://127.0.0.1:9", None, Phase.STARTING)
    async with gateway_client(9, upstream=state) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        ready = await client.get("/ready")
        health = await client.get("/health")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "model_loading"
    assert (ready.status_code, health.status_code) == (503, 200)


async def test_stream_broken_mid_way_ends_with_error_event() -> None:
    event = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    seen: list[Exchange] = []
    async with ScriptedUpstream(sse(event, then_break=True)) as upstream, gateway_client(upstream.port, seen) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = response.text.split("\n\n")
    assert events[0].encode() + b"\n\n" == event
    assert '"error"' in events[1] and "upstream_unavailable" in events[1]
    assert (seen[0].outcome, seen[0].reason) == ("upstream_error", "midstream")


async def test_usage_is_recorded_for_plain_and_streamed_responses() -> None:
    plain = b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}'
    seen: list[Exchange] = []
    async with ScriptedUpstream(respond(200, plain)) as upstream, gateway_client(upstream.port, seen) as client:
        await client.post("/v1/chat/completions", json=CHAT)
    assert seen[0].usage is not None
    assert (seen[0].usage.prompt_tokens, seen[0].usage.completion_tokens) == (5, 7)

    token = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
    async with (
        ScriptedUpstream(sse(token, usage, b"data: [DONE]\n\n")) as upstream,
        gateway_client(upstream.port, seen) as client,
    ):
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert seen[1].usage is not None and seen[1].usage.total_tokens == 4
    assert seen[1].stream and seen[1].model == "m"
    assert streamed.content == token + b"data: [DONE]\n\n", "usage the client did not ask for is hidden"
    assert b'"stream_options":{"include_usage":true}' in upstream.requests[0]
