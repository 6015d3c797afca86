"""Load and soak: a steady rate through a real gateway to the simulator, nothing lost.

Mixed traffic (chat and completions, streamed and not, streams with and without
`include_usage`, and streams the client abandons after a few events) at a fixed rate
through one gateway process. Afterwards:

- zero unexpected errors (every request that was not abandoned got a 200 and a complete answer);
- the gateway's RSS grew by less than RSS_BOUND_MB after warm-up, and its open fds by at most
  FD_SLACK (pooled upstream connections come and go); nothing in flight on either side;
- requests match on all three sides: sent by the client = audit lines = sum of
  bastion_requests_total = the simulator's vllm:request_success_total (stop + length + abort),
  and abandoned streams = audit `client_disconnect` = the simulator's `abort`;
- tokens are exact. What "exact" means, from the accounting rules in the code: a request that
  finishes carries `usage`, which the gateway counts in bastion_tokens_total and the simulator
  in vllm:prompt_tokens_total / vllm:generation_tokens_total. An abandoned stream has no usage:
  the gateway counts no tokens for it (metrics count reported usage only; the rate limiter's
  estimate is not a metric), the simulator counts no prompt tokens for it but does count the
  tokens it generated before it saw the disconnect. So:
    bastion prompt     == vllm prompt                                  (exact)
    bastion completion == the client's own sum over finished requests  (exact)
    vllm generation - bastion completion == tokens generated for abandoned streams, which lies
    in [abandoned x events read before closing, abandoned x max_tokens].

The short form runs in the normal suite (SHORT_SECONDS); `pytest -m soak` runs the long form for
BASTION_SOAK_SECONDS (default 180).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import AUTH, gateway, simulator

# A steady rate held (and RSS growth over time): run alone.
pytestmark = pytest.mark.serial

SHORT_SECONDS = 12.0
RATE = 40.0  # requests per second, steady
WORKERS = 16
MAX_TOKENS = 24
READ_BEFORE_ABANDON = 3  # token events an abandoning client reads before closing
RSS_BOUND_MB = 25.0
FD_SLACK = 8
MODEL = "qwen2.5-7b-instruct"


@dataclass
class Tally:
    sent: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    prompt: int = 0
    completion: int = 0
    abandoned: int = 0


def prompt_tokens(text: str, chat: bool) -> int:
    """The simulator's prompt count (words, +4 for the chat template)."""
    return max(1, len(text.split())) + (4 if chat else 0)


def proc_stats(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def scrape(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def total(metrics: dict[str, float], prefix: str, contains: str = "") -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and contains in k)


async def one_request(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    roll = rng.random()
    chat = rng.random() < 0.7
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "é", "数据"]) for _ in range(rng.randint(1, 30)))
    max_tokens = rng.randint(1, MAX_TOKENS)
    body: dict[str, object] = {"model": MODEL, "max_tokens": max_tokens}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    path = "/v1/chat/completions" if chat else "/v1/completions"
    tally.sent += 1
    if roll < 0.4:
        kind = "plain"
        response = await client.post(path, json=body)
        if response.status_code != 200:
            tally.errors[f"{kind}:{response.status_code}"] += 1
            return
        usage = response.json()["usage"]
        tally.prompt += usage["prompt_tokens"]
        tally.completion += usage["completion_tokens"]
    elif roll < 0.9:
        with_usage = roll < 0.65
        kind = "stream+usage" if with_usage else "stream"
        body["stream"] = True
        if with_usage:
            body["stream_options"] = {"include_usage": True}
        async with client.stream("POST", path, json=body) as response:
            raw = (await response.aread()).decode()
        events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
        if response.status_code != 200 or events[-1] != "[DONE]":
            tally.errors[f"{kind}:{response.status_code}"] += 1
            return
        chunks = [json.loads(e) for e in events[:-1]]
        usage_chunks = [c for c in chunks if c.get("usage")]
        if with_usage:
            assert len(usage_chunks) == 1
            tally.prompt += usage_chunks[0]["usage"]["prompt_tokens"]
            tally.completion += usage_chunks[0]["usage"]["completion_tokens"]
        else:
            assert not usage_chunks, "usage the client did not ask for is hidden"
            tally.prompt += prompt_tokens(words, chat)
            tally.completion += sum(
                1
                for c in chunks
                for choice in c["choices"]
                if choice.get("text") or choice.get("delta", {}).get("content")
            )
    else:
        kind = "abandoned"
        body["stream"] = True
        body["max_tokens"] = MAX_TOKENS * 4  # long enough to be abandoned mid-way
        async with client.stream("POST", path, json=body) as response:
            seen = 0
            async for chunk in response.aiter_raw():
                seen += chunk.count(b'"content":" ') + chunk.count(b'"text":" ')  # tokens, not the role chunk
                if seen >= READ_BEFORE_ABANDON:
                    break
        tally.abandoned += 1
    tally.kinds[kind] += 1


async def drive(base: str, seconds: float, tally: Tally, on_warm: asyncio.Event) -> None:
    rng = random.Random(1234)
    limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS)
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=30, limits=limits) as client:
        started = time.monotonic()
        ticket = 0
        next_lock = asyncio.Lock()

        async def worker() -> None:
            nonlocal ticket
            while True:
                async with next_lock:
                    slot = ticket
                    ticket += 1
                due = started + slot / RATE
                if due - started >= seconds:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if slot == int(RATE * 3):
                    on_warm.set()
                try:
                    await one_request(client, rng, tally)
                except httpx.HTTPError as exc:
                    tally.errors[type(exc).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(WORKERS)))


def soak(seconds: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = tmp_path / "audit.jsonl"
    env = {
        "BASTION_RATE_LIMIT_RPM": "0",
        "BASTION_RATE_LIMIT_TPM": "0",
        "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0",
        "BASTION_AUDIT_LOG": str(audit),
        "BASTION_LOG_LEVEL": "warning",
    }
    with (
        simulator("--itl", "0.002", "--tokens", str(MAX_TOKENS * 4)) as (_, sim),
        gateway("--upstream-url", sim, env=env) as (gw, base),
    ):
        tally = Tally()
        warm = asyncio.Event()
        marks: dict[str, tuple[float, int]] = {}

        async def run() -> None:
            async def mark_when_warm() -> None:
                await warm.wait()
                marks["start"] = proc_stats(gw.pid)

            watcher = asyncio.ensure_future(mark_when_warm())
            await drive(base, seconds, tally, warm)
            watcher.cancel()

        started = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # abandoned streams finish being torn down on both sides
        marks["end"] = proc_stats(gw.pid)
        ours = scrape(httpx.get(base + "/metrics", timeout=10).text)
        theirs = scrape(httpx.get(sim + "/metrics", timeout=10).text)
        output = gw.output()

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    outcomes = Counter(line["outcome"] for line in lines)
    requests = total(ours, "bastion_requests_total")
    finished = {r: total(theirs, "vllm:request_success_total", f'finished_reason="{r}"') for r in ("stop", "length")}
    aborted = total(theirs, "vllm:request_success_total", 'finished_reason="abort"')
    b_prompt = total(ours, "bastion_tokens_total", 'kind="prompt"')
    b_completion = total(ours, "bastion_tokens_total", 'kind="completion"')
    v_prompt = total(theirs, "vllm:prompt_tokens_total")
    v_generation = total(theirs, "vllm:generation_tokens_total")
    (rss0, fds0), (rss1, fds1) = marks["start"], marks["end"]
    with capsys.disabled():  # the figures belong in every run's output, passed or not
        print(
            f"\nsoak {seconds:.0f}s ({elapsed:.1f}s wall): sent {tally.sent} ({dict(tally.kinds)}), "
            f"errors {dict(tally.errors) or 0}; audit outcomes {dict(outcomes)}\n"
            f"  gateway RSS {rss0:.1f} -> {rss1:.1f} MiB, fds {fds0} -> {fds1}; "
            f"upstream finished {finished}, aborted {aborted:.0f}\n"
            f"  tokens: bastion prompt {b_prompt:.0f} completion {b_completion:.0f} | "
            f"client prompt {tally.prompt} completion {tally.completion} | "
            f"vllm prompt {v_prompt:.0f} generation {v_generation:.0f} "
            f"(generated for abandoned streams: {v_generation - b_completion:.0f})"
        )
    assert not tally.errors, tally.errors
    assert tally.sent >= 0.9 * seconds * RATE, "the rate held"
    assert "Traceback" not in output and "ERROR" not in output
    # requests, on every side
    assert len(lines) == requests == tally.sent == sum(finished.values()) + aborted
    assert outcomes["client_disconnect"] == aborted == tally.abandoned
    assert outcomes["ok"] == tally.sent - tally.abandoned
    # nothing in flight, nothing leaked
    assert ours["bastion_inflight_requests"] == 0
    assert total(theirs, "vllm:num_requests_running") == 0
    assert rss1 - rss0 < RSS_BOUND_MB, f"RSS grew {rss1 - rss0:.1f} MiB"
    assert fds1 <= fds0 + FD_SLACK, f"fds {fds0} -> {fds1}"
    # tokens, exactly
    assert b_prompt == v_prompt == tally.prompt
    assert b_completion == tally.completion
    lost = v_generation - b_completion
    assert tally.abandoned * READ_BEFORE_ABANDON <= lost <= tally.abandoned * MAX_TOKENS * 4


def test_soak_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    soak(SHORT_SECONDS, tmp_path, capsys)


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_soak_long(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    soak(float(os.environ.get("BASTION_SOAK_SECONDS", "180")), tmp_path, capsys)
