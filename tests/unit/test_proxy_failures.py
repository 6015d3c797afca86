"""Upstream failure paths, with respx standing in for the model server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from bastion.app import create_app
from bastion.config import Settings
from bastion.exchange import Exchange
from bastion.upstream.state import Phase, Upstream
from tests.support import AUTH, TEST_KEY

UPSTREAM = "http://upstream.test"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _response(status: int, body: bytes, content_type: str = "application/json") -> httpx.Response:
    """A response whose body is still a stream, as a real transport hands it over."""

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    return httpx.Response(status, headers={"content-type": content_type}, content=chunks())


def _client(
    router: respx.Router, seen: list[Exchange] | None = None, upstream: Upstream | None = None
) -> httpx.AsyncClient:
    settings = Settings(upstream_url=UPSTREAM, api_keys=TEST_KEY, _env_file=None)  # type: ignore[call-arg]
    app = create_app(
        settings,
        upstream=upstream,
        transport=httpx.MockTransport(router.async_handler),
        listeners=[seen.append] if seen is not None else (),
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=AUTH)


async def test_connect_error_is_502() -> None:
    router = respx.Router()
    router.post(UPSTREAM + "/v1/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    async with _client(router) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


async def test_timeout_is_504() -> None:
    router = respx.Router()
    router.post(UPSTREAM + "/v1/chat/completions").mock(side_effect=httpx.ReadTimeout("slow"))
    async with _client(router) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


@pytest.mark.parametrize("status", [400, 404, 422, 500, 503])
async def test_upstream_status_and_body_pass_through(status: int) -> None:
    body = b'{"object":"error","message":"from upstream","code":%d}' % status
    router = respx.Router()
    router.post(UPSTREAM + "/v1/chat/completions").mock(return_value=_response(status, body))
    async with _client(router) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == status
    assert response.content == body


async def test_client_credentials_never_reach_upstream() -> None:
    router = respx.Router()
    route = router.post(UPSTREAM + "/v1/chat/completions").mock(return_value=_response(200, b"{}"))
    upstream = Upstream(UPSTREAM, "internal-secret-key")
    async with _client(router, upstream=upstream) as client:
        await client.post("/v1/chat/completions", json=CHAT)  # the client's own key: AUTH
    sent = route.calls.last.request
    assert sent.headers["authorization"] == "Bearer internal-secret-key"
    assert TEST_KEY not in str(sent.headers)


async def test_not_ready_is_503_with_retry_after() -> None:
    router = respx.Router()
    upstream = Upstream(UPSTREAM, None, Phase.STARTING)
    async with _client(router, upstream=upstream) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        ready = await client.get("/ready")
        health = await client.get("/health")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "model_loading"
    assert (ready.status_code, health.status_code) == (503, 200)


async def test_stream_broken_mid_way_ends_with_error_event() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        raise httpx.ReadError("connection reset")

    router = respx.Router()
    router.post(UPSTREAM + "/v1/chat/completions").mock(
        return_value=httpx.Response(200, headers={"content-type": "text/event-stream"}, content=broken())
    )
    seen: list[Exchange] = []
    async with _client(router, seen) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = response.text.split("\n\n")
    assert events[0].startswith('data: {"choices"')
    assert '"error"' in events[1] and "upstream_unavailable" in events[1]
    assert seen[0].outcome == "upstream_error"


async def test_usage_is_recorded_for_plain_and_streamed_responses() -> None:
    stream = (
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
        b"data: [DONE]\n\n"
    )
    router = respx.Router()
    route = router.post(UPSTREAM + "/v1/chat/completions")
    route.side_effect = [
        _response(200, b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}'),
        _response(200, stream, "text/event-stream"),
    ]
    seen: list[Exchange] = []
    async with _client(router, seen) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert (seen[0].usage.prompt_tokens, seen[0].usage.completion_tokens) == (5, 7)  # type: ignore[union-attr]
    assert seen[1].usage is not None and seen[1].usage.total_tokens == 4
    assert seen[1].stream and seen[1].model == "m"
    assert b'"usage"' not in streamed.content, "usage the client did not ask for is hidden"
    assert streamed.content.endswith(b"data: [DONE]\n\n")
    forwarded = route.calls.last.request.content
    assert b'"stream_options":{"include_usage":true}' in forwarded
