"""The router's choice (pure) and the proxy's forward step over real scripted sockets: retry once elsewhere."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bastion.context import Exchange
from bastion.engine.engines import parse_engines
from bastion.engine.fleet import waiting_of
from bastion.engine.router import Backend, EngineGroup, Replica, Router
from bastion.engine.state import Phase, Upstream
from bastion.http import Client, Timeouts
from bastion.proxy import Proxy
from tests.support import ScriptedUpstream, free_port, respond


def group(name: str, count: int, base: str = "http://127.0.0.1:1") -> EngineGroup:
    return EngineGroup(
        name, [Replica(i, Backend(Upstream(base, None, Phase.READY), f"{name}/{i}")) for i in range(count)]
    )


def test_least_outstanding_wins_and_waiting_breaks_ties() -> None:
    chat = group("chat", 3)
    router = Router([chat])
    a, b, c = (r.backend for r in chat.replicas)
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 1
    b.waiting, c.waiting = 5, 0
    assert router.acquire(chat) is c
    assert c.outstanding == 2
    c.release()
    c.upstream.set(Phase.RESTARTING)
    assert router.acquire(chat) is b  # not-ready replicas are skipped
    assert router.acquire(chat, exclude=b) is a


def test_equal_replicas_take_turns() -> None:
    chat = group("chat", 2)
    router = Router([chat])
    picks = []
    for _ in range(10):
        backend = router.acquire(chat)
        assert backend is not None
        picks.append(backend.label)
        backend.release()
    assert picks.count("chat/0") == picks.count("chat/1") == 5


def test_affinity_holds_only_within_the_load_guard() -> None:
    chat = group("chat", 2)
    router = Router([chat], session_header=b"x-session-id")
    key = router.affinity([(b"x-session-id", b"alice")], b"")
    assert key is not None
    preferred = chat.replicas[key % 2].backend
    other = chat.replicas[(key + 1) % 2].backend
    preferred.outstanding, other.outstanding = 8, 8
    assert router.acquire(chat, key) is preferred
    preferred.outstanding, other.outstanding = 20, 8  # far above the least loaded: the guard sends it elsewhere
    assert router.acquire(chat, key) is other
    assert Router([chat]).affinity([], b"{...}") is None  # prefix affinity is off unless configured
    assert Router([chat], prefix_bytes=4).affinity([], b"abcdXYZ") == Router([chat], prefix_bytes=4).affinity(
        [], b"abcdQQQ"
    )


def test_unknown_model_and_the_one_engine_default() -> None:
    chat = group("chat", 1)
    assert Router([chat]).group("nope") is None
    assert Router([chat]).group("") is chat
    assert Router((), default=chat).group("anything") is chat


def test_engine_entries_are_checked_one_line_each() -> None:
    with pytest.raises(ValueError, match="share_gpus"):
        parse_engines(
            [{"model": "a", "vllm_model": "/m", "gpus": [0]}, {"model": "b", "vllm_model": "/m", "gpus": "0"}], {}
        )
    entries = parse_engines(
        [
            {"model": "a", "vllm_model": "/m", "gpus": [0, 1], "replicas": 2},
            {"model": "b", "vllm_model": "/m", "gpus": [1], "share_gpus": True},
        ],
        {},
    )
    assert entries[0].gpus_of(1) == (1,)
    with pytest.raises(ValueError, match="replicas"):
        parse_engines([{"model": "a", "url": "http://x"}, {"model": "a", "url": "http://y"}], {})
    with pytest.raises(ValueError, match="not set"):
        parse_engines([{"model": "a", "url": "http://x", "api_key_env": "NOPE_UNSET"}], {})
    assert (
        parse_engines([{"model": "a", "url": "http://x", "api_key_env": "K"}], {"K": "s3cret"})[0].api_key == "s3cret"
    )


def test_waiting_is_read_from_vllm_metrics() -> None:
    page = b'# HELP x\nvllm:num_requests_waiting{model_name="a"} 3.0\nvllm:num_requests_waiting_x 9\n'
    assert waiting_of(page) == 3


async def _call(proxy: Proxy, model: str) -> tuple[int, bytes, Exchange]:
    body = json.dumps({"model": model, "messages": []}).encode()
    exchange = Exchange(request_id="r1", method="POST", path="/v1/chat/completions", model=model)
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    exchange.attach(scope)
    sent: list[dict[str, Any]] = []
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await proxy(scope, receive, send)
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:]), exchange


def test_a_refused_not_ready_or_dead_engine_replica_is_retried_once_on_another() -> None:
    async def run() -> None:
        ok = respond(200, b'{"ok":true}')
        # vLLM's API server answers 500 (EngineDeadError) between its engine core's death and its own exit.
        dead_core = respond(500, b'{"error":{"message":"EngineCore encountered an issue.","code":500}}')
        async with (
            ScriptedUpstream(ok) as good,
            ScriptedUpstream(respond(503, b'{"x":1}')) as unready,
            ScriptedUpstream(dead_core) as dying,
        ):
            dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
            client = Client(
                timeouts=Timeouts(connect=2, read=5, write=5, pool=2), max_connections=8, keepalive_expiry=5
            )
            async with client:
                for first in (dead, f"http://127.0.0.1:{unready.port}", f"http://127.0.0.1:{dying.port}"):
                    chat = EngineGroup(
                        "chat",
                        [
                            Replica(0, Backend(Upstream(first, None, Phase.READY), "chat/0")),
                            Replica(1, Backend(Upstream(f"http://127.0.0.1:{good.port}", None, Phase.READY), "chat/1")),
                        ],
                    )
                    chat.replicas[1].backend.waiting = 1  # the tie-breaker makes replica 0 the first choice
                    proxy = Proxy(Router([chat]), client, methods=["POST"])
                    status, body, exchange = await _call(proxy, "chat")
                    assert (status, body) == (200, b'{"ok":true}')
                    assert exchange.engine == "chat/1"
                    assert all(r.backend.outstanding == 0 for r in chat.replicas)  # every acquire released
                # With no other replica, the replica's own answer (or failure) is what the client gets.
                solo = group("chat", 1, f"http://127.0.0.1:{unready.port}")
                status, body, _ = await _call(Proxy(Router([solo]), client, methods=["POST"]), "chat")
                assert (status, body) == (503, b'{"x":1}')
                status, body, _ = await _call(Proxy(Router([solo]), client, methods=["POST"]), "other")
                assert status == 404 and b"model_not_found" in body
                # Both replicas failing: tried twice, then the second answer is the client's.
                both = EngineGroup(
                    "chat",
                    [
                        Replica(i, Backend(Upstream(f"http://127.0.0.1:{dying.port}", None, Phase.READY), f"chat/{i}"))
                        for i in range(2)
                    ],
                )
                status, body, _ = await _call(Proxy(Router([both]), client, methods=["POST"]), "chat")
                assert status == 500 and b"EngineCore" in body
                assert all(r.backend.outstanding == 0 for r in both.replicas)

    asyncio.run(run())
