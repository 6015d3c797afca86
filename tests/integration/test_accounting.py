"""Accounting that no request shape slips past, through a real gateway process and a vLLM-like upstream.

The upstream (`vllm_like.py`) reads requests as vLLM does (pydantic lax coercion) and answers as
each test plans. What the gateway charged is read from outside, the way a client sees it: a fresh
principal (a JWT with its own subject) per case, then `GET /v1/models` (which reserves nothing)
reports `x-ratelimit-limit-tokens - x-ratelimit-remaining-tokens` = the tokens charged in this minute.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jose import jwt

from bastion.auth.jwt import mint
from tests.integration.vllm_like import Received, vllm_like
from tests.support import Proc, gateway, redis_server

JWT_SECRET = "accounting-jwt-secret-0123456789abcdef"
TPM = 1_000_000_000
DEFAULT_MAX_TOKENS = 64
CHAT = "/v1/chat/completions"
ENV = {
    "BASTION_JWT_SECRET": JWT_SECRET,
    "BASTION_RATE_LIMIT_RPM": "0",
    "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0",
    "BASTION_RATE_LIMIT_TPM": str(TPM),
    "BASTION_DEFAULT_MAX_TOKENS": str(DEFAULT_MAX_TOKENS),
    "BASTION_AUDIT_LOG": "off",
}


def token(tpm: int = TPM, models: list[str] | None = None) -> str:
    """A fresh principal: its own subject, so its own (empty) tokens window."""
    return mint(JWT_SECRET, "acct-" + os.urandom(6).hex(), 600, limits={"tpm": tpm}, models=models)


def auth(credential: str, plan: dict[str, Any] | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {credential}"}
    if plan is not None:
        headers["x-plan"] = json.dumps(plan)
    return headers


def charged(base: str, credential: str, expected: int | None = None) -> int:
    """Tokens charged to `credential` this minute; waits (briefly) for `expected` (a Redis charge lands late)."""
    deadline = time.monotonic() + 3
    while True:
        reply = httpx.get(base + "/v1/models", headers=auth(credential), timeout=10)
        assert reply.status_code == 200, reply.text
        value = int(reply.headers["x-ratelimit-limit-tokens"]) - int(reply.headers["x-ratelimit-remaining-tokens"])
        if expected is None or value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def fresh_minute(margin: float = 3.0) -> None:
    """Memory windows are epoch minutes: keep a request and the check of its charge inside one."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def estimate(body: bytes, completion_cap: int) -> int:
    return len(body) // 4 + completion_cap


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[Received]]]:
    with vllm_like() as pair:
        yield pair


@pytest.fixture(scope="module")
def gw(upstream: tuple[str, list[Received]]) -> Iterator[tuple[Proc, str]]:
    with gateway("--upstream-url", upstream[0], env=ENV) as pair:
        yield pair


def post(base: str, path: str, body: dict[str, Any] | bytes, credential: str, plan: dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(base + path, content=content, headers=auth(credential, plan), timeout=20)


# --- every shape is charged its usage ------------------------------------------------------------


@pytest.mark.parametrize("stream", ["true", 1, "yes", "on", "True", "t", "Y", 1.0])
def test_stream_in_any_form_vllm_accepts_is_charged(gw: tuple[Proc, str], stream: object) -> None:
    """vLLM streams `"stream": "true"`: the gateway asks for usage anyway, charges it and hides it."""
    _, base = gw
    who = token()
    fresh_minute()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": 8}
    reply = post(base, CHAT, body, who, {"prompt": 11, "completion": 5})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    assert '"usage"' not in reply.text.replace('"usage":{', "")  # the gateway's own usage event is hidden
    assert charged(base, who, 16) == 16


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32-le"])
def test_a_streamed_request_in_utf16_or_utf32_is_served_and_charged(gw: tuple[Proc, str], encoding: str) -> None:
    """JSON in UTF-16/32 is JSON to vLLM's server; the gateway's `include_usage` edit must not break it."""
    _, base = gw
    who = token()
    fresh_minute()
    body = {"model": "m", "messages": [{"role": "user", "content": "hé"}], "stream": True, "max_tokens": 8}
    reply = post(base, CHAT, json.dumps(body).encode(encoding), who, {"prompt": 11, "completion": 5})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream"), reply.text
    assert '"usage"' not in reply.text.replace('"usage":{', "")
    assert charged(base, who, 16) == 16


@pytest.mark.parametrize("size", [10, 70_000], ids=["small", "past 64 KiB"])
def test_a_body_behind_a_utf8_byte_order_mark_is_served_and_charged(
    gw: tuple[Proc, str], upstream: tuple[str, list[Received]], size: int
) -> None:
    """vLLM's server reads a UTF-8 body behind a byte order mark (json.loads skips it); the gateway read a small
    one, and refused a large one 400. Both are now inspected alike: usage asked for, hidden, charged; forwarded
    with the mark, as received."""
    _, base = gw
    who = token()
    fresh_minute()
    sent = {"model": "m", "messages": [{"role": "user", "content": "x" * size}], "stream": True, "max_tokens": 8}
    reply = post(base, CHAT, b"\xef\xbb\xbf" + json.dumps(sent).encode(), who, {"prompt": 11, "completion": 5})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream"), reply.text
    assert '"usage"' not in reply.text.replace('"usage":{', "")  # the gateway's own usage event is hidden
    assert charged(base, who, 16) == 16
    forwarded = [received.body for received in upstream[1] if received.path == CHAT][-1]
    assert forwarded.startswith(b"\xef\xbb\xbf") and json.loads(forwarded)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("asked", [True, 1, "true", "on"])
def test_a_client_that_asked_for_usage_in_any_form_gets_it(gw: tuple[Proc, str], asked: object) -> None:
    _, base = gw
    who = token()
    fresh_minute()
    body = {"model": "m", "prompt": "hi", "stream": "1", "stream_options": {"include_usage": asked}}
    reply = post(base, "/v1/completions", body, who, {"prompt": 3, "completion": 2})
    assert '"usage": {"prompt_tokens": 3' in reply.text
    assert charged(base, who, 5) == 5


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_is_charged(gw: tuple[Proc, str], stream: bool) -> None:
    _, base = gw
    who = token()
    fresh_minute()
    reply = post(
        base, "/v1/responses", {"model": "m", "input": "hi", "stream": stream}, who, {"prompt": 13, "completion": 4}
    )
    assert reply.status_code == 200
    assert ("response.completed" in reply.text) is stream
    assert charged(base, who, 17) == 17


# --- background and stored responses: charged once, from what the engine did ---------------------------

STORED_ROUTES = "default,/v1/responses/{id},/v1/responses/{id}/cancel"


@pytest.fixture(scope="module")
def gw_background(upstream: tuple[str, list[Received]]) -> Iterator[tuple[Proc, str]]:
    """The stored-response routes forwarded, background responses allowed (which needs the cap enforced)."""
    env = {
        **ENV,
        "BASTION_ROUTES": STORED_ROUTES,
        "BASTION_ENFORCE_MAX_TOKENS": "true",
        "BASTION_RESPONSES_BACKGROUND": "true",
    }
    with gateway("--upstream-url", upstream[0], env=env) as pair:
        yield pair


def generations(upstream: tuple[str, list[Received]]) -> int:
    """Requests to generate the upstream got (not the gateway's health probes, which come at any time)."""
    return sum(1 for received in upstream[1] if received.path == "/v1/responses")


def settled(base: str, credential: str) -> int:
    """What is charged once every request before has finished settling (a settle may land after its reply)."""
    time.sleep(0.3)
    return charged(base, credential)


@pytest.mark.parametrize("background", [True, "true", 1, "on"])
def test_a_background_response_is_refused_unless_the_operator_allows_it(
    gw: tuple[Proc, str], upstream: tuple[str, list[Received]], background: object
) -> None:
    """vLLM answers `background: true` (in any form pydantic reads as true) at once with a queued response and
    `"usage": null`, and generates afterwards: the gateway charged the estimate at the POST and, were
    `GET /v1/responses/{id}` forwarded, the usage again at every fetch. Refused unless allowed."""
    _, base = gw
    who = token()
    fresh_minute()
    received = generations(upstream)
    body = {"model": "m", "input": "hi", "background": background, "max_output_tokens": 10}
    reply = post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "background_not_supported" and error["param"] == "background"
    assert generations(upstream) == received  # nothing reached the engine
    assert settled(base, who) == 0
    body["background"] = False
    assert post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4}).status_code == 200
    assert charged(base, who, 17) == 17


def test_a_stored_response_fetched_again_is_not_charged_again(gw_background: tuple[Proc, str]) -> None:
    """A response is stored (vLLM's `store`, true by default) and its usage comes back with every
    `GET /v1/responses/{id}` (and its `?stream=true` replay, and a cancel): each was charged that usage
    again (a `cancel` reserved BASTION_DEFAULT_MAX_TOKENS too). Now only the request that generated it is."""
    _, base = gw_background
    who = token()
    fresh_minute()
    plan = {"prompt": 13, "completion": 4}
    reply = post(base, "/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 10}, who, plan)
    assert reply.status_code == 200 and charged(base, who, 17) == 17
    for path in ("/v1/responses/resp-1", "/v1/responses/resp-1?stream=true", "/v1/responses/resp-1"):
        fetched = httpx.get(base + path, headers=auth(who, plan), timeout=10)
        assert fetched.status_code == 200 and '"total_tokens": 17' in fetched.text, fetched.text
    cancelled = httpx.post(base + "/v1/responses/resp-1/cancel", headers=auth(who, plan), timeout=10)
    assert cancelled.status_code == 200 and '"total_tokens": 17' in cancelled.text, cancelled.text
    assert settled(base, who) == 17
    # bastion_tokens_total counts what was generated once too (a dashboard of tokens per principal).
    subject = jwt.get_unverified_claims(who)["sub"]
    scrape = httpx.get(base + "/metrics", timeout=10).text
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("bastion_tokens_total{") and f'principal="{subject}"' in line
    ]
    assert sum(counted) == 17, [line for line in scrape.splitlines() if subject in line]


@pytest.mark.parametrize("cap", [10, None])
def test_a_background_response_is_charged_its_reservation_once(
    gw_background: tuple[Proc, str], upstream: tuple[str, list[Received]], cap: int | None
) -> None:
    """Allowed (BASTION_RESPONSES_BACKGROUND, with the cap enforced), a background response is charged what was
    reserved when it is posted: its usage never comes back to that request, and the engine cannot pass the
    cap (written in when the request sets none). Fetching the result charges nothing more."""
    _, base = gw_background
    who = token()
    fresh_minute()
    fields = {"model": "m", "input": "hi", "background": True}
    body = json.dumps(fields if cap is None else {**fields, "max_output_tokens": cap}).encode()
    reply = post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4})
    assert reply.status_code == 200 and reply.json()["status"] == "queued", reply.text
    assert upstream[1][-1].json()["max_output_tokens"] == (cap or DEFAULT_MAX_TOKENS)
    reserved = estimate(body, cap or DEFAULT_MAX_TOKENS)
    assert charged(base, who, reserved) == reserved
    fetched = httpx.get(base + "/v1/responses/resp_bg", headers=auth(who, {"prompt": 13, "completion": 4}))
    assert fetched.status_code == 200 and fetched.json()["usage"]["total_tokens"] == 17
    assert settled(base, who) == reserved


def test_a_background_stream_read_to_its_end_is_charged_its_usage(gw_background: tuple[Proc, str]) -> None:
    """A background response that streams carries `response.completed` with the engine's usage: charged that."""
    _, base = gw_background
    who = token()
    fresh_minute()
    body = {"model": "m", "input": "hi", "background": "yes", "stream": True, "max_output_tokens": 10}
    reply = post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4})
    assert reply.status_code == 200 and "response.completed" in reply.text
    assert charged(base, who, 17) == 17


def test_a_background_stream_left_at_once_is_charged_its_reservation(gw_background: tuple[Proc, str]) -> None:
    """A client that leaves a streamed request is charged the events it got: right when vLLM stops generating
    for it, but a background response goes on without its client. Left before the first event, it was
    charged its prompt estimate alone; now what was reserved for it."""
    _, base = gw_background
    who = token()
    fresh_minute()
    body = json.dumps({"model": "m", "input": "hi", "background": True, "stream": True, "max_output_tokens": 10})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            base + "/v1/responses", content=body, headers=auth(who, {"delay": 1.0}), timeout=httpx.Timeout(10, read=0.3)
        )
    reserved = estimate(body.encode(), 10)
    assert charged(base, who, reserved) == reserved


@pytest.mark.parametrize("background", [True, False])
def test_a_background_response_whose_answer_was_late_is_charged_its_reservation(
    upstream: tuple[str, list[Received]], background: bool
) -> None:
    """The engine's answer head later than BASTION_UPSTREAM_READ_TIMEOUT: a 504, and the connection closed. A
    background response goes on generating all the same, and was charged nothing; now its reservation. Not
    background, the closed connection makes vLLM abort it: still charged nothing."""
    env = {
        **ENV,
        "BASTION_ENFORCE_MAX_TOKENS": "true",
        "BASTION_RESPONSES_BACKGROUND": "true",
        "BASTION_UPSTREAM_READ_TIMEOUT": "0.3",
    }
    with gateway("--upstream-url", upstream[0], env=env) as (_, base):
        who = token()
        fresh_minute()
        received = generations(upstream)
        body = json.dumps({"model": "m", "input": "hi", "background": background, "max_output_tokens": 10})
        reply = post(base, "/v1/responses", body.encode(), who, {"delay": 1.0})
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "upstream_timeout", reply.text
        assert generations(upstream) == received + 1  # the engine had it
        expected = estimate(body.encode(), 10) if background else 0
        assert charged(base, who, expected) == expected
        assert settled(base, who) == expected


def background_gateway(upstream: str, **settings: str) -> Any:
    """Background responses allowed (so with caps enforced), a day budget (its reservations seen), and `settings`."""
    env = {
        **ENV,
        "BASTION_ENFORCE_MAX_TOKENS": "true",
        "BASTION_RESPONSES_BACKGROUND": "true",
        "BASTION_BUDGET_DAY": str(TPM),
        **settings,
    }
    return gateway("--upstream-url", upstream, env=env)


@pytest.fixture(scope="module")
def gw_fair(upstream: tuple[str, list[Received]]) -> Iterator[tuple[Proc, str]]:
    """Fairness on with one engine slot."""
    with background_gateway(upstream[0], BASTION_FAIRNESS="1", BASTION_ENGINE_CAPACITY="1") as pair:
        yield pair


@pytest.fixture(scope="module")
def gw_one_connection(upstream: tuple[str, list[Received]]) -> Iterator[tuple[Proc, str]]:
    """One upstream connection."""
    with background_gateway(upstream[0], BASTION_UPSTREAM_MAX_CONNECTIONS="1") as pair:
        yield pair


def left_behind_a_slow_one(base: str, upstream: tuple[str, list[Received]], body: dict[str, Any]) -> None:
    """A slow request (1.5 s) takes what there is one of (an engine slot, an upstream connection); `body`, sent
    to /v1/responses behind it, waits, and its client leaves after 0.5 s: charged nothing, its tokens/min and
    day-budget reservations given back, and never sent to the engine, even once the slow one is done."""
    holder, who = token(), token()
    fresh_minute(8)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    held = threading.Thread(target=post, args=(base, CHAT, chat, holder, {"delay": 1.5}))
    held.start()
    try:
        time.sleep(0.5)  # the slow request holds it
        received = generations(upstream)
        with pytest.raises(httpx.ReadTimeout):  # the client leaves
            httpx.post(
                base + "/v1/responses", content=json.dumps(body), headers=auth(who), timeout=httpx.Timeout(10, read=0.5)
            )
        assert settled(base, who) == 0
        day = httpx.get(base + "/v1/usage", headers=auth(who), timeout=10).json()["periods"][0]
        assert (day["used"], day["reserved"]) == (0, 0), day
    finally:
        held.join(timeout=15)
    assert generations(upstream) == received
    assert settled(base, who) == 0


@pytest.mark.parametrize(("background", "stream"), [(True, False), (True, True), (False, False), (False, True)])
def test_a_request_left_in_the_fair_queue_is_charged_nothing_and_releases_its_reservations(
    gw_fair: tuple[Proc, str], upstream: tuple[str, list[Received]], background: bool, stream: bool
) -> None:
    """Its engine full, a request waits in the gateway's fair queue; its client leaves: nothing was forwarded.
    It was charged as if the engine had it (a background one its whole reservation, any other its prompt
    estimate, or that and its cap when not streamed); now nothing, its tokens/min and budget reservations
    both given back."""
    body = {"model": "m", "input": "hi", "background": background, "stream": stream, "max_output_tokens": 10}
    left_behind_a_slow_one(gw_fair[1], upstream, body)  # queued behind it in the fair queue


@pytest.mark.parametrize("background", [True, False])
def test_a_request_left_waiting_for_an_upstream_connection_is_charged_nothing(
    gw_one_connection: tuple[Proc, str], upstream: tuple[str, list[Received]], background: bool
) -> None:
    """One upstream connection, held by a slow request; the next waits in the gateway's pool for it, and its
    client leaves: nothing was sent to the engine. It was charged as if the engine had it (its whole reservation
    when background); now nothing, its reservations given back, and it is never sent once the connection frees."""
    body = {"model": "m", "input": "hi", "background": background, "max_output_tokens": 10}
    left_behind_a_slow_one(gw_one_connection[1], upstream, body)  # waiting for the one connection


def test_a_background_response_cannot_continue_a_previous_one(gw_background: tuple[Proc, str]) -> None:
    """`previous_response_id` makes the engine read the earlier conversation too, which the request's bytes do
    not show: a background response is charged its reservation, so that reservation would be far too low."""
    _, base = gw_background
    who = token()
    fresh_minute()
    body = {"model": "m", "input": "more", "background": True, "previous_response_id": "resp_1"}
    reply = post(base, "/v1/responses", body, who, {})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "previous_response_id", reply.text
    assert settled(base, who) == 0


BUILT_IN_TOOLS = [
    [{"type": "code_interpreter", "container": {"type": "auto"}}],
    [{"type": "web_search_preview"}],
    [{"type": "function", "name": "f", "parameters": {}}, {"type": "mcp", "server_label": "container"}],
]


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("tools", BUILT_IN_TOOLS)
def test_a_background_response_cannot_run_built_in_tools(
    gw_background: tuple[Proc, str], upstream: tuple[str, list[Received]], tools: list[Any], large: bool
) -> None:
    """vLLM runs built-in tools (code interpreter, web search, container, MCP; with a tool server) in a loop
    in which every turn after the first may generate up to the rest of the context window
    (`sampling_params.max_tokens = max_model_len - len(prompt)`) and re-reads the growing conversation: the
    enforced `max_output_tokens` bounds the first turn only. A background response is charged its
    reservation, so such a request ran many times what it paid; now refused, with nothing forwarded."""
    _, base = gw_background
    who = token()
    fresh_minute()
    received = generations(upstream)
    fields: dict[str, Any] = {"model": "m", "input": "x" * (70_000 if large else 2), "background": True}
    reply = post(base, "/v1/responses", {**fields, "tools": tools}, who, {"prompt": 13, "completion": 4})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "background_not_supported" and error["param"] == "tools"
    assert generations(upstream) == received  # nothing reached the engine
    assert settled(base, who) == 0
    # Function tools come back to the client (vLLM never calls them): allowed, charged the reservation.
    body = json.dumps({**fields, "tools": [{"type": "function", "name": "f", "parameters": {}}]}).encode()
    reply = post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4})
    assert reply.status_code == 200, reply.text
    reserved = estimate(body, DEFAULT_MAX_TOKENS)
    assert charged(base, who, reserved) == reserved


def test_a_background_response_with_tools_too_large_to_read_is_refused(gw_background: tuple[Proc, str]) -> None:
    """Tools past 64 KiB are not decoded: which types they hold is unknown, so a background request is refused."""
    _, base = gw_background
    who = token()
    fresh_minute()
    tools = [{"type": "function", "name": f"f{i}", "parameters": {}} for i in range(2000)]
    tools.append({"type": "code_interpreter", "container": {"type": "auto"}})
    body = {"model": "m", "input": "hi", "background": True, "tools": tools}
    reply = post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools", reply.text
    assert settled(base, who) == 0


@pytest.mark.parametrize("terminal", ["response.incomplete", "response.failed"])
def test_a_responses_stream_that_ends_incomplete_or_failed_is_charged_its_usage(
    gw: tuple[Proc, str], terminal: str
) -> None:
    """OpenAI's Responses API (an external upstream) ends a stream cut at `max_output_tokens` with
    `response.incomplete`, a failed one with `response.failed`, each with the usage inside `response`. Only
    `response.completed` was read: such a stream was charged an estimate and counted as one without usage."""
    _, base = gw
    who = token()
    fresh_minute()
    body = {"model": "m", "input": "hi", "stream": True, "max_output_tokens": 1000}
    reply = post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4, "terminal": terminal})
    assert reply.status_code == 200 and terminal in reply.text
    assert charged(base, who, 17) == 17


def test_embeddings_are_charged_their_prompt(gw: tuple[Proc, str]) -> None:
    _, base = gw
    who = token()
    fresh_minute()
    assert post(base, "/v1/embeddings", {"model": "m", "input": ["a", "b"]}, who, {"prompt": 9}).status_code == 200
    assert charged(base, who, 9) == 9


@pytest.mark.parametrize("position", ["before_trailing", "first"])
def test_usage_anywhere_in_a_body_read_in_small_pieces(gw: tuple[Proc, str], position: str) -> None:
    """vLLM writes prompt_logprobs, prompt_token_ids, kv_transfer_params after usage: not in the last reads."""
    _, base = gw
    who = token()
    fresh_minute()
    plan = {"prompt": 21, "completion": 8, "position": position, "chunks": [4096, 1000, 7]}
    reply = post(base, CHAT, {"model": "m", "messages": [], "max_tokens": 8}, who, plan)
    assert reply.status_code == 200
    assert len(reply.content) - reply.content.index(b'"usage"') > (20_000 if position == "before_trailing" else 100)
    assert charged(base, who, 29) == 29


# --- no usage: a conservative estimate, never 0 ---------------------------------------------------


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    line = next((line for line in text.splitlines() if line.startswith(f"{name}{{{selector}}} ")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


@pytest.mark.parametrize(("path", "stream"), [(CHAT, False), ("/v1/completions", True)])
def test_a_2xx_without_usage_is_charged_an_estimate_and_counted(gw: tuple[Proc, str], path: str, stream: bool) -> None:
    _, base = gw
    who = token()
    before = metric(base, "bastion_usage_estimated_total", route=path)
    fresh_minute()
    body = json.dumps({"model": "m", "prompt": "x" * 400, "max_tokens": 30, "stream": stream}).encode()
    reply = post(base, path, body, who, {"report": False, "events": 3})
    assert reply.status_code == 200
    assert charged(base, who) == estimate(body, 30)  # what was reserved: the prompt estimate and max_tokens
    assert metric(base, "bastion_usage_estimated_total", route=path) == before + 1


@pytest.mark.parametrize(
    ("prompt", "n", "prompts"),
    [
        (["a", "b", "c", "d", "e", "f", "g", "h"], 1, 8),
        ([[1, 2], [3], [4, 5, 6]], 2, 6),
        ([1, 2, 3], 1, 1),  # token ids: one prompt
        ("one", 3, 3),
        (["x" * 70_000, 'y\\"[,]', "z"], 1, 3),  # past 64 KiB: counted in the bytes, not decoded
        ([list(range(20_000)), [7]], 1, 2),
    ],
)
def test_a_batch_of_prompts_reserves_max_tokens_for_each(
    gw: tuple[Proc, str], prompt: Any, n: int, prompts: int
) -> None:
    """vLLM generates up to max_tokens for every prompt of a list (and `n` for each): a 2xx without usage is
    charged what was reserved, which must be the cap of every prompt. It was one prompt's, whatever the list."""
    _, base = gw
    who = token()
    fresh_minute()
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 10, "n": n}).encode()
    reply = post(base, "/v1/completions", body, who, {"report": False})
    assert reply.status_code == 200
    if prompt == [1, 2, 3]:  # one prompt of token ids: its own count (engine.prompt_count), not the bytes'
        assert charged(base, who) == 3 + 10 * prompts
    else:  # several prompts: /tokenize takes one, so the estimate (and this upstream answers it 404 anyway)
        assert charged(base, who) == estimate(body, 10 * prompts)


EMBED = base64.b64encode(os.urandom(3000)).decode()  # a stand-in for a torch-saved tensor (vLLM's format)


@pytest.mark.parametrize(
    ("fields", "prompts"),
    [
        ({"prompt_embeds": [EMBED] * 4}, 4),
        ({"prompt_embeds": EMBED}, 1),
        ({"prompt_embeds": [EMBED] * 2, "prompt": ["a", "b"]}, 4),  # vLLM renders both: embeds, then prompts
        ({"prompt_embeds": [EMBED] * 2, "prompt": ""}, 2),
        ({"prompt_embeds": [EMBED] * 2, "prompt": None}, 2),
        ({"prompt_embeds": [EMBED * 8] * 3}, 3),  # past 64 KiB: counted in the bytes, not decoded
    ],
)
def test_a_batch_of_prompt_embeds_reserves_max_tokens_for_each(
    gw: tuple[Proc, str], fields: dict[str, Any], prompts: int
) -> None:
    """`prompt_embeds` (vLLM, --enable-prompt-embeds) is one base64 tensor or a list: each is a prompt that
    generates up to max_tokens, besides any `prompt`. The reservation (what a 2xx without usage is charged)
    counted one prompt whatever the list held. Its prompt estimate is the bytes / 4, far above the tokens a
    tensor holds: an over-reservation settled to the engine's usage, never an undercharge."""
    _, base = gw
    who = token()
    fresh_minute()
    body = json.dumps({"model": "m", **fields, "max_tokens": 10}).encode()
    reply = post(base, "/v1/completions", body, who, {"report": False})
    assert reply.status_code == 200
    assert charged(base, who) == estimate(body, 10 * prompts)
    settled = token()
    reply = post(base, "/v1/completions", body, settled, {"prompt": 9, "completion": 20})
    assert reply.status_code == 200 and charged(base, settled, 29) == 29  # the engine's usage, exactly


def raw_request(base: str, path: str, head: dict[str, str], chunks: list[bytes]) -> socket.socket:
    """A request with a chunked body on a raw socket (httpx would send a Content-Length)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    lines = [f"POST {path} HTTP/1.1", "host: x", "content-type: application/json", "transfer-encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in head.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    for chunk in chunks:
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    sock.sendall(b"0\r\n\r\n")
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_with_a_chunked_body_is_charged_from_the_bytes_received(
    gw: tuple[Proc, str], upstream: tuple[str, list[Received]], stream: bool
) -> None:
    """No Content-Length to estimate from: the bytes actually received are; no max_tokens: the default cap."""
    (_, base), (_, received) = gw, upstream
    who = token()
    fresh_minute(6)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "y" * 300}], "stream": stream}).encode()
    seen = len(received)
    sock = raw_request(base, CHAT, auth(who, {"delay": 2.0}), [body[:100], body[100:]])
    deadline = time.monotonic() + 5
    while len(received) == seen and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()  # gone before the first byte of the answer
    expected = estimate(body, 0 if stream else DEFAULT_MAX_TOKENS)  # a stream: no event was forwarded
    assert charged(base, who, expected) == expected > 0


# --- reserve at admission, settle at the end -------------------------------------------------------


def test_reservation_refused_when_it_does_not_fit_and_refunded_after(gw: tuple[Proc, str]) -> None:
    _, base = gw
    who = token(tpm=400)
    fresh_minute(8)
    body = {"model": "m", "messages": [], "max_tokens": 150}  # reserves 150 + its bytes / 4
    holder = threading.Thread(target=post, args=(base, CHAT, body, who, {"delay": 1.5, "prompt": 10, "completion": 10}))
    holder.start()
    time.sleep(0.5)  # the first request is in flight, its reservation held
    assert post(base, CHAT, {**body, "max_tokens": 300}, who, {}).status_code == 429
    refused = post(base, CHAT, {**body, "max_tokens": 300}, who, {})
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "tokens per minute" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 300
    assert refused.headers["x-ratelimit-limit-tokens"] == "400"
    holder.join()
    assert charged(base, who, 20) == 20  # settled to its usage: the rest of the reservation came back
    assert post(base, CHAT, {**body, "max_tokens": 300}, who, {"prompt": 1, "completion": 1}).status_code == 200


def parallel(bases: list[str], count: int, who: str, body: dict[str, Any], plan: dict[str, Any]) -> list[int]:
    statuses: list[int] = [0] * count
    start = threading.Barrier(count)

    def one(i: int) -> None:
        with httpx.Client(timeout=20) as client:
            client.get(bases[i % len(bases)] + "/health")  # connected: the requests leave together
            start.wait()
            reply = client.post(bases[i % len(bases)] + CHAT, json=body, headers=auth(who, plan))
            statuses[i] = reply.status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_tokens_per_minute_under_30_parallel_requests(gw: tuple[Proc, str]) -> None:
    """Overshoot by at most one request's reservation (each uses a little more than it reserved)."""
    _, base = gw
    body = {"model": "m", "messages": [{"role": "user", "content": "z" * 100}], "max_tokens": 100}
    reservation = estimate(json.dumps(body).encode(), 100)
    used = reservation + 5  # the prompt estimate was low
    who = token(tpm=8 * reservation + 50)  # room for 8 reservations, and for what 8 really use (to read it back)
    fresh_minute(10)
    statuses = parallel([base], 30, who, body, {"delay": 2.0, "prompt": used - 100, "completion": 100})
    admitted = statuses.count(200)
    assert statuses.count(429) == 30 - admitted
    assert admitted == 8  # all in flight together: exactly as many reservations as fit
    total = charged(base, who, admitted * used)
    assert total == admitted * used <= 8 * reservation + 50 + reservation


def test_two_gateways_on_one_redis_reserve_and_refund_exactly(upstream: tuple[str, list[Received]]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "z" * 100}], "max_tokens": 100}
    reservation = estimate(json.dumps(body).encode(), 100)
    with redis_server() as (_, url):
        env = {**ENV, "BASTION_REDIS_URL": url}
        with (
            gateway("--upstream-url", upstream[0], env=env) as (_, one),
            gateway("--upstream-url", upstream[0], env=env) as (_, two),
        ):
            who = token(tpm=8 * reservation)
            statuses = parallel([one, two], 30, who, body, {"delay": 2.0, "prompt": 10, "completion": 20})
            assert statuses.count(200) == 8 and statuses.count(429) == 22
            # Both gateways settled their 8 reservations down to 30 tokens each, in the shared window.
            assert charged(two, who, 8 * 30) == charged(one, who, 8 * 30) == 8 * 30
            # So there is room again: as many as fit in what the refunds gave back.
            again = parallel([one, two], 10, who, body, {"delay": 2.0, "prompt": 10, "completion": 20})
            assert again.count(200) == (8 * reservation - 8 * 30) // reservation, again


# --- the model allowlist -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{}", b'{"messages":[]}', b'{"model":null}', b'{"model":"other"}'])
def test_restricted_principal_without_its_model_is_refused(gw: tuple[Proc, str], body: bytes) -> None:
    _, base = gw
    reply = post(base, CHAT, body, token(models=["m"]), {})
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "model_not_allowed"


def test_restricted_principal_with_its_model_is_served(gw: tuple[Proc, str]) -> None:
    _, base = gw
    assert post(base, CHAT, {"model": "m", "messages": []}, token(models=["m"]), {}).status_code == 200


def test_form_uploads_pass_untouched_and_are_charged(
    gw: tuple[Proc, str], upstream: tuple[str, list[Received]]
) -> None:
    (_, base), (_, received) = gw, upstream
    form = httpx.Request("POST", base, files={"file": ("a.wav", b"RIFF" + bytes(range(256)) * 40)}, data={"model": "m"})
    body, content_type = form.read(), form.headers["content-type"]
    for report, expected in ((True, 12), (False, DEFAULT_MAX_TOKENS)):  # no usage: the completion cap
        who = token()
        fresh_minute()
        headers = {**auth(who, {"prompt": 9, "completion": 3, "report": report}), "content-type": content_type}
        reply = httpx.post(base + "/v1/audio/transcriptions", content=body, headers=headers, timeout=10)
        assert reply.status_code == 200 and reply.json()["text"] == "hi"
        assert received[-1].body == body  # forwarded byte for byte
        assert charged(base, who, expected) == expected
    restricted = {**auth(token(models=["m"])), "content-type": content_type}
    refused = httpx.post(base + "/v1/audio/transcriptions", content=body, headers=restricted, timeout=10)
    assert refused.status_code == 403  # its model is inside the form: a restricted key may not upload


# --- bounded inspection ---------------------------------------------------------------------------------


def rss(proc: Proc) -> int:
    with open(f"/proc/{proc.pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.serial  # /health latency measured
@pytest.mark.parametrize("shape", ["deep", "wide", "prompts"])
def test_health_answers_while_a_16_mib_hostile_body_is_refused(gw: tuple[Proc, str], shape: str) -> None:
    """`json.loads` on the event loop took ~1 s and ~430 MB for the wide one; now it is read in short bursts.
    A batch of prompts (as many strings as the step budget allows) is counted for its reservation in C."""
    proc, base = gw
    size = 16 * 1024 * 1024 - 100
    nested = b"[" * (size // 2) + b"]" * (size // 2) if shape == "deep" else b"[" + b"[]," * (size // 3) + b"[]]"
    if shape == "prompts":
        one = b'"' + b"a" * 97 + b'"'
        nested = b"[" + b",".join([one] * (size // 100)) + b"]"
    path = "/v1/completions" if shape == "prompts" else CHAT
    body = (b'{"prompt":' if shape == "prompts" else b'{"messages":') + nested + b',"model":"other"}'
    before = rss(proc)
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(post(base, path, body, token(models=["m"]), {})))
    latencies: list[float] = []
    with httpx.Client(base_url=base, timeout=5) as client:
        client.get("/health")
        sender.start()
        while sender.is_alive():
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.005)
    assert answer[0].status_code in (400, 403), answer[0].text
    assert len(latencies) >= 5
    slow = [latency for latency in latencies if latency >= 0.05]
    assert len(slow) <= 1 and max(latencies) < 0.25, latencies  # (one slow answer may be the machine's doing)
    assert rss(proc) - before < 100 * 1024 * 1024


# --- the property ---------------------------------------------------------------------------------------

STREAM_FORMS = [True, 1, "true", "yes", "on", "True", "t", "Y", False, 0, "false", "no", "off", "n", None]
OPTION_FORMS = [None, {}, {"include_usage": True}, {"include_usage": 1}, {"include_usage": "true"},
                {"include_usage": False}, {"include_usage": "off"}, {"continuous_usage_stats": True}]  # fmt: skip


def _cap(request: dict[str, Any], path: str) -> int:
    if path == "/v1/embeddings":
        return 0
    # The names vLLM reads on each route (chat: `max_completion_tokens or max_tokens`); another route's is ignored.
    names = {CHAT: ("max_completion_tokens", "max_tokens"), "/v1/completions": ("max_tokens",)}.get(
        path, ("max_output_tokens",)
    )
    asked = next((request[k] for k in names if request.get(k)), None)
    return (asked or DEFAULT_MAX_TOKENS) * max(1, request.get("n") or 1, request.get("best_of") or 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from([CHAT, "/v1/completions", "/v1/responses", "/v1/embeddings"]),
    stream=st.sampled_from(STREAM_FORMS),
    options=st.sampled_from(OPTION_FORMS),
    caps=st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.integers(1, 50),
            "max_completion_tokens": st.integers(1, 50),
            "n": st.integers(1, 3),
            "best_of": st.integers(1, 3),
        },
    ),
    pad=st.sampled_from([0, 70_000]),  # past 64 KiB the body is read by the scanner, not json.loads
    plan=st.fixed_dictionaries(
        {
            "prompt": st.integers(1, 500),
            "completion": st.integers(0, 500),
            "report": st.booleans(),
            "position": st.sampled_from(["end", "first", "before_trailing"]),
            "events": st.integers(0, 5),
            "chunks": st.lists(st.integers(1, 3000), min_size=1, max_size=4),
        }
    ),
)
def test_charged_tokens_are_the_usage_reported_or_the_estimate_never_zero(
    gw: tuple[Proc, str], path: str, stream: object, options: object, caps: dict[str, int], pad: int,
    plan: dict[str, Any],
) -> None:  # fmt: skip
    _, base = gw
    request: dict[str, Any] = {"model": "m", "input" if path == "/v1/embeddings" else "prompt": "p" * pad, **caps}
    if stream is not None:
        request["stream"] = stream
    if options is not None and path in (CHAT, "/v1/completions") and request.get("stream") not in (None, False, 0):
        request["stream_options"] = options
    body = json.dumps(request).encode()
    who = token()
    fresh_minute(10)
    reply = post(base, path, body, who, plan)
    assert reply.status_code == 200, reply.text
    streams = reply.headers["content-type"].startswith("text/event-stream")
    usage_event = '"choices": [], "usage"' in reply.text
    # vLLM's include_usage defaults to true once stream_options is given.
    client_asked = isinstance(options, dict) and options.get("include_usage", True) in (True, 1, "true")
    if streams and path in (CHAT, "/v1/completions"):
        assert usage_event is (client_asked and plan["report"]), "usage shown to a client that asked, only"
    if plan["report"]:
        expected = plan["prompt"] + (0 if path == "/v1/embeddings" else plan["completion"])
    else:  # what was reserved, or the events forwarded (one token each) if more: never 0
        events = plan["events"] + (2 if path == "/v1/responses" else 1) if streams else 0
        expected = estimate(body, max(_cap(request, path), events))
    assert expected > 0
    assert charged(base, who, expected) == expected, (streams, reply.text[-300:])


def test_a_cancel_is_not_held_behind_a_full_engine(upstream: tuple[str, list[Received]]) -> None:
    """Fairness on, the engine's capacity taken: a `cancel` (a retrieval, which generates nothing and is what
    frees the engine of a runaway background response) waited in the gateway's queue behind the very
    generation it meant to stop (2.5 s here, or a 429 past the class's deadline). Now it goes straight on."""
    env = {**ENV, "BASTION_ROUTES": STORED_ROUTES, "BASTION_FAIRNESS": "1", "BASTION_ENGINE_CAPACITY": "1"}
    with gateway("--upstream-url", upstream[0], env=env) as (_, base):
        who = token()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        held = threading.Thread(target=post, args=(base, CHAT, body, who, {"delay": 3.0}))
        held.start()
        try:
            time.sleep(0.5)  # the slow request holds the engine's one slot
            started = time.monotonic()
            reply = httpx.post(base + "/v1/responses/resp_bg/cancel", headers=auth(who, {}), timeout=10)
            waited = time.monotonic() - started
            assert reply.status_code == 200 and reply.json()["status"] == "cancelled", reply.text
            assert waited < 1.0, waited
        finally:
            held.join(timeout=15)


IMAGE = {"type": "input_image", "image_url": "https://example.invalid/a-4096x4096-image.png"}
TEXT_ONLY = [
    {"role": "user", "content": "hi"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
    {"role": "user", "content": [{"type": "input_text", "text": "more"}]},
]


@pytest.mark.parametrize(
    "parts",
    [
        [{"role": "user", "content": [{"type": "input_text", "text": "what is it?"}, IMAGE]}],
        [{"role": "user", "content": [{"type": "input_file", "file_url": "https://example.invalid/a.pdf"}]}],
        [{"type": "item_reference", "id": "msg_1"}],
        [{"type": "function_call_output", "call_id": "c", "output": [IMAGE]}],
        [{"role": "user", "content": "x" * 70_000}, {"role": "user", "content": "a list past 64 KiB: unread"}],
    ],
)
def test_a_background_response_needs_its_prompt_in_its_bytes(
    gw_background: tuple[Proc, str], upstream: tuple[str, list[Received]], parts: list[Any]
) -> None:
    """A background response is charged its reservation: the prompt estimated from the request's bytes. An image
    or file behind a URL (or a stored item, `item_reference`) is read by the engine as thousands of prompt
    tokens a 60-byte reference does not show: charged ~15 where the engine read thousands, like the
    `previous_response_id` that is refused for that reason. Refused; a text-only conversation is served."""
    _, base = gw_background
    who = token()
    fresh_minute()
    received = generations(upstream)
    fields: dict[str, Any] = {"model": "m", "background": True, "max_output_tokens": 10}
    reply = post(base, "/v1/responses", {**fields, "input": parts}, who, {"prompt": 13, "completion": 4})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "background_not_supported" and error["param"] == "input"
    assert generations(upstream) == received  # nothing reached the engine
    assert settled(base, who) == 0
    body = json.dumps({**fields, "input": TEXT_ONLY}).encode()
    assert post(base, "/v1/responses", body, who, {"prompt": 13, "completion": 4}).status_code == 200
    reserved = estimate(body, 10)
    assert charged(base, who, reserved) == reserved
