"""The simulator's vLLM-like scheduler, seen from outside: a real `bastion simulate`, real httpx clients.

What is checked is what a router or a fair-share queue in front of vLLM relies on: at most
`--max-num-seqs` sequences run, the rest wait (stream heads at once, first tokens when
scheduled), the waiting queue's order under `fcfs` and `priority`, clients that leave, the
batch slowdown, and `vllm:num_requests_running/waiting` telling the truth throughout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import simulator

# Waves of first tokens, token intervals and queue times measured against the clock: run alone.
pytestmark = pytest.mark.serial

MODEL = "qwen2.5-7b-instruct"


def _body(priority: object = None, *, stream: bool = True, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if priority is not None:
        body["priority"] = priority
    return {**body, **extra}


@dataclass
class _Stream:
    """What a client saw of one stream, in seconds since the test's start."""

    head: float = 0.0
    first: float = 0.0
    end: float = 0.0
    chunks: list[bytes] = field(default_factory=list)

    @property
    def text(self) -> bytes:
        return b"".join(self.chunks)


async def _stream(client: httpx.AsyncClient, base: str, body: dict[str, object], t0: float) -> _Stream:
    seen = _Stream()
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        seen.head = time.monotonic() - t0
        async for chunk in response.aiter_raw():
            if not seen.chunks:
                seen.first = time.monotonic() - t0
            seen.chunks.append(chunk)
    seen.end = time.monotonic() - t0
    return seen


async def _metrics(client: httpx.AsyncClient, base: str) -> dict[str, float]:
    """The simulator's samples for its model, by name (`finished_reason` appended where there is one)."""
    text = (await client.get(base + "/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_name") == MODEL and "le" not in sample.labels:
                reason = sample.labels.get("finished_reason")
                samples[sample.name + (f":{reason}" if reason else "")] = sample.value
    return samples


async def _until(client: httpx.AsyncClient, base: str, **want: float) -> dict[str, float]:
    """Poll /metrics until every `name=value` holds (names with `vllm:` left off); fail after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        seen = await _metrics(client, base)
        if all(seen.get("vllm:" + name) == value for name, value in want.items()):
            return seen
        assert time.monotonic() < deadline, f"never saw {want}; last {seen}"
        await asyncio.sleep(0.01)


async def test_at_most_max_num_seqs_run_and_the_rest_wait() -> None:
    itl, tokens = 0.04, 10
    generation = itl * (tokens - 1)
    env = {"BASTION_SIMULATE_MAX_NUM_SEQS": "4"}  # the variable, not the flag: both must work
    with simulator("--itl", str(itl), "--tokens", str(tokens), env=env) as (_, base):
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=32)) as client:
            samples: list[tuple[float, float]] = []
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    seen = await _metrics(client, base)
                    samples.append((seen["vllm:num_requests_running"], seen["vllm:num_requests_waiting"]))
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            t0 = time.monotonic()
            streams = await asyncio.gather(*(_stream(client, base, _body(), t0) for _ in range(12)))
            elapsed = time.monotonic() - t0
            done.set()
            await sampler
            final = await _metrics(client, base)

    for seen in streams:
        assert seen.text.endswith(b"data: [DONE]\n\n")
        assert seen.text.count(b'"delta":{"content":" ') == tokens
    assert max(running for running, _ in samples) == 4
    assert all(running + waiting <= 12 for running, waiting in samples)
    assert (4, 8) in samples, "all 12 in, 4 running and 8 waiting"
    # Timing: three waves of four. Every head came at once, long before the first stream ended;
    # first tokens come a generation apart; the whole took three generations.
    assert max(s.head for s in streams) < min(s.end for s in streams)
    firsts = sorted(s.first for s in streams)
    assert firsts[4] - firsts[0] > 0.8 * generation
    assert firsts[8] - firsts[0] > 1.6 * generation
    assert elapsed > 2.7 * generation
    assert final["vllm:num_requests_running"] == final["vllm:num_requests_waiting"] == 0
    assert final["vllm:request_queue_time_seconds_count"] == 12
    assert final["vllm:request_queue_time_seconds_sum"] > 0.8 * (4 * generation + 4 * 2 * generation)
    assert final["vllm:request_success_total:stop"] == 12


async def _order_of_service(policy: str, priorities: list[int]) -> list[int]:
    """With one sequence busy (priority 10), queue one request per priority, in that order, and
    return their indexes in the order their first tokens came."""
    with simulator("--max-num-seqs", "1", "--scheduling-policy", policy, "--itl", "0.03", "--tokens", "8") as (
        _,
        base,
    ):
        async with httpx.AsyncClient(timeout=10) as client:
            t0 = time.monotonic()
            busy = asyncio.create_task(_stream(client, base, _body(10), t0))
            await _until(client, base, num_requests_running=1)
            queued = []
            for i, priority in enumerate(priorities):
                queued.append(asyncio.create_task(_stream(client, base, _body(priority), t0)))
                await _until(client, base, num_requests_waiting=i + 1)  # arrival order is certain
            await busy
            streams = await asyncio.gather(*queued)
    assert all(s.text.endswith(b"data: [DONE]\n\n") for s in streams)
    return sorted(range(len(streams)), key=lambda i: streams[i].first)


async def test_priority_policy_runs_a_lower_priority_first_then_by_arrival() -> None:
    assert await _order_of_service("priority", [10, 10, 10, 0, 5]) == [3, 4, 0, 1, 2]


async def test_fcfs_runs_in_arrival_order_and_accepts_priorities_as_vllm_v1_does() -> None:
    assert await _order_of_service("fcfs", [10, 0, 5, -3]) == [0, 1, 2, 3]


async def test_a_priority_that_is_not_an_integer_is_refused() -> None:
    with simulator("--scheduling-policy", "priority") as (_, base):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(base + "/v1/chat/completions", json=_body("high", stream=False))
    assert response.status_code == 400
    assert response.json()["message"] == "priority must be an integer"


async def _leave_while_waiting(client: httpx.AsyncClient, base: str, stream: bool) -> None:
    if stream:  # the head comes at once, then nothing: leave after the head
        async with client.stream("POST", base + "/v1/chat/completions", json=_body()) as response:
            assert response.status_code == 200
    else:  # nothing comes until scheduled: leave on a read timeout
        try:
            await client.post(base + "/v1/chat/completions", json=_body(stream=False), timeout=0.3)
        except httpx.ReadTimeout:
            return
        raise AssertionError("answered while it should have been waiting")


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_while_waiting_leaves_the_queue_at_once(stream: bool) -> None:
    itl, tokens = 0.05, 40
    with simulator("--max-num-seqs", "1", "--itl", str(itl), "--tokens", str(tokens)) as (_, base):
        async with httpx.AsyncClient(timeout=10) as client:
            t0 = time.monotonic()
            busy = asyncio.create_task(_stream(client, base, _body(), t0))
            await _until(client, base, num_requests_running=1)
            await _leave_while_waiting(client, base, stream)
            left = time.monotonic() - t0
            seen = await _until(client, base, num_requests_waiting=0)
            assert time.monotonic() - t0 - left < 1.0
            assert seen["vllm:request_success_total:abort"] == 1
            assert seen["vllm:num_requests_running"] == 1, "the busy stream is still generating"
            # Nothing phantom holds the queue: the next request runs right after the busy one.
            after = await _stream(client, base, _body(max_tokens=2), t0)
            await busy
            final = await _metrics(client, base)
    assert after.first > 0.8 * itl * (tokens - 1)
    assert final["vllm:request_queue_time_seconds_count"] == 2, "the one that left never ran"
    assert final["vllm:request_success_total:abort"] == 1
    assert final["vllm:request_success_total:stop"] + final["vllm:request_success_total:length"] == 2
    assert final["vllm:num_requests_running"] == final["vllm:num_requests_waiting"] == 0


async def test_a_client_that_leaves_while_running_frees_its_sequence_at_once() -> None:
    with simulator("--max-num-seqs", "1", "--itl", "0.05", "--tokens", "100") as (_, base):  # 5 s each
        async with httpx.AsyncClient(timeout=10) as client:
            t0 = time.monotonic()
            async with client.stream("POST", base + "/v1/chat/completions", json=_body()) as response:
                chunks = response.aiter_raw()
                await anext(chunks)
                await anext(chunks)
                waiter = asyncio.create_task(_stream(client, base, _body(max_tokens=2), t0))
                await _until(client, base, num_requests_waiting=1)
                left = time.monotonic() - t0
            second = await waiter
            final = await _metrics(client, base)
    assert second.first - left < 1.0, "the waiting stream started when the first client left"
    assert final["vllm:request_success_total:abort"] == 1
    assert final["vllm:request_success_total:length"] == 1


async def test_batch_slowdown_grows_the_token_interval_with_running_sequences() -> None:
    itl, per_seq, tokens = 0.01, 0.02, 16
    with simulator("--itl", str(itl), "--itl-per-seq", str(per_seq), "--tokens", str(tokens)) as (_, base):
        async with httpx.AsyncClient(timeout=20) as client:
            t0 = time.monotonic()
            alone = await _stream(client, base, _body(), t0)
            t0 = time.monotonic()
            together = await asyncio.gather(*(_stream(client, base, _body(), t0) for _ in range(4)))
            t0 = time.monotonic()
            plain = await asyncio.gather(
                *(client.post(base + "/v1/chat/completions", json=_body(stream=False)) for _ in range(4))
            )
            plain_elapsed = time.monotonic() - t0
    four = (tokens - 1) * (itl + 3 * per_seq)  # 1.05 s, against 0.15 s alone
    assert alone.end - alone.first < 0.4 * four
    assert all(s.end - s.first > 0.6 * four for s in together)
    assert all(r.status_code == 200 for r in plain) and plain_elapsed > 0.6 * four
