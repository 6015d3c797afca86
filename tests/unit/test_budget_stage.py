"""The budget stage and GET /v1/usage in the request path: real auth (a key file with budgets), the real
proxy to a scripted upstream socket, the openai SDK as the client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

from bastion.accounting import charge
from bastion.app import Gateway, build_auth
from bastion.asgi import Message, Receive, Scope, Send, read_body
from bastion.auth.keys import KeyFile, create_key, write_key_file
from bastion.budget.calendar import Calendar, zone
from bastion.budget.endpoint import UsageEndpoint
from bastion.budget.ledger import BudgetLedger, Ledger
from bastion.budget.metrics import BudgetMetrics
from bastion.budget.middleware import BudgetStage, Resolver
from bastion.budget.policy import Budget, Period
from bastion.budget.redis_ledger import RedisLedger, connect
from bastion.config import Settings
from bastion.context import Exchange, exchange_of
from bastion.engine.router import Backend, EngineGroup, Replica, Router
from bastion.engine.state import Phase, Upstream
from bastion.http import Client, Timeouts
from bastion.proxy import Proxy
from bastion.ratelimit import RateLimiter, RateLimitMiddleware
from bastion.redisio import Redis
from tests.support import LoopbackServer, Proc, ScriptedUpstream, budget_hashes, free_port, redis_server, respond, sse

COMPLETION = json.dumps(
    {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "qwen",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 15, "completion_tokens": 20, "total_tokens": 35},
    }
).encode()
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


def held(exchange: Exchange) -> int:
    """What a request reserved: its prompt estimate plus its completion cap."""
    return exchange.prompt_estimate + exchange.completion_cap


class Estimate:
    """Stands in for the accounting stage (being built elsewhere): it sets the model and the reservation
    (prompt ~ body bytes / 4, plus max_tokens) from the body, then replays the body to the proxy."""

    def __init__(self, app: BudgetStage) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        body = await read_body(receive, 1 << 20)
        if body:
            payload = json.loads(body)
            exchange.model = payload.get("model", "")
            exchange.prompt_estimate = len(body) // 4
            exchange.completion_cap = payload.get("max_tokens", 0)
        pending = [body]

        async def replay() -> Message:
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


NOON = datetime.fromisoformat("2030-06-04T12:00:00+00:00").timestamp()  # the gateway's clock in these tests


class Harness:
    def __init__(
        self, tmp_path: Path, upstream_port: int, ledger: BudgetLedger, clock: float = NOON, **stage: object
    ) -> None:
        data = KeyFile()
        _, self.key_a = create_key(data, name="alice", budgets=[Budget(Period.DAY, 100)])
        _, self.key_b = create_key(data, name="bob")
        self.id_a, self.id_b = data.keys[0].id, data.keys[1].id
        write_key_file(tmp_path / "keys.json", data)
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            upstream_url=f"http://127.0.0.1:{upstream_port}",
            keys_file=tmp_path / "keys.json",
            auth_failure_limit=0,
        )
        self.client = Client(
            timeouts=Timeouts(connect=2, read=5, write=5, pool=2), max_connections=8, keepalive_expiry=5
        )
        upstream = Upstream(f"http://127.0.0.1:{upstream_port}", None, Phase.EXTERNAL)
        engine = EngineGroup("qwen2.5-7b-instruct", [Replica(0, Backend(upstream, "qwen2.5-7b-instruct/0"))])
        self.proxy = proxy = Proxy(Router((), default=engine), self.client, methods=("GET", "POST"))
        self.resolver = resolver = Resolver((Budget(Period.MONTH, 10_000),))  # a default for every principal
        self.ledger = ledger
        self.now = clock
        stage_app = BudgetStage(proxy, ledger, resolver, clock=lambda: self.now, **stage)  # type: ignore[arg-type]
        self.auth = build_auth(settings)
        v1 = self.auth.guard(UsageEndpoint(Estimate(stage_app), ledger, resolver, clock=lambda: self.now))
        self.seen: list[Exchange] = []
        self.app = Gateway(FastAPI(), v1, [self.seen.append])

    def http(self, key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://gw",
            headers={"authorization": f"Bearer {key}"},
        )

    def sdk(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, http_client=self.http(key), max_retries=2)


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream(respond(200, COMPLETION)) as server:
        yield server


async def test_admitted_requests_carry_budget_headers_and_settle_real_usage(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    h = Harness(tmp_path, upstream.port, Ledger(Calendar(zone("UTC"))))
    async with h.http(h.key_a) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        reserved = held(h.seen[0])
        assert response.headers["x-budget-remaining-tokens"] == str(100 - reserved)
        midnight = datetime.fromisoformat("2030-06-05T00:00:00+00:00")
        assert response.headers["x-budget-reset"] == midnight.isoformat()
        usage = (await client.get("/v1/usage")).json()
    day, week, month = usage["periods"]
    assert usage["object"] == "usage" and (usage["principal"], usage["name"]) == (h.id_a, "alice")
    assert day == {
        "period": "day",
        "model": None,
        "start": (midnight - timedelta(days=1)).isoformat(),
        "reset": midnight.isoformat(),
        "used": 35,  # the engine's usage, not the reservation
        "reserved": 0,
        "limit": 100,
        "remaining": 65,
    }
    assert (week["limit"], week["used"]) == (None, 35)
    assert (month["limit"], month["remaining"]) == (10_000, 10_000 - 35)  # the default applies
    assert usage["by_model"] == [{"model": "qwen", "used": {"day": 35, "week": 35, "month": 35}}]


async def test_a_spent_budget_is_a_429_the_sdk_does_not_retry(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    h = Harness(tmp_path, upstream.port, Ledger(Calendar(zone("UTC"))))
    sdk = h.sdk(h.key_a)
    for _ in range(2):  # 2 x 35 used; the next reservation (~38) does not fit in the 30 left
        await sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    served = len(upstream.requests)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    response = info.value.response
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "budget_exceeded")
    assert "30 of 100 per day are left" in error["message"] and response.headers["x-budget-reset"] in error["message"]
    assert response.headers["retry-after"] == str(12 * 3600)  # noon to midnight
    assert response.headers["x-budget-remaining-tokens"] == "30"
    assert response.headers["x-should-retry"] == "false"  # hours away: no SDK version retries in vain
    assert len(upstream.requests) == served  # nothing forwarded
    assert len(h.seen) == 3  # one attempt
    assert (h.seen[-1].status, h.seen[-1].reason) == (429, "budget_exceeded")
    async with h.http(h.key_b) as other:  # another key is not affected
        assert (await other.post("/v1/chat/completions", json=CHAT)).status_code == 200
    h.now = NOON + 12 * 3600 - 30  # half a minute before the reset: the SDK may wait it out and retry
    async with h.http(h.key_a) as client:
        near = await client.post("/v1/chat/completions", json=CHAT)
    assert (near.status_code, near.headers["retry-after"]) == (429, "30") and "x-should-retry" not in near.headers
    h.now = NOON + 12 * 3600  # midnight: a new day
    async with h.http(h.key_a) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_failures_release_and_broken_streams_keep_the_reservation(tmp_path: Path) -> None:
    refused = Harness(tmp_path, free_port(), Ledger(Calendar(zone("UTC"))))  # nothing listens: 502, no token
    async with refused.http(refused.key_a) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 502
        day = (await client.get("/v1/usage")).json()["periods"][0]
    assert (day["used"], day["reserved"]) == (0, 0)

    broken = sse(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', then_break=True)
    async with ScriptedUpstream(broken) as upstream:
        h = Harness(tmp_path / "b", upstream.port, Ledger(Calendar(zone("UTC"))))
        async with h.http(h.key_a) as client:
            await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            day = (await client.get("/v1/usage")).json()["periods"][0]
    assert h.seen[0].reason == "midstream"
    assert (day["used"], day["reserved"]) == (charge(h.seen[0])[0], 0)  # no usage: charged as the limits charge it


async def test_a_failing_charge_still_settles_the_budget(
    tmp_path: Path, upstream: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`charge` raising in the stage's `finally` skipped the settle: the reservation stayed held. Now it is settled
    to what was reserved (the conservative charge), and the failure logged once with the request id."""
    from bastion.budget import middleware

    def broken(exchange: Exchange) -> tuple[int, bool]:
        raise RuntimeError("a bug in accounting")

    monkeypatch.setattr(middleware, "charge", broken)  # the one failure injected
    h = Harness(tmp_path, upstream.port, Ledger(Calendar(zone("UTC"))))
    async with h.http(h.key_a) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        day = (await client.get("/v1/usage")).json()["periods"][0]
    reserved = h.seen[0].prompt_estimate + h.seen[0].completion_cap
    assert (day["used"], day["reserved"]) == (reserved, 0)
    [record] = [r for r in caplog.records if r.name == "bastion.budget"]
    expected = f"request {h.seen[0].request_id}: charging it failed; budget settled to its reservation"
    assert record.getMessage() == expected and record.exc_info is not None


async def test_usage_shows_the_callers_principal_only(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    h = Harness(tmp_path, upstream.port, Ledger(Calendar(zone("UTC"))))
    async with h.http(h.key_a) as alice, h.http(h.key_b) as bob:
        assert (await alice.post("/v1/chat/completions", json=CHAT)).status_code == 200
        answer = await bob.get("/v1/usage", params={"principal": h.id_a, "key": h.id_a})
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        assert (answer.json()["principal"], answer.json()["periods"][0]["used"]) == (h.id_b, 0)
        assert h.id_a not in answer.text and "alice" not in answer.text
        assert (await bob.post("/v1/usage")).status_code == 405
    async with h.http("bst-nope_" + "x" * 43) as stranger:
        assert (await stranger.get("/v1/usage")).status_code == 401


async def test_metrics_follow_the_principal_label_setting(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    for by_principal in (True, False):
        registry = CollectorRegistry()
        h = Harness(
            tmp_path / str(by_principal),
            upstream.port,
            Ledger(Calendar(zone("UTC"))),
            metrics=BudgetMetrics(registry, by_principal=by_principal),
        )
        async with h.http(h.key_a) as client:
            for _ in range(3):
                await client.post("/v1/chat/completions", json=CHAT)
        text = generate_latest(registry).decode()
        assert 'bastion_budget_refused_total{period="day"} 1.0' in text
        left = 100 - 35 - held(h.seen[1])  # as of the last admitted request, its reservation held
        assert (f'bastion_budget_remaining_tokens{{period="day",principal="alice"}} {left}.0' in text) is by_principal
        assert ("bastion_budget_remaining_tokens" in text) is by_principal


@pytest.mark.parametrize("fail_open", [True, False])
async def test_unreachable_redis_fails_open_or_closed(
    tmp_path: Path, upstream: ScriptedUpstream, fail_open: bool
) -> None:
    dead = RedisLedger(connect(f"redis://127.0.0.1:{free_port()}/0", 0.5), Calendar(zone("UTC")))
    h = Harness(tmp_path, upstream.port, dead, fail_open=fail_open)
    started = time.monotonic()
    async with h.http(h.key_a) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        usage = await client.get("/v1/usage")
    assert time.monotonic() - started < 5
    if fail_open:
        assert response.status_code == 200 and "x-budget-remaining-tokens" not in response.headers
    else:
        assert (response.status_code, response.json()["error"]["code"]) == (503, "budget_unavailable")
        assert response.headers["retry-after"] == "1"
    assert usage.status_code == 503


class _WrongType(LoopbackServer):
    """A Redis that answers every command with an error reply: what a key of the wrong type or a broken script
    gets. Redis answered, so this is a bug to show, not an outage for the fail mode to paper over."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.read(65536):
                writer.write(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
                await writer.drain()


async def test_an_error_reply_from_the_ledger_is_a_500_never_budgets_off(
    tmp_path: Path, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    async with _WrongType() as redis:
        broken = RedisLedger(connect(f"redis://127.0.0.1:{redis.port}/0", 0.5), Calendar(zone("UTC")))
        h = Harness(tmp_path, upstream.port, broken, fail_open=True)
        async with h.http(h.key_a) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
    assert (response.status_code, response.json()["error"]["code"]) == (500, "internal_error")
    assert upstream.requests == [], "nothing was forwarded without its budget"
    assert h.seen[-1].reason == "budget_internal"
    assert "WRONGTYPE" in caplog.text and "Traceback" in caplog.text


def _post(path: str, key: str, body: bytes) -> tuple[Scope, Receive]:
    """An HTTP/1.1 POST's scope and a `receive` that gives its body, then waits (the client stays)."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"gw"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return scope, receive


async def _cancel_once_frozen(
    app: Gateway, scope: Scope, receive: Receive, redis: Proc, client: Redis
) -> list[Message]:
    """Run one request; freeze Redis as its response ends (what is written next gets no reply), cancel the
    request while it waits on Redis (uvicorn's graceful shutdown running out), then thaw Redis."""
    sent: list[Message] = []
    writes = client.writes

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            redis.signal(signal.SIGSTOP)

    task = asyncio.create_task(app(scope, receive, send))
    try:
        deadline = time.monotonic() + 5
        while not (sent and not sent[-1].get("more_body", True)):
            assert time.monotonic() < deadline and not task.done(), sent
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # what the request's end writes is written, its reply awaited
        assert not task.done() and client.writes > writes
        task.cancel()
        await asyncio.sleep(0.1)
    finally:
        redis.signal(signal.SIGCONT)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    return sent


async def test_a_request_cancelled_while_its_settle_is_awaited_still_reaches_the_listeners(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    """The gateway awaits the settle the budget stage left it (`Exchange.deferred`) before its listeners (metrics,
    the audit line, the in-flight gauge's -1) see the exchange. A cancellation there (uvicorn's graceful
    shutdown running out while Redis is slow) must not skip them: the request was served and is recorded."""
    with redis_server() as (proc, url):
        client = connect(url, 10.0)
        h = Harness(tmp_path, upstream.port, RedisLedger(client, Calendar(zone("UTC"))))
        scope, receive = _post("/v1/chat/completions", h.key_b, json.dumps(CHAT).encode())
        try:
            sent = await _cancel_once_frozen(h.app, scope, receive, proc, client)
        finally:
            await client.aclose()
            await h.client.aclose()
    assert sent[0]["status"] == 200
    assert [e.status for e in h.seen] == [200], "the listeners never saw a served request"
    assert h.seen[0].finished is not None


async def test_a_reservation_issued_with_the_limits_is_given_back_when_the_limiters_finish_is_cancelled(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    """Limits and budgets on one Redis: the budget's reservation leaves with the requests/min hit, and a request
    a stage before the budget answers (here the usage endpoint's 405 to a POST with a body) never claims it:
    the limits' stage gives it back as the request ends. Cancelled while the limiter's own finish waits on
    Redis, it must still be given back: the reservation (prompt + max_tokens) would stay counted for the month."""
    with redis_server() as (proc, url):
        client = connect(url, 10.0)
        ledger = RedisLedger(client, Calendar(zone("UTC")))
        h = Harness(tmp_path, upstream.port, ledger)
        limiter = RateLimiter(rpm=100, tpm=100_000, max_concurrent=4, redis=client)
        await limiter._load_scripts()
        for script in (ledger._reserve, ledger._settle):  # loaded, as in a gateway that served a request
            await script.load()
        stage = BudgetStage(h.proxy, ledger, h.resolver, clock=lambda: h.now)
        v1 = h.auth.guard(Estimate(RateLimitMiddleware(UsageEndpoint(stage, ledger, h.resolver), limiter, stage)))
        app = Gateway(FastAPI(), v1, [h.seen.append])
        scope, receive = _post("/v1/usage", h.key_b, json.dumps(CHAT).encode())
        try:
            sent = await _cancel_once_frozen(app, scope, receive, proc, client)
            await asyncio.sleep(0.2)  # thawed: what was written is applied
            hashes = await budget_hashes(url)
        finally:
            await client.aclose()
            await h.client.aclose()
    assert sent[0]["status"] == 405
    assert hashes and all(int(h.get(b"t", 0)) == int(h.get(b"s", 0)) for h in hashes), hashes
