"""Every error the gateway produces is OpenAI-shaped, so the real SDK raises the right class."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from bastion.asgi import Receive, Scope, Send
from bastion.errors import GatewayError, send_error
from tests.support import AUTH, TEST_KEY, free_port, gateway, simulator

CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}]}


async def _error_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers /v1/<status>/... with the gateway's own error for that status."""
    if scope["type"] != "http":
        return
    status = int(scope["path"].split("/")[2])
    await send_error(send, GatewayError(status, f"status {status}"))


@pytest.fixture(scope="module")
def error_server() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_error_app, port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (405, openai.APIStatusError),
        (413, openai.APIStatusError),
        (429, openai.RateLimitError),
        (502, openai.InternalServerError),
        (503, openai.InternalServerError),
        (504, openai.InternalServerError),
    ],
)
def test_sdk_raises_matching_class(error_server: str, status: int, exception: type[Exception]) -> None:
    client = openai.OpenAI(base_url=f"{error_server}/v1/{status}", api_key="k", max_retries=0)
    with pytest.raises(exception) as info:
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    error = info.value
    assert isinstance(error, openai.APIStatusError) and error.status_code == status
    assert error.body is not None and set(error.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


def test_gateway_errors_through_real_processes() -> None:
    with (
        simulator() as (_, sim_url),
        gateway("--upstream-url", sim_url, env={"BASTION_MAX_BODY_BYTES": "2048"}) as (
            _,
            gw_url,
        ),
    ):
        client = openai.OpenAI(base_url=gw_url + "/v1", api_key=TEST_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as too_big:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 4096}])
        assert too_big.value.status_code == 413
        assert too_big.value.code == "request_too_large"
        # the upstream's own 4xx passes through with its body
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**CHAT, n=99)  # type: ignore[call-overload]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")

        bad_json = httpx.post(
            gw_url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json", **AUTH}
        )
        assert bad_json.status_code == 400
        assert bad_json.json()["error"]["type"] == "invalid_request_error"
        assert bad_json.headers["x-request-id"]
        assert httpx.delete(gw_url + "/v1/models", headers=AUTH).status_code == 405
        for sneaky in ("/v1/../metrics", "/v1/%2e%2e/metrics", "/v1/models%2f..%2fhealth"):
            result = subprocess.run(
                [
                    "curl",
                    "-s",
                    "--path-as-is",
                    "-H",
                    f"authorization: {AUTH['authorization']}",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    gw_url + sneaky,
                ],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            assert result.stdout == "404", sneaky
        assert httpx.get(gw_url + "/nowhere", headers=AUTH).json()["error"]["code"] == "not_found"
        # the caller's request id is echoed and reaches the upstream
        reply = httpx.post(gw_url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-123", **AUTH})
        assert reply.headers["x-request-id"] == "abc-123"
        assert reply.json()["id"] == "chatcmpl-abc-123"


def test_upstream_down_is_502_and_ready_says_so() -> None:
    with gateway("--upstream-url", f"http://127.0.0.1:{free_port()}", ready=False) as (_, gw_url):
        client = openai.OpenAI(base_url=gw_url + "/v1", api_key=TEST_KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert info.value.status_code == 502
        assert httpx.get(gw_url + "/ready").status_code == 503
        assert httpx.get(gw_url + "/health").status_code == 200
