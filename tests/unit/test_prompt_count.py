"""The engine counts a prompt whose usage was never read (`engine.prompt_count`), against real scripted sockets:
what is asked of `/tokenize`, what its answers are worth, and the gateway charging it (or its estimate)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from bastion.accounting import charge
from bastion.context import Exchange
from bastion.engine.prompt_count import PromptCounter, count_of, tokenize_request
from bastion.engine.router import Backend, EngineGroup, Replica, Router
from bastion.engine.state import Phase, Upstream
from bastion.http import Client, Timeouts
from bastion.proxy import Proxy
from tests.support import ScriptedUpstream, by_path, free_port, hang, respond, sse
from tests.unit.test_proxy_failures import gateway_client

CHAT_ROUTE, COMPLETIONS_ROUTE = "/v1/chat/completions", "/v1/completions"


def asked(route: str, request: dict[str, Any], model: str = "m") -> Any:
    made = tokenize_request(route, json.dumps(request).encode(), model)
    return json.loads(made) if isinstance(made, bytes) else made


def test_a_chat_is_asked_with_its_messages_and_the_template_fields_it_carried() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}]
    request = {
        "model": "q",
        "messages": messages,
        "stream": True,
        "max_tokens": 9,
        "n": 3,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    assert asked(CHAT_ROUTE, request) == {
        "model": "m",
        "messages": messages,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    assert asked(CHAT_ROUTE, {"messages": messages}, model="") == {"messages": messages}  # no model: vLLM's default


def test_a_completion_is_asked_with_its_one_prompt_and_token_ids_count_themselves() -> None:
    assert asked(COMPLETIONS_ROUTE, {"prompt": "12345", "add_special_tokens": False}) == {
        "model": "m",
        "prompt": "12345",
        "add_special_tokens": False,
    }
    assert asked(COMPLETIONS_ROUTE, {"prompt": ["12345"]}) == {"model": "m", "prompt": "12345"}
    assert asked(COMPLETIONS_ROUTE, {"prompt": [1, 2, 3, 4]}) == 4
    assert asked(COMPLETIONS_ROUTE, {"prompt": [[5, 6, 7]]}) == 3


@pytest.mark.parametrize(
    "content",
    [
        ["1234567890"],
        [{"type": "input_text", "text": "1234567890"}],
        [{"type": "output_text", "text": "1234567890"}],
        [{"type": "refusal", "refusal": "1234567890"}],
        [{"type": "thinking", "thinking": "1234567890"}],
        [{"type": "text", "text": "1"}, "2", {"type": "input_text", "text": "3"}],
    ],
)
def test_every_part_vllm_reads_as_text_is_counted_not_estimated(content: list[Any]) -> None:
    # vLLM reads bare strings and these parts as text on a text-only model: a key holder who wrapped a digit-heavy
    # prompt in them paid its bytes/4 estimate, a quarter of the prefill, as before the count.
    messages = [{"role": "user", "content": content}]
    assert asked(CHAT_ROUTE, {"messages": messages}) == {"model": "m", "messages": messages}


@pytest.mark.parametrize("documents", [None, []])
def test_no_documents_written_as_null_or_empty_is_counted_not_estimated(documents: Any) -> None:
    # vLLM reads `"documents": null` (or []) as none: the prompt it runs is the one without them, so a key holder
    # who added the key paid the bytes/4 estimate.
    messages = [{"role": "user", "content": "1234567890"}]
    assert asked(CHAT_ROUTE, {"messages": messages, "documents": documents}) == {"model": "m", "messages": messages}


@pytest.mark.parametrize(
    ("route", "request_"),
    [
        (COMPLETIONS_ROUTE, {"prompt": ["a", "b"]}),  # several prompts: /tokenize takes one
        (COMPLETIONS_ROUTE, {"prompt": [[1], [2]]}),
        (COMPLETIONS_ROUTE, {"prompt": "a", "prompt_embeds": "AAAA"}),
        (COMPLETIONS_ROUTE, {"prompt": 5}),
        (COMPLETIONS_ROUTE, {"prompt": [1, True]}),
        (CHAT_ROUTE, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}),
        (CHAT_ROUTE, {"messages": [{"role": "user", "content": "x"}], "documents": [{"text": "d"}]}),
        (CHAT_ROUTE, {"messages": []}),
        (CHAT_ROUTE, {"messages": "x"}),
        ("/v1/responses", {"input": "x"}),
    ],
)
def test_shapes_tokenize_cannot_express_keep_the_estimate(route: str, request_: dict[str, Any]) -> None:
    assert asked(route, request_) is None
    assert tokenize_request(CHAT_ROUTE, b"[1]", "m") is None
    assert tokenize_request(CHAT_ROUTE, b"{not json", "m") is None


@pytest.mark.parametrize(
    ("answer", "count"),
    [
        (b'{"count":12,"max_model_len":32768,"tokens":[1]}', 12),
        (b'{"count":900000,"max_model_len":32768}', 32768),  # no prompt the engine ran is longer than that
        (b'{"count":900000,"max_model_len":"32768"}', 900000),
        (b'{"count":900000,"max_model_len":0}', 900000),
        (b'{"count":0,"tokens":[]}', 0),
        (b'{"count":-1}', None),
        (b'{"count":"12"}', None),
        (b'{"count":true}', None),
        (b'{"count":1.5}', None),
        (b'{"tokens":[1,2]}', None),
        (b"[12]", None),
        (b"<html>not found</html>", None),
    ],
)
def test_only_a_non_negative_integer_count_is_taken(answer: bytes, count: int | None) -> None:
    assert count_of(answer) == count


async def test_the_counter_asks_the_engine_with_its_key_and_takes_its_count() -> None:
    answer = b'{"count":20004,"max_model_len":32768,"tokens":[%s]}' % b",".join(b"7" for _ in range(20004))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "7 7"}], "stream": True}).encode()
    async with ScriptedUpstream(by_path({b"/tokenize": respond(200, answer)})) as engine, PromptCounter() as counter:
        upstream = Upstream(f"http://127.0.0.1:{engine.port}", "engine-key")
        assert await counter.count(upstream, CHAT_ROUTE, body, "m", "r1") == 20004
    head, sent = engine.requests[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /tokenize HTTP/1.1") and b"authorization: Bearer engine-key" in head
    assert json.loads(sent) == {"model": "m", "messages": [{"role": "user", "content": "7 7"}]}


@pytest.mark.parametrize(
    "script",
    [
        respond(404, b'{"detail":"Not Found"}'),
        respond(200, b"not json"),
        respond(200, b'{"count":-3}'),
        respond(500, b'{"count":12}'),
        hang,
        sse(b"data: 1\n\n", then_break=True),
    ],
    ids=["404", "not json", "negative", "500", "hangs", "broken"],
)
async def test_any_failure_is_none_within_the_timeout_with_one_debug_line(
    script: Any, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"model": "m", "prompt": "1 2 3"}).encode()
    caplog.set_level(logging.DEBUG, logger="bastion.engine.prompt_count")
    async with ScriptedUpstream(by_path({b"/tokenize": script})) as engine, PromptCounter(0.3) as counter:
        upstream = Upstream(f"http://127.0.0.1:{engine.port}", "engine-key")
        started = time.monotonic()
        assert await counter.count(upstream, COMPLETIONS_ROUTE, body, "m", "r2") is None
        assert time.monotonic() - started < 1.0
    [line] = [r for r in caplog.records if r.name == "bastion.engine.prompt_count"]
    assert line.levelno == logging.DEBUG and "r2" in line.getMessage() and "engine-key" not in line.getMessage()


async def test_a_refused_connection_is_none() -> None:
    async with PromptCounter(0.3) as counter:
        upstream = Upstream(f"http://127.0.0.1:{free_port()}", None)
        assert await counter.count(upstream, COMPLETIONS_ROUTE, b'{"prompt":"x"}', "m", "r3") is None


# --- through the gateway: a stream the engine breaks is charged the prompt the engine counts -------------------

EVENTS = (
    b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"7"}}]}\n\n',
)
STREAM = {"model": "m", "messages": [{"role": "user", "content": " ".join("7" * 400)}], "stream": True}


async def test_a_stream_the_engine_breaks_is_charged_the_prompt_it_counts() -> None:
    """Fails before: the prompt was charged len(body) // 4 (~212 here), whatever the engine counted."""
    seen: list[Exchange] = []
    routes = {
        b"/v1/chat/completions": sse(*EVENTS, then_break=True),
        b"/tokenize": respond(200, b'{"count":404,"max_model_len":32768,"tokens":[]}'),
    }
    async with ScriptedUpstream(by_path(routes)) as engine, gateway_client(engine.port, seen) as client:
        reply = await client.post("/v1/chat/completions", json=STREAM)
    assert reply.status_code == 200 and '"error"' in reply.text
    [exchange] = seen
    assert (exchange.reason, exchange.events, exchange.prompt_counted) == ("midstream", 2, 404)
    assert charge(exchange) == (404 + 2, False)
    assert exchange.prompt_estimate < 300  # what it was charged before
    tokenized = [r for r in engine.requests if r.startswith(b"POST /tokenize ")]
    assert len(tokenized) == 1 and b'"messages"' in tokenized[0] and b'"stream"' not in tokenized[0]


async def test_an_engine_without_tokenize_keeps_the_estimate_and_the_slot_is_released() -> None:
    seen: list[Exchange] = []
    routes = {b"/v1/chat/completions": sse(*EVENTS, then_break=True)}  # anything else: 404
    async with (
        ScriptedUpstream(by_path(routes)) as engine,
        gateway_client(engine.port, seen, rate_limit_max_concurrent=1) as client,
    ):
        first = await client.post("/v1/chat/completions", json=STREAM)
        second = await asyncio.wait_for(client.post("/v1/chat/completions", json=STREAM), 5)
    assert first.status_code == 200 and second.status_code == 200, second.text  # not a 429: the slot came back
    assert seen[0].prompt_counted is None
    assert charge(seen[0]) == (seen[0].prompt_estimate + 2, False)
    assert sum(r.startswith(b"POST /tokenize ") for r in engine.requests) == 2


async def test_a_stream_read_to_its_usage_asks_nothing() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}\n\n'
    seen: list[Exchange] = []
    routes = {b"/v1/chat/completions": sse(*EVENTS, usage, b"data: [DONE]\n\n")}
    async with ScriptedUpstream(by_path(routes)) as engine, gateway_client(engine.port, seen) as client:
        assert (await client.post("/v1/chat/completions", json=STREAM)).status_code == 200
    assert charge(seen[0]) == (10, False) and seen[0].prompt_counted is None
    assert not any(r.startswith(b"POST /tokenize ") for r in engine.requests)


async def test_a_client_that_left_before_the_head_is_charged_the_count_and_its_replica_released() -> None:
    """The client leaves while the engine is still prefilling (no response head yet): the replica `_open` had
    chosen was never handed back (its `outstanding` leaked, skewing least-outstanding routing) nor known to ask."""
    routes = {b"/v1/chat/completions": hang, b"/tokenize": respond(200, b'{"count":55,"tokens":[]}')}
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "1 2 3"}], "max_tokens": 7}).encode()
    exchange = Exchange(request_id="r4", method="POST", path=CHAT_ROUTE, route=CHAT_ROUTE, model="chat")
    exchange.prompt_estimate, exchange.completion_cap = 9, 7
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": CHAT_ROUTE, "raw_path": CHAT_ROUTE.encode()}
    scope.update(query_string=b"", headers=[(b"content-type", b"application/json")])
    exchange.attach(scope)
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.2)
        return {"type": "http.disconnect"}  # the client goes away

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent to a client that left")

    async with ScriptedUpstream(by_path(routes)) as engine, PromptCounter(1.0) as counter:
        asked_before_done: list[int] = []  # the fair queue's seat goes back before the engine is asked to count
        exchange.engine_done = lambda: asked_before_done.append(len(engine.requests))
        backend = Backend(Upstream(f"http://127.0.0.1:{engine.port}", None, Phase.READY), "chat/0")
        timeouts = Timeouts(connect=2, read=5, write=5, pool=2)
        async with Client(timeouts=timeouts, max_connections=4, keepalive_expiry=5) as client:
            router = Router([EngineGroup("chat", [Replica(0, backend)])])
            proxy = Proxy(router, client, methods=["POST"], counter=counter)
            await asyncio.wait_for(proxy(scope, receive, send), 5)
        assert asked_before_done == [1] and len(engine.requests) == 2  # the chat request, then /tokenize
    assert (exchange.outcome, exchange.forwarded, exchange.prompt_counted) == ("client_disconnect", True, 55)
    assert charge(exchange) == (55 + 7, False)
    assert backend.outstanding == 0
