"""BASTION_ENFORCE_MAX_TOKENS: a request that sets no completion cap stops where its reservation did.

Without it the engine's own default applies (vLLM: the rest of the context window; the simulator of
this module: 12 tokens), while the gateway reserved BASTION_DEFAULT_MAX_TOKENS: one request could
overrun tokens/min and a budget by the difference until settled. With it the default is written into
the request (chat and completions: `max_tokens`; responses: `max_output_tokens`), so the engine
generates at most what was reserved; a client's own cap is kept.
"""

from __future__ import annotations

import httpx

from tests.support import AUTH, gateway

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def completion_tokens(reply: httpx.Response) -> int:
    assert reply.status_code == 200, reply.text
    return int(reply.json()["usage"]["completion_tokens"])


def test_the_default_cap_is_written_into_a_request_that_sets_none(sim: str) -> None:
    env = {"BASTION_ENFORCE_MAX_TOKENS": "true", "BASTION_DEFAULT_MAX_TOKENS": "3"}
    direct = httpx.post(sim + "/v1/chat/completions", json=CHAT, timeout=10)
    assert completion_tokens(direct) == 12  # the engine's own default, past the gateway's reservation of 3
    with gateway("--upstream-url", sim, env=env) as (_, base), httpx.Client(base_url=base, timeout=10) as http:
        assert completion_tokens(http.post("/v1/chat/completions", json=CHAT, headers=AUTH)) == 3
        unset = {**CHAT, "max_tokens": None}  # null is no cap to vLLM: replaced too
        assert completion_tokens(http.post("/v1/chat/completions", json=unset, headers=AUTH)) == 3
        own = {**CHAT, "max_tokens": 5}  # a client's own cap, even above the default, is the client's
        assert completion_tokens(http.post("/v1/chat/completions", json=own, headers=AUTH)) == 5
        streamed = b""
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as reply:
            assert reply.status_code == 200
            for chunk in reply.iter_bytes():
                streamed += chunk
        assert streamed.count(b'"delta":{"content"') == 3, streamed[-600:]
        assert b'"usage"' not in streamed  # the usage the gateway asked for is still hidden from this client


def test_a_cap_of_another_route_is_no_cap(sim: str) -> None:
    """Chat has no `max_output_tokens` (the engine ignores it): it reserved 1 token while the engine generated
    its own default (12), past every limit the feature is there to hold."""
    env = {"BASTION_ENFORCE_MAX_TOKENS": "true", "BASTION_DEFAULT_MAX_TOKENS": "3"}
    foreign = {**CHAT, "max_output_tokens": 1}
    assert completion_tokens(httpx.post(sim + "/v1/chat/completions", json=foreign, timeout=10)) == 12
    with gateway("--upstream-url", sim, env=env) as (_, base), httpx.Client(base_url=base, timeout=10) as http:
        assert completion_tokens(http.post("/v1/chat/completions", json=foreign, headers=AUTH)) == 3
