"""Upstream failure paths against a scripted upstream: a real socket that misbehaves on cue."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bastion.app import create_app
from bastion.config import Settings
from bastion.context import Exchange
from bastion.engine.state import Phase, Upstream
from tests.support import AUTH, TEST_KEY, ScriptedUpstream, free_port, hang, respond, sse
from tests.unit.http_server import UnreadReset

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def gateway_client(
    port: int, seen: list[Exchange] | None = None, upstream: Upstream | None = None, **settings: object
) -> httpx.AsyncClient:
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_url=f"http://127.0.0.1:{port}",
        api_keys=TEST_KEY,
        **settings,  # type: ignore[arg-type]
    )
    app = create_app(config, upstream=upstream, listeners=[seen.append] if seen is not None else ())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=AUTH)


async def test_connection_refused_is_502() -> None:
    seen: list[Exchange] = []
    async with gateway_client(free_port(), seen) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert not seen[0].forwarded  # the engine never had it: charged nothing, background or not


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
    assert seen[0].forwarded  # written, its answer late: a background response is generated anyway


async def test_all_upstream_connections_busy_is_503_with_retry_after() -> None:
    seen: list[Exchange] = []
    async with (
        ScriptedUpstream(hang) as upstream,
        gateway_client(upstream.port, seen, upstream_max_connections=1, upstream_pool_timeout=0.2) as client,
    ):
        stuck = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.1)  # the one connection is taken by a request the upstream never answers
        response = await client.post("/v1/chat/completions", json=CHAT)
        stuck.cancel()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "upstream_busy"
    assert (seen[0].outcome, seen[0].reason) == ("rejected", "upstream_busy")
    assert not seen[0].forwarded


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
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    sent = upstream.requests[0].lower()
    assert b"authorization: bearer internal-secret-key" in sent
    assert TEST_KEY.lower().encode() not in sent


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


@pytest.mark.parametrize(
    ("phase", "status", "code"),
    [(Phase.READY, 503, "upstream_not_ready"), (Phase.EXTERNAL, 502, "upstream_unavailable")],
)
async def test_a_request_reset_unread_by_our_own_child_is_503_not_ready(phase: Phase, status: int, code: str) -> None:
    """Our child resets the connection with the request unread: it is exiting (its exit not noticed yet)
    and never took the request, a 503 like a refused connection. It was a 502 (test_faults' crash test
    saw it for the request after the crash). An upstream that is not ours keeps its 502."""
    seen: list[Exchange] = []
    async with UnreadReset() as server:
        state = Upstream(f"http://127.0.0.1:{server.port}", None, phase)
        async with gateway_client(server.port, seen, upstream=state) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert server.resets == 1
    assert not seen[0].forwarded  # reset unread
    if status == 503:
        assert response.headers["retry-after"] == "5"
        assert (seen[0].outcome, seen[0].reason) == ("rejected", "upstream_not_ready")


async def test_a_request_our_own_child_read_and_died_on_is_502() -> None:
    """Read, then closed without an answer: the child took it (it may have cost the engine), so a 502."""

    async def read_and_die(request: bytes, writer: asyncio.StreamWriter) -> None:
        return None  # the connection closes after the request was read

    seen: list[Exchange] = []
    async with ScriptedUpstream(read_and_die) as server:
        state = Upstream(f"http://127.0.0.1:{server.port}", None, Phase.READY)
        async with gateway_client(server.port, seen, upstream=state) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
    assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_unavailable")
    assert (seen[0].outcome, seen[0].reason) == ("upstream_error", "upstream_unavailable")
    assert seen[0].forwarded


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
