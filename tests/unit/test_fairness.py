"""Priority classes, the priority a client may send, and the gateway's fair queue (issue 20)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bastion.asgi import Message, Receive, Scope, Send
from bastion.auth.identity import Principal
from bastion.auth.jwt import JWTConfig, JWTVerifier, mint
from bastion.config import ConfigError, Settings, load
from bastion.context import Exchange, exchange_of
from bastion.engine.router import Backend, EngineGroup, Replica, Router
from bastion.engine.state import Phase, Upstream
from bastion.engine.vllm import VllmArgs, vllm_command
from bastion.fairness.classes import DEFAULT_CLASSES, parse_classes
from bastion.fairness.gate import Gate, Refused, Shed
from bastion.fairness.groups import GateLimits, follow_groups, group_gates, group_of
from bastion.fairness.scrape import waiting_of
from bastion.fairness.stage import FairShare
from bastion.request_body import RequestInspector

CLASSES = parse_classes(DEFAULT_CLASSES, "standard")
INTERACTIVE, STANDARD, BATCH = CLASSES.classes
SECRET = "s" * 40


def test_classes_parse_in_order_and_refuse_mistakes_in_one_line() -> None:
    assert [c.name for c in CLASSES.classes] == ["interactive", "standard", "batch"]
    assert CLASSES.of(None) is STANDARD
    assert CLASSES.of(Principal("k", "k", "key", priority_class="batch")) is BATCH
    assert CLASSES.of(Principal("k", "k", "key", priority_class="removed")) is BATCH  # unknown: lowest, never higher
    for text, words in [
        ('{"a": {"order": 0}, "b": {"order": 0}}', "same order"),
        ('{"a": {"order": 0, "weight": 0}}', "weight"),
        ('{"a": {"order": 0, "speed": 1}}', "only order"),
        ("[]", "non-empty JSON object"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_classes(text, "a")
    with pytest.raises(ValueError, match="default class 'gold'"):
        parse_classes(DEFAULT_CLASSES, "gold")


async def test_a_token_cannot_claim_a_class_above_the_ceiling() -> None:
    orders = {c.name: c.order for c in CLASSES.classes}
    verifier = JWTVerifier(JWTConfig(secret=SECRET, class_orders=orders, max_priority_class="standard"))
    claims = {"interactive": "standard", "batch": "batch", "standard": "standard", "gold": None, None: None}
    for claimed, expected in claims.items():
        token = mint(SECRET, "alice", 60, priority_class=claimed)
        assert (await verifier.verify(token)).priority_class == expected


@pytest.mark.parametrize("large", [False, True], ids=["json.loads", "scanner"])
async def test_the_forwarded_priority_is_the_principals_class_and_a_client_cannot_raise_itself(large: bool) -> None:
    inspector = RequestInspector(default_max_tokens=16, full_parse_limit=0 if large else 64 * 1024)
    chat = "/v1/chat/completions"

    async def sent(body: dict[str, object], floor: int, assign: bool = True) -> tuple[object, int | None]:
        raw, facts = await inspector.inspect(chat, json.dumps(body).encode(), priority=floor, assign_priority=assign)
        return json.loads(raw).get("priority"), facts.priority

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert await sent(base, 2) == (2, 2)  # written in
    assert await sent({**base, "priority": 0}, 2) == (2, 2)  # batch cannot claim interactive
    assert await sent({**base, "priority": "-7"}, 1) == (1, 1)
    assert await sent({**base, "priority": 5}, 1) == (5, 5)  # lowering itself is its right
    assert await sent({**base, "priority": -3}, 0, assign=False) == (0, 0)  # classes off: held to 0
    assert await sent(base, 0, assign=False) == (None, None)  # classes off, none sent: untouched bytes
    raw = json.dumps({**base, "stream": True, "priority": -1}).encode()
    edited, _ = await inspector.inspect(chat, raw, priority=2, assign_priority=True)
    assert json.loads(edited)["priority"] == 2 and json.loads(edited)["stream_options"] == {"include_usage": True}


def test_vllm_gets_the_priority_policy_when_classes_are_on() -> None:
    on = vllm_command("python", "127.0.0.1", 1, VllmArgs(scheduling_policy="priority"))
    assert on[on.index("--scheduling-policy") + 1] == "priority"
    assert "--scheduling-policy" not in vllm_command("python", "127.0.0.1", 1, VllmArgs())
    operator = VllmArgs(scheduling_policy="priority", extra_args="--scheduling-policy=fcfs")
    given = vllm_command("python", "h", 1, operator)
    assert given.count("--scheduling-policy=fcfs") == 1 and "--scheduling-policy" not in given  # the operator's wins


def test_waiting_is_read_from_the_engines_exposition() -> None:
    text = b'# HELP x\nvllm:num_requests_waiting{model_name="a"} 3.0\nvllm:num_requests_waiting{model_name="b"} 4\n'
    assert waiting_of(text) == 7
    assert waiting_of(b"vllm:num_requests_running 3\n") is None


async def test_strict_order_between_classes_and_the_reserve_for_the_top_class() -> None:
    gate = Gate("e", CLASSES, capacity=3, reserve=1)
    assert gate.enter(BATCH) and gate.enter(BATCH)
    assert not gate.enter(BATCH)  # the last slot is the top class's
    assert gate.enter(INTERACTIVE)
    order: list[str] = []

    async def wait(cls_name: str, who: str) -> None:
        await gate.wait(CLASSES.by_name[cls_name], who, 10)
        order.append(who)

    tasks = [asyncio.create_task(wait("batch", "b1")), asyncio.create_task(wait("standard", "s1"))]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(wait("interactive", "i1")))
    await asyncio.sleep(0)
    assert gate.queued == 3
    gate.leave()  # 2 outstanding: only the top class may take the third slot, so i1 does
    await asyncio.sleep(0)
    assert order == ["i1"]
    gate.leave()  # 2 again: the reserve stays free for the top class
    await asyncio.sleep(0)
    assert order == ["i1"]
    gate.leave()  # 1: standard before batch
    await asyncio.sleep(0)
    assert order == ["i1", "s1"]
    gate.leave()
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert order == ["i1", "s1", "b1"]


async def test_principals_of_a_class_share_tokens_fairly_by_deficit_round_robin() -> None:
    gate = Gate("e", CLASSES, capacity=1)
    assert gate.enter(BATCH)
    served: dict[str, int] = {"big": 0, "small": 0}

    async def one(who: str, cost: int) -> None:
        await gate.wait(BATCH, who, cost)
        served[who] += cost
        gate.leave()

    # "big" asks 2000 tokens a request, "small" 250: equal weights get equal tokens, not equal requests.
    tasks = [asyncio.create_task(one("big", 2000)) for _ in range(40)]
    tasks += [asyncio.create_task(one("small", 250)) for _ in range(320)]
    await asyncio.sleep(0)
    for _ in range(150):
        gate.leave() if gate.outstanding else None
        gate.outstanding += 1 if gate.outstanding == 0 else 0
        await asyncio.sleep(0)
    ratio = served["big"] / served["small"]
    assert 0.8 < ratio < 1.25, served
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.queued == 0


async def test_deadline_eviction_and_a_client_that_leaves() -> None:
    short = parse_classes('{"hi": {"order": 0, "deadline": 0.05}, "lo": {"order": 1, "deadline": 5}}', "lo")
    hi, lo = short.classes
    gate = Gate("e", short, capacity=1, queue_size=2)
    assert gate.enter(lo)
    with pytest.raises(Refused) as refused:
        await gate.wait(hi, "a", 1)
    assert refused.value.reason is Shed.DEADLINE and refused.value.retry_after >= 1
    left = asyncio.create_task(gate.wait(lo, "b", 1))
    victim = asyncio.create_task(gate.wait(lo, "c", 1))
    await asyncio.sleep(0)
    left.cancel()  # the client left: out of the queue at once
    await asyncio.sleep(0)
    assert gate.queued == 1
    other = asyncio.create_task(gate.wait(lo, "d", 1))
    await asyncio.sleep(0)
    with pytest.raises(Refused) as full:
        await gate.wait(lo, "e", 1)  # full of its own class: refused
    assert full.value.reason is Shed.FULL
    top = asyncio.create_task(gate.wait(hi, "f", 1))  # a higher class evicts the newest lower one
    await asyncio.sleep(0)
    with pytest.raises(Refused):
        await other
    gate.leave()
    await top
    assert gate.outstanding == 1 and gate.queued == 1
    victim.cancel()
    await asyncio.gather(victim, return_exceptions=True)
    assert gate.stats["lo"].shed[Shed.EVICTED] == 1 and gate.stats["hi"].shed[Shed.DEADLINE] == 1


@pytest.mark.serial  # a per-call cost in µs
def test_the_unsaturated_path_costs_little() -> None:
    """enter + leave when nothing waits: a few comparisons (the stage's whole extra work). Budget: 3 µs."""
    gate = Gate("e", CLASSES, capacity=64, reserve=2, waiting_threshold=8)
    rounds = 100_000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            gate.enter(BATCH)
            gate.leave()
        best = min(best, (time.perf_counter() - start) / rounds)
    assert best < 3e-6, f"{best * 1e6:.2f} µs"


async def test_a_waiter_that_left_is_counted_out_once_even_when_the_queue_finds_it_first() -> None:
    gate = Gate("e", CLASSES, capacity=1)
    assert gate.enter(BATCH)
    gone = asyncio.create_task(gate.wait(BATCH, "a", 10))
    stays = asyncio.create_task(gate.wait(BATCH, "b", 10))
    await asyncio.sleep(0)
    gone.cancel()  # its future is cancelled at once; its own handler runs later than the gate looks
    gate.leave()
    await asyncio.gather(gone, return_exceptions=True)
    await stays
    assert (gate.outstanding, gate.queued, gate.stats["batch"].depth) == (1, 0, 0)
    assert gate.enter(BATCH) is False and gate.queued == 0  # still accurate: full, nobody waiting


async def test_a_backlog_past_the_reserve_lets_lower_classes_wait_inside_the_engine() -> None:
    """capacity 4, reserve 1, backlog 2: lower classes up to 5 outstanding (one waits in the engine's own
    queue beyond the engine's 4 slots), the top class up to 6."""
    gate = Gate("e", CLASSES, capacity=4, reserve=1, backlog=2)
    assert all(gate.enter(BATCH) for _ in range(5))
    assert not gate.enter(STANDARD)
    assert gate.enter(INTERACTIVE) and not gate.enter(INTERACTIVE)
    assert gate.limit == 6
    without = Gate("e", CLASSES, capacity=4, reserve=1)  # today's default: never past the engine's slots
    assert sum(without.enter(BATCH) for _ in range(10)) == 3 and without.limit == 4


async def test_a_groups_room_follows_its_ready_replicas() -> None:
    """Per-replica capacity and backlog times the ready replicas; room that grows goes to the queue at once."""
    gate = Gate("e", CLASSES, capacity=2, backlog=1, replicas=2)
    assert gate.limit == 6
    gate.set_replicas(1)
    assert gate.limit == 3 and all(gate.enter(BATCH) for _ in range(3)) and not gate.enter(BATCH)
    waiter = asyncio.create_task(gate.wait(BATCH, "a", 1))
    await asyncio.sleep(0)
    assert gate.queued == 1
    gate.set_replicas(0)  # no replica ready: one replica's room, never "no cap"
    assert gate.limit == 3
    gate.set_replicas(2)
    async with asyncio.timeout(5):
        await waiter
    assert (gate.outstanding, gate.queued) == (4, 0)


async def test_one_gate_per_engine_group_keyed_by_the_routers_group_for_the_model() -> None:
    def group(name: str, count: int, capacity: int | None) -> EngineGroup:
        backends = [Backend(Upstream("http://127.0.0.1:1", None, Phase.READY), f"{name}/{i}") for i in range(count)]
        return EngineGroup(name, [Replica(i, b) for i, b in enumerate(backends)], capacity)

    chat, code = group("chat", 2, 8), group("code", 1, None)
    router = Router([chat, code])
    gates = group_gates(router, CLASSES, GateLimits(capacity=4, reserve=2, backlog=1))
    assert (gates["chat"].limit, gates["code"].limit) == (18, 5)  # chat: (8 + 1) x 2 replicas; code: the default
    name_of = group_of(router)
    assert [name_of(Exchange("r", "POST", "/", model=m)) for m in ("chat", "code", "nope", "")] == [
        "chat",
        "code",
        "",
        "chat",  # no model named: the first engine, as the router does
    ]
    chat.replicas[1].backend.draining = True  # a rolling restart takes one out
    code.replicas[0].backend.waiting = 7
    async with follow_groups(router, gates, waiting=True, interval=0.01):
        await asyncio.sleep(0.05)
    assert gates["chat"].limit == 9 and gates["code"].engine_waiting == 7


async def test_with_a_lead_the_backlog_opens_only_near_a_predicted_end() -> None:
    """A lower-class request goes past the capacity only `lead` seconds before an outstanding one is predicted
    to end (seconds per token, learned from finished requests), so it waits in the engine only that long."""
    gate = Gate("e", CLASSES, capacity=2, backlog=2, lead=0.05)
    assert gate.enter(BATCH)
    first = gate.forwarded(BATCH, 10)  # nothing learned yet: no prediction
    await asyncio.sleep(0.01)
    gate.leave(first, 10)
    assert gate.per_token >= 0.001  # 10 tokens in >= 10 ms
    holds = []
    for _ in range(2):
        assert gate.enter(BATCH)
        holds.append(gate.forwarded(BATCH, 100))  # predicted to end in >= 0.1 s: due >= 0.05 s from now
    assert gate.forwarded(INTERACTIVE, 100) is None  # the top class is never held back by a prediction
    assert not gate.enter(BATCH)  # full, and nothing near its end: the backlog is closed
    waiter = asyncio.create_task(gate.wait(BATCH, "b", 1))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    async with asyncio.timeout(2):
        await waiter  # both due: the backlog opens (up to 2)
    assert (gate.due, gate.outstanding) == (2, 3)
    for hold in holds:
        gate.leave(hold, 100)
    assert gate.due == 0


def test_a_backlog_without_a_capacity_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_FAIRNESS", "true")  # without it, any gate setting is refused (test_cli.py)
    monkeypatch.setenv("BASTION_ENGINE_BACKLOG", "4")
    with pytest.raises(ConfigError) as raised:
        load(Settings, env_file=None)
    (line,) = raised.value.lines
    assert line.startswith("invalid BASTION_ENGINE_BACKLOG: a backlog is counted beyond BASTION_ENGINE_CAPACITY"), line
    monkeypatch.setenv("BASTION_ENGINE_CAPACITY", "64")
    assert load(Settings, env_file=None).engine_backlog == 4


async def test_a_request_gives_its_gate_place_back_once_when_the_engine_is_done_not_when_its_stage_returns() -> None:
    """The proxy calls `exchange.engine_done` before it counts a left client's prompt (up to seconds): the next
    request is admitted then, and the stage's own return gives nothing back a second time."""
    gate = Gate("e", CLASSES, capacity=1)
    done, release = asyncio.Event(), asyncio.Event()

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        assert exchange.engine_done is not None
        exchange.engine_done()  # what Proxy._count_prompt does before asking the engine
        done.set()
        await release.wait()  # the count, still running

    stage = FairShare(proxy, {"e": gate}, CLASSES, lambda exchange: "e")
    exchange = Exchange(request_id="r1", method="POST", path="/v1/chat/completions")
    exchange.principal = Principal(id="k", name="k", kind="key")
    scope: Scope = {"type": "http"}
    exchange.attach(scope)

    async def nothing() -> Message:
        raise AssertionError("the stage reads nothing when there is room")

    async def ignore(message: Message) -> None:
        raise AssertionError("the stage sends nothing when there is room")

    running = asyncio.create_task(stage(scope, nothing, ignore))
    await done.wait()
    assert gate.outstanding == 0 and gate.enter(BATCH)  # the next one goes now, not after the count
    release.set()
    await running
    assert gate.outstanding == 1  # the stage's return gave nothing back twice: only the second one is out
