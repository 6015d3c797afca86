"""A saturated engine shared fairly (issue 20): real gateway, the simulator as its supervised child, real clients.

The simulator runs like a GPU under load (`--max-num-seqs 16`, `--itl-per-seq`: the batch
shares one token rate). A batch flood (two batch keys, c=64 each) runs beside an interactive
key at c=2. With classes on, the interactive TTFT stays near its idle value, the engine stays
full, and the two batch keys get the same tokens; with classes off (the same flood straight
into the engine's FCFS queue) the interactive TTFT is measured too, to show what the gate buys.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.auth.keys import KeyFile, create_key, write_key_file
from tests.support import free_port, gateway

MODEL = "qwen2.5-7b-instruct"
SEQS = 16
TTFT, ITL, ITL_PER_SEQ = 0.02, 0.001, 0.002
BATCH_TOKENS, INTERACTIVE_TOKENS = 64, 16


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


def _env(path: Path, port: int, fair: bool) -> dict[str, str]:
    policy = "priority" if fair else "fcfs"
    command = (
        f"{{python}} -m bastion simulate --host {{host}} --port {{port}} --max-num-seqs {SEQS} "
        f"--ttft {TTFT} --itl {ITL} --itl-per-seq {ITL_PER_SEQ} --tokens {BATCH_TOKENS} --scheduling-policy {policy}"
    )
    env = {
        "BASTION_UPSTREAM_COMMAND": command,
        "BASTION_UPSTREAM_PORT": str(port),
        "BASTION_KEYS_FILE": str(path),
        "BASTION_AUDIT_LOG": "off",
        "BASTION_RATE_LIMIT_RPM": "0",
        "BASTION_LOG_LEVEL": "warning",
    }
    if fair:
        env |= {"BASTION_FAIRNESS": "1", "BASTION_ENGINE_CAPACITY": str(SEQS), "BASTION_ENGINE_RESERVE": "2"}
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


async def _run(base: str, engine: str, keys: dict[str, str]) -> dict[str, float]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        idle = Load(base, keys)
        await asyncio.gather(*(idle.interactive(client, time.monotonic() + 2.0) for _ in range(2)))
        load = Load(base, keys)
        flood = [asyncio.create_task(load.batch(client, name)) for name in ("batch-a", "batch-b") for _ in range(64)]
        await asyncio.sleep(3.0)  # the engine fills and the queues form
        load.tokens = dict.fromkeys(load.tokens, 0)
        before, t0 = await _generated(client, engine), time.monotonic()
        await asyncio.gather(*(load.interactive(client, time.monotonic() + 6.0) for _ in range(2)))
        after, t1 = await _generated(client, engine), time.monotonic()
        load.stop = True
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    return {
        "idle_ttft": statistics.median(idle.ttfts),
        "ttft": statistics.median(load.ttfts),
        "engine_tps": (after - before) / (t1 - t0),
        "batch_tps": sum(load.tokens.values()) / (t1 - t0),
        "a": load.tokens["batch-a"],
        "b": load.tokens["batch-b"],
    }


def test_interactive_ttft_batch_throughput_and_fair_share_beside_a_flood(keys: tuple[Path, dict[str, str]]) -> None:
    path, secrets = keys
    results = {}
    for fair in (True, False):
        port = free_port()
        with gateway(env=_env(path, port, fair)) as (_, base):
            results[fair] = asyncio.run(_run(base, f"http://127.0.0.1:{port}", secrets))
    on, off = results[True], results[False]
    # The engine's capacity: its token rate with every sequence busy (16 at the per-sequence slowdown).
    capacity = SEQS / (ITL + ITL_PER_SEQ * (SEQS - 1))
    print(f"\nfairness: classes on {on}\nfairness: classes off {off}\nengine capacity {capacity:.0f} tokens/s")
    assert on["ttft"] <= 2 * on["idle_ttft"], on
    assert off["ttft"] > 5 * on["ttft"], (on, off)  # what the gate buys: FCFS puts the chat behind the flood
    assert on["engine_tps"] >= 0.9 * capacity, on  # no idle engine while work waits
    assert abs(on["a"] - on["b"]) <= 0.1 * max(on["a"], on["b"]), on  # equal weights, equal tokens
