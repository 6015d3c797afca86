"""A saturated engine shared fairly (issue 20): real gateway, the simulator as its supervised child, real clients.

The simulator runs like a GPU under load (`--max-num-seqs 16`, a step time independent of the
batch, an API server's admission delay). A batch flood (two batch keys, c=64 each) runs beside
an interactive key at c=2. With classes on, the interactive TTFT stays near its idle value and
the two batch keys get the same tokens; with a backlog past the reserve the engine also stays as
busy as under the flood alone; with classes off (the same flood straight into the engine's FCFS
queue) the interactive TTFT is measured too, to show what the gate buys.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.auth.keys import KeyFile, create_key, write_key_file
from tests.support import free_port, gateway

# TTFT ratios, tokens/s shares and latency medians: run alone, never beside other tests.
pytestmark = pytest.mark.serial

MODEL = "qwen2.5-7b-instruct"
SEQS = 16
# A GPU-like engine: a step time that does not grow with the batch (decode is memory-bound), so tokens/s
# follow the busy slots; vLLM's API server takes ADMISSION to hand a request to its engine core, the gap
# before a slot the gateway frees is refilled. Batch requests last ~0.3 s: a slot frees every ~19 ms.
TTFT, ITL, ADMISSION = 0.02, 0.0045, 0.02
BATCH_TOKENS, INTERACTIVE_TOKENS = 64, 16
RESERVE, BACKLOG, LEAD = 2, SEQS, 0.06


def _keys(path: Path) -> dict[str, str]:
    data = KeyFile()
    keys = {}
    for name, cls in [("chat", "interactive"), ("batch-a", "batch"), ("batch-b", "batch")]:
        _, keys[name] = create_key(data, name=name, priority_class=cls, rpm=0, tpm=0, max_concurrent=0)
    write_key_file(path, data)
    return keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    path = tmp_path_factory.mktemp("fair") / "keys.json"
    yield path, _keys(path)


def _env(path: Path, port: int, gate: dict[str, str] | None) -> dict[str, str]:
    policy = "priority" if gate is not None else "fcfs"
    command = (
        f"{{python}} -m bastion simulate --host {{host}} --port {{port}} --max-num-seqs {SEQS} --ttft {TTFT} "
        f"--itl {ITL} --admission-delay {ADMISSION} --tokens {BATCH_TOKENS} --scheduling-policy {policy}"
    )
    env = {
        "BASTION_UPSTREAM_COMMAND": command,
        "BASTION_UPSTREAM_PORT": str(port),
        "BASTION_KEYS_FILE": str(path),
        "BASTION_AUDIT_LOG": "off",
        "BASTION_RATE_LIMIT_RPM": "0",
        "BASTION_LOG_LEVEL": "warning",
    }
    if gate is not None:
        env |= {"BASTION_FAIRNESS": "1", "BASTION_ENGINE_CAPACITY": str(SEQS), **gate}
    return env


async def _generated(client: httpx.AsyncClient, engine: str) -> float:
    text = (await client.get(engine + "/metrics")).text
    return sum(float(v) for v in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


class Load:
    """Closed-loop clients: a batch flood (non-streaming) and interactive streams (TTFT per request)."""

    def __init__(self, base: str, keys: dict[str, str]) -> None:
        self.base = base
        self.keys = keys
        self.tokens = {"batch-a": 0, "batch-b": 0}
        self.ttfts: list[float] = []
        self.stop = False

    async def batch(self, client: httpx.AsyncClient, name: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": BATCH_TOKENS}
        headers = {"authorization": f"Bearer {self.keys[name]}"}
        while not self.stop:
            response = await client.post(self.base + "/v1/chat/completions", json=body, headers=headers)
            if response.status_code == 200 and not self.stop:
                self.tokens[name] += response.json()["usage"]["completion_tokens"]

    async def interactive(self, client: httpx.AsyncClient, until: float) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": INTERACTIVE_TOKENS,
            "stream": True,
        }
        headers = {"authorization": f"Bearer {self.keys['chat']}"}
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                async with asyncio.timeout(until - start):
                    async with client.stream(
                        "POST", self.base + "/v1/chat/completions", json=body, headers=headers
                    ) as r:
                        assert r.status_code == 200
                        first = True
                        async for _ in r.aiter_raw():
                            if first:
                                self.ttfts.append(time.monotonic() - start)
                                first = False
            except TimeoutError:
                self.ttfts.append(until - start)  # never got a token in the window: at least this long
                return


async def _run(base: str, engine: str, keys: dict[str, str], *, fair: bool) -> dict[str, float]:
    """Through a fair gateway: the interactive key alone, then beside the flood. Through the plain one: the flood
    alone (the engine's tokens/s, the reference), then the interactive key beside it."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    result: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        if fair:
            idle = Load(base, keys)
            await asyncio.gather(*(idle.interactive(client, time.monotonic() + 2.0) for _ in range(2)))
            result["idle_ttft"] = statistics.median(idle.ttfts)
        load = Load(base, keys)
        flood = [asyncio.create_task(load.batch(client, name)) for name in ("batch-a", "batch-b") for _ in range(64)]
        await asyncio.sleep(2.0)  # the engine fills and the queues form
        if not fair:
            load.tokens = dict.fromkeys(load.tokens, 0)
            before, t0 = await _generated(client, engine), time.monotonic()
            await asyncio.sleep(2.0)  # printed beside the computed capacity, not asserted on
            after, t1 = await _generated(client, engine), time.monotonic()
            result["alone_engine_tps"] = (after - before) / (t1 - t0)
            result["alone_batch_tps"] = sum(load.tokens.values()) / (t1 - t0)
        load.tokens = dict.fromkeys(load.tokens, 0)
        before, t0 = await _generated(client, engine), time.monotonic()
        await asyncio.gather(*(load.interactive(client, time.monotonic() + 5.0) for _ in range(2)))
        after, t1 = await _generated(client, engine), time.monotonic()
        load.stop = True
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    return result | {
        "ttft": statistics.median(load.ttfts),
        "engine_tps": (after - before) / (t1 - t0),
        "batch_tps": sum(load.tokens.values()) / (t1 - t0),
        "a": load.tokens["batch-a"],
        "b": load.tokens["batch-b"],
    }


def test_interactive_ttft_engine_share_and_fair_share_beside_a_flood(keys: tuple[Path, dict[str, str]]) -> None:
    """Classes off (FCFS): the chat waits behind the flood. The gate with a reserve alone: the chat's TTFT holds,
    but each slot it frees idles for a round trip through the gateway and vLLM's API server (and the reserve
    idles between chats). With a backlog past the reserve, a few batch requests wait inside the engine and
    refill slots at once: the engine stays busy, and the chat (ahead of them by priority) still starts fast."""
    path, secrets = keys
    configs: dict[str, dict[str, str] | None] = {
        "off": None,
        "reserve": {"BASTION_ENGINE_RESERVE": str(RESERVE)},
        "backlog": {
            "BASTION_ENGINE_RESERVE": str(RESERVE),
            "BASTION_ENGINE_BACKLOG": str(BACKLOG),
            "BASTION_ENGINE_BACKLOG_LEAD": str(LEAD),
        },
    }
    results = {}
    for name, gate in configs.items():
        port = free_port()
        with gateway(env=_env(path, port, gate)) as (_, base):
            results[name] = asyncio.run(_run(base, f"http://127.0.0.1:{port}", secrets, fair=gate is not None))
    off, reserve, backlog = results["off"], results["reserve"], results["backlog"]
    # The engine with every slot busy, as under the flood alone (measured there at ~98.5 % of this when the
    # machine is quiet; the computed value keeps a busy neighbour's noise out of the reference).
    capacity = SEQS * BATCH_TOKENS / (TTFT + ITL * (BATCH_TOKENS - 1))
    for result in (reserve, backlog):
        result["engine_share"] = result["engine_tps"] / capacity
        result["batch_share_vs_alone"] = result["batch_tps"] / off["alone_batch_tps"]
    print(f"\nfairness: classes off {off}\nfairness: reserve {reserve}\nfairness: reserve + backlog {backlog}")
    print(f"fairness: engine capacity {capacity:.0f} tokens/s, flood alone: {off['alone_engine_tps'] / capacity:.3f}")
    assert off["ttft"] > 5 * reserve["ttft"], (reserve, off)  # what the gate buys: FCFS puts the chat behind the flood
    for result in (reserve, backlog):
        assert result["ttft"] <= 2 * result["idle_ttft"], result
        assert abs(result["a"] - result["b"]) <= 0.1 * max(result["a"], result["b"]), result  # equal weights
    assert reserve["engine_share"] < 0.92, reserve  # the refill gap and the idle reserve, before
    assert backlog["engine_share"] >= 0.95, backlog  # no idle slot while work waits, after


def _samples(text: str, name: str) -> dict[tuple[str, str, str], float]:
    found = {}
    pattern = name + r'\{class="([^"]*)",engine="([^"]*)",path="([^"]*)"\} (\S+)$'
    for cls, engine, path, value in re.findall(pattern, text, re.MULTILINE):
        found[(engine, cls, path)] = float(value)
    return found


def test_each_engine_group_has_its_own_gate(keys: tuple[Path, dict[str, str]]) -> None:
    """Two models (BASTION_ENGINES, each entry's `capacity`): a flood of one queues at its own gate, and the
    other model's requests (same key, same class) are never queued behind it."""
    path, secrets = keys
    sim = "{python} -m bastion simulate --host {host} --port {port} --max-num-seqs 4 --ttft 0.01 --itl 0.005"
    engines = [
        {"model": "bulk", "command": sim + " --model bulk --scheduling-policy priority", "capacity": 4},
        {"model": "chat", "command": sim + " --model chat --scheduling-policy priority", "capacity": 4},
    ]
    env = {
        "BASTION_ENGINES": json.dumps(engines),
        "BASTION_FAIRNESS": "1",
        "BASTION_KEYS_FILE": str(path),
        "BASTION_AUDIT_LOG": "off",
        "BASTION_RATE_LIMIT_RPM": "0",
        "BASTION_METRICS_TOKEN": "m" * 40,
        "BASTION_LOG_LEVEL": "warning",
    }
    headers = {"authorization": f"Bearer {secrets['batch-a']}"}

    async def run(base: str) -> list[float]:
        stop = False
        latencies: list[float] = []

        async def one(client: httpx.AsyncClient, model: str) -> float:
            body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": 32}
            start = time.monotonic()
            response = await client.post(base + "/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200, response.text
            return time.monotonic() - start

        async def flood(client: httpx.AsyncClient) -> None:
            while not stop:
                await one(client, "bulk")

        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            tasks = [asyncio.create_task(flood(client)) for _ in range(24)]
            await asyncio.sleep(1.0)  # bulk's 4 slots full, 20 of its requests queued at its gate
            for _ in range(20):
                latencies += await asyncio.gather(one(client, "chat"), one(client, "chat"))
            stop = True
            await asyncio.gather(*tasks)
        return latencies

    with gateway(env=env) as (_, base):
        latencies = asyncio.run(run(base))
        text = httpx.get(base + "/metrics", headers={"authorization": "Bearer " + "m" * 40}).text
    admitted = _samples(text, "bastion_queue_admitted_total")
    assert admitted[("bulk", "batch", "queued")] > 0, admitted  # the flood waited at bulk's gate
    assert admitted[("chat", "batch", "queued")] == 0, admitted  # chat's requests never did
    assert admitted[("chat", "batch", "direct")] == 40, admitted
    # 32 tokens at 5 ms: ~0.17 s each; queued behind bulk's 20 they would take a second or more.
    assert statistics.median(latencies) < 0.5, latencies
