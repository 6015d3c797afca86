"""A client that leaves is charged its prompt as the engine counts it, through a real gateway and a supervised
simulator (which answers `/tokenize` as its usage counts); an upstream without `/tokenize` keeps the estimate.

The prompt is digit-heavy: one-digit words, 2 bytes per token to the simulator (~1 per byte to Qwen's
tokenizer), so the estimate from the bytes (`len(body) // 4`) is half of what the engine prefilled. What was
charged is read from outside: tokens/min (`x-ratelimit-*` on `GET /v1/models`) and the budget (`GET /v1/usage`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion.auth.jwt import mint
from tests.integration.vllm_like import Received, vllm_like
from tests.support import gateway, simulator

JWT_SECRET = "prompt-count-jwt-secret-0123456789abcdef"
MODEL = "qwen2.5-7b-instruct"
# Long streams (a token every 3 s after the first): the client leaves long before the next one.
SIM = "{python} -m bastion simulate --host {host} --port {port} --tokens 400 --itl 3"
BIG = 10**9
ENV = {
    "BASTION_JWT_SECRET": JWT_SECRET,
    "BASTION_RATE_LIMIT_RPM": "0",
    "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0",
    "BASTION_RATE_LIMIT_TPM": str(BIG),
    "BASTION_BUDGET_DAY": str(BIG),
    "BASTION_AUDIT_LOG": "off",
}
DIGITS = " ".join("7" * 20_000)  # 20 000 tokens to the simulator in ~40 KB
CAP = 300


def token() -> str:
    """A fresh principal: its own tokens/min window and its own budget."""
    return mint(JWT_SECRET, "count-" + os.urandom(6).hex(), 600)


def request(route: str, *, stream: bool) -> dict[str, Any]:
    if route == "/v1/chat/completions":
        return {"model": MODEL, "messages": [{"role": "user", "content": DIGITS}], "max_tokens": CAP, "stream": stream}
    return {"model": MODEL, "prompt": DIGITS, "max_tokens": CAP, "stream": stream}


def charged(base: str, credential: str) -> tuple[int, int]:
    """(tokens/min charged, budget used) for `credential`."""
    headers = {"authorization": f"Bearer {credential}"}
    limits = httpx.get(base + "/v1/models", headers=headers, timeout=10)
    assert limits.status_code == 200, limits.text
    tpm = int(limits.headers["x-ratelimit-limit-tokens"]) - int(limits.headers["x-ratelimit-remaining-tokens"])
    usage = httpx.get(base + "/v1/usage", headers=headers, timeout=10)
    assert usage.status_code == 200, usage.text
    return tpm, usage.json()["periods"][0]["used"]


def settled(base: str, credential: str, expected: int) -> tuple[int, int]:
    """What is charged once the request settled (it settles after the gateway asked the engine)."""
    deadline = time.monotonic() + 5
    while (now := charged(base, credential)) != (expected, expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def fresh_minute(margin: float = 8.0) -> None:
    """Memory windows are epoch minutes: keep a request and the check of its charge inside one."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def leave(
    base: str,
    path: str,
    body: bytes,
    credential: str,
    *,
    events: int = 0,
    after: float = 0.0,
    plan: dict[str, Any] | None = None,
) -> None:
    """Send a request on a raw socket and go away: after `events` stream events, or `after` seconds."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {credential}\r\n"
        if plan is not None:  # what the vLLM-like upstream is to answer (tests/integration/vllm_like.py)
            head += f"x-plan: {json.dumps(plan)}\r\n"
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        while received.count(b"\n\n") < events:
            chunk = sock.recv(65536)
            assert chunk, received[-300:]
            received += chunk
        time.sleep(after)


@pytest.fixture(scope="module")
def gw() -> Iterator[str]:
    with gateway("--upstream-command", SIM, env=ENV) as (_, base):
        yield base


def engine_count(base: str, route: str) -> int:
    """The prompt's tokens as the engine reports them in its usage, for the same prompt read to its end."""
    reply = httpx.post(
        base + route, json={**request(route, stream=False), "max_tokens": 1}, headers=auth(token()), timeout=20
    )
    assert reply.status_code == 200, reply.text
    prompt: int = reply.json()["usage"]["prompt_tokens"]
    return prompt


def auth(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


@pytest.mark.parametrize(
    ("route", "events"), [("/v1/chat/completions", 2), ("/v1/completions", 1)], ids=["chat", "completions"]
)
def test_a_stream_left_after_its_first_token_is_charged_the_prompt_the_engine_counts(
    gw: str, route: str, events: int
) -> None:
    """Fails before: the prompt was charged len(body) // 4, half of what the engine counted (and prefilled)."""
    prompt = engine_count(gw, route)
    who = token()
    body = json.dumps(request(route, stream=True)).encode()
    fresh_minute()
    leave(gw, route, body, who, events=events)  # chat: its role event and first token; completions: the token
    expected = prompt + events
    assert settled(gw, who, expected) == (expected, expected)
    assert expected > len(body) // 4 + events + 9_000  # the estimate it was charged before


def test_a_request_whose_client_left_before_its_answer_is_charged_the_prompt_the_engine_counts(gw: str) -> None:
    """Not streamed: the prompt and its cap. Fails before: the prompt was len(body) // 4."""
    route = "/v1/chat/completions"
    prompt = engine_count(gw, route)
    who = token()
    body = json.dumps(request(route, stream=False)).encode()
    fresh_minute()
    leave(gw, route, body, who, after=1.0)
    expected = prompt + CAP
    assert settled(gw, who, expected) == (expected, expected)
    assert expected > len(body) // 4 + CAP + 9_000


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"], ids=["chat", "completions"])
@pytest.mark.parametrize("text", [DIGITS, "Say hello to the   quiet world", "x"], ids=["digits", "words", "one"])
def test_the_simulators_tokenize_agrees_with_its_usage(route: str, text: str) -> None:
    with simulator() as (_, base), httpx.Client(base_url=base, timeout=10) as http:
        if route == "/v1/chat/completions":
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
            asked: dict[str, Any] = {"model": MODEL, "messages": messages}
        else:
            asked = {"model": MODEL, "prompt": text}
        usage = http.post(route, json={**asked, "max_tokens": 2}).json()["usage"]
        tokenized = http.post("/tokenize", json=asked)
        assert tokenized.status_code == 200
        answer = tokenized.json()
        assert answer["count"] == usage["prompt_tokens"] == len(answer["tokens"])


@pytest.fixture(scope="module")
def plain() -> Iterator[tuple[str, list[Received]]]:
    with vllm_like() as pair:
        yield pair


def test_an_upstream_without_tokenize_keeps_the_estimate_and_releases_the_slot(
    plain: tuple[str, list[Received]],
) -> None:
    """404 to /tokenize (an OpenAI-compatible upstream that is not vLLM): the estimate, settled, slot released."""
    env = {**ENV, "BASTION_RATE_LIMIT_MAX_CONCURRENT": "1"}
    with gateway("--upstream-url", plain[0], env=env) as (_, base):
        who = token()
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": DIGITS}], "stream": True}).encode()
        fresh_minute()
        # The upstream answers after 2 s: the client leaves before its first token.
        leave(base, "/v1/chat/completions", body, who, after=0.5, plan={"delay": 2.0})
        expected = len(body) // 4
        assert settled(base, who, expected) == (expected, expected)
        started = time.monotonic()
        after = httpx.post(base + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=auth(who))
        assert after.status_code == 200, after.text  # not 429: the one concurrency slot was given back
        assert time.monotonic() - started < 1.5
        assert [r.path for r in plain[1] if r.path == "/tokenize"] == ["/tokenize"]
