"""A low-overhead streaming load generator: TTFT, inter-chunk gaps, tokens/s.

Runs the same chat workload against one base URL (direct to the upstream, or
through bastion) and prints one JSON object. Streams with
`stream_options.include_usage` so completion tokens are counted from the
server's own usage, and `ignore_eos` so every request generates max_tokens.

    python bench/load.py --url http://127.0.0.1:8000 --key bst-... -c 64 -n 640 --max-tokens 64

Two ways to bound a round. `-n`: that many requests, the round timed from the first
to the last (its edges, where fewer streams run, count in). `--seconds`: a closed loop
measured in a window after `--warmup-seconds` of load, then every stream is cut; the
window's tokens are the content events received in it, and with `--metrics-url` the
engine's own counters are read at both edges (steps, tokens per step, preemptions),
so a round is the same length whatever the requests' lengths; `--at` opens the window at a
given wall-clock moment, so that two runs (two URLs, say) share it. `--max-tokens 128-384`
draws each request's length (seeded): waves of identical requests that start and end
together are a benchmark's artefact, not what an engine sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from asyncio.subprocess import PIPE
from typing import Any

import aiohttp
from harness import cpu_seconds, evenly, percentile, series_sums


class Window:
    """Where the measured part of a round lies: all of it, or (`opens_later`) from when `start` is set."""

    def __init__(self, opens_later: bool = False) -> None:
        self.start = float("inf") if opens_later else 0.0
        self.end = float("inf")
        self.events = 0  # content events received inside the window
        self.completed = 0  # requests that ended inside it

    def holds(self, moment: float) -> bool:
        return self.start <= moment < self.end


async def one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stats: dict[str, list[float]],
    window: Window,
) -> None:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    chunks = 0
    coalesced = 0
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            stats["errors"].append(response.status)
            await response.read()
            return
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            events = chunk.count(b'"delta":{"content"')
            if events:
                if window.holds(now):
                    window.events += events
                chunks += events
                coalesced += events - 1
                if first is None:
                    first = now
                elif last is not None and window.holds(now):
                    stats["gaps"].append(now - last)
                last = now
            if b'"usage":{' in chunk:
                usage = json.loads(chunk[chunk.rindex(b"data: {") + 6 :].split(b"\n\n")[0])["usage"]
                tokens = usage["completion_tokens"]
    end = time.perf_counter()
    if window.holds(end):
        window.completed += 1
    if not (window.holds(start) and end < window.end):
        return  # started before the window or ended after it: its times describe another load
    stats["ttft"].append((first or end) - start)
    stats["latency"].append(end - start)
    stats["tokens"].append(tokens)
    stats["chunks"].append(chunks)
    stats["coalesced"].append(coalesced)


# The engine's counters read at a window's edges (vLLM's names; the simulator has the first two).
ENGINE = (
    "vllm:iteration_tokens_total_count",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:num_preemptions_total",
)


def lengths(spec: str) -> tuple[int, int]:
    """`64` or `128-384`: the range each request's max_tokens is drawn from."""
    low, _, high = spec.partition("-")
    return int(low), int(high or low)


async def engine_counters(session: aiohttp.ClientSession, url: str, key: str) -> dict[str, float]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with session.get(url.rstrip("/") + "/metrics", headers=headers) as response:
        return series_sums(await response.text(), ENGINE)


def engine_round(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """The engine's own account of a window: steps/s, tokens per step, its generated tokens/s, preemptions."""
    steps, tokens = (after[n] - before[n] for n in ENGINE[:2])
    return {
        "engine_steps_per_s": round(steps / seconds, 1),
        "engine_tokens_per_step": round(tokens / steps, 2) if steps else 0.0,
        "engine_tokens_per_s": round(tokens / seconds, 1),
        "engine_prompt_tokens_per_s": round((after[ENGINE[2]] - before[ENGINE[2]]) / seconds, 1),
        "engine_preemptions": after[ENGINE[3]] - before[ENGINE[3]],
    }


class Edges:
    """The engine's counters (`--metrics-url`) and a watched process's CPU (`--cpu-pid`, the gateway) read when
    a measured period opens and when it closes: a window, or a whole round of -n requests."""

    def __init__(self, session: aiohttp.ClientSession, args: argparse.Namespace) -> None:
        self.session, self.args = session, args
        self.counters: dict[str, float] = {}
        self.cpu = 0.0
        self.opened = 0.0

    async def counters_now(self) -> dict[str, float]:
        args = self.args
        return await engine_counters(self.session, args.metrics_url, args.metrics_key) if args.metrics_url else {}

    async def open(self) -> None:
        self.counters = await self.counters_now()
        self.cpu = cpu_seconds(self.args.cpu_pid) if self.args.cpu_pid else 0.0
        self.opened = time.perf_counter()

    async def close(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.opened
        read: dict[str, float] = {}
        if self.args.cpu_pid:
            read["cpu_s"] = round(cpu_seconds(self.args.cpu_pid) - self.cpu, 3)
        if self.counters:
            read |= engine_round(self.counters, await self.counters_now(), seconds)
        return read


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/") + "/v1/chat/completions"
    low, high = lengths(args.max_tokens)
    draw = random.Random(args.seed)
    request: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.priority is not None:
        request["priority"] = args.priority

    def body() -> bytes:
        return json.dumps({**request, "max_tokens": draw.randint(low, high)}).encode()

    headers = {"content-type": "application/json"}
    if args.key:
        headers["authorization"] = f"Bearer {args.key}"
    stats: dict[str, list[float]] = {
        k: [] for k in ("ttft", "latency", "tokens", "chunks", "coalesced", "gaps", "errors")
    }
    window = Window(opens_later=bool(args.seconds))  # the warm-up's tokens and requests are not the window's
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(args.warmup):
            await one(session, url, body(), headers, {k: [] for k in stats}, Window())
        queue = iter(range(args.requests)) if not args.seconds else iter(int, 1)  # the second: endless

        async def worker() -> None:
            for _ in queue:
                await one(session, url, body(), headers, stats, window)

        edges = Edges(session, args)
        if not args.seconds:
            await edges.open()
        started = time.perf_counter()
        workers = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
        if args.seconds:
            # the warm-up, or (--at: several processes share one window) until the wall-clock moment it opens
            await asyncio.sleep(max(0.0, args.at - time.time()) if args.at else args.warmup_seconds)
            await edges.open()
            window.start = time.perf_counter()
            await asyncio.sleep(args.seconds)
            window.end = time.perf_counter()
            engine = await edges.close()
            for task in workers:  # cut every stream: the engine aborts them
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            elapsed = window.end - window.start
        else:
            await asyncio.gather(*workers)
            elapsed = time.perf_counter() - started
            engine = await edges.close()
    counts = {
        "done": len(stats["latency"]),
        "errors": len(stats["errors"]),
        "events": window.events if args.seconds else int(sum(stats["tokens"])),
        "completed": window.completed if args.seconds else len(stats["latency"]),
        "chunks": int(sum(stats["chunks"])),
        "coalesced": int(sum(stats["coalesced"])),
    }
    if args.raw:  # for a parent process to merge (--procs)
        return {"counts": counts, **{k: evenly(stats[k], RAW_SAMPLES) for k in ("ttft", "latency", "gaps")}}
    return summary(args, counts, stats, elapsed, engine)


def summary(
    args: argparse.Namespace,
    counts: dict[str, int],
    samples: dict[str, list[float]],
    elapsed: float,
    engine: dict[str, float],
) -> dict[str, Any]:
    """The round's line; `engine`: what `Edges` read when the measured period opened and closed."""
    if "cpu_s" in engine:
        engine = engine | {"cpu_us_per_chunk": round(engine["cpu_s"] / max(1, counts["events"]) * 1e6, 2)}
    return {
        "url": args.url,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "requests": counts["done"],
        "errors": counts["errors"],
        "seconds": round(elapsed, 3),
        "requests_per_s": round(counts["completed"] / elapsed, 2),
        # in a window: the content events received in it (one token each, as vLLM streams them)
        "tokens_per_s": round(counts["events"] / elapsed, 1),
        "ttft_p50_ms": round(percentile(samples["ttft"], 0.5) * 1000, 2),
        "ttft_p99_ms": round(percentile(samples["ttft"], 0.99) * 1000, 2),
        "latency_p50_ms": round(percentile(samples["latency"], 0.5) * 1000, 2),
        "latency_p99_ms": round(percentile(samples["latency"], 0.99) * 1000, 2),
        "gap_p50_ms": round(percentile(samples["gaps"], 0.5) * 1000, 3),
        "chunks_per_stream": counts["chunks"] / counts["done"] if counts["done"] else 0,
        "coalesced_chunks": counts["coalesced"],
        **engine,
    }


RAW_SAMPLES = 4000  # --raw: at most this many samples of each kind (harness.evenly)


async def spread(args: argparse.Namespace) -> dict[str, Any]:
    """`--procs N`: N processes of this script share the streams and one wall-clock window; the engine's
    counters and the watched process's CPU are read here, at the window's edges. One process's event loop
    is near a core at ~10,000 streamed tokens/s: past that its own counts lag what the engine sent."""
    opens = args.at or time.time() + 2.0 + args.warmup_seconds  # 2 s for the processes to start
    procs, streams = args.procs, args.concurrency
    shares = [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    argv = [sys.executable, __file__, "--url", args.url, "--model", args.model, "--prompt", args.prompt,
            "--max-tokens", args.max_tokens, "--warmup", str(args.warmup), "--seconds", str(args.seconds),
            "--at", str(opens), "--raw"]  # fmt: skip
    if args.priority is not None:
        argv += ["--priority", str(args.priority)]
    env = {**os.environ, "BENCH_KEY": args.key}
    children = []
    for index, share in enumerate(shares):
        if share:
            more = ["-c", str(share), "--seed", str(args.seed + index)]
            children.append(await asyncio.create_subprocess_exec(*argv, *more, stdout=PIPE, env=env))
    async with aiohttp.ClientSession() as session:
        edges = Edges(session, args)
        await asyncio.sleep(max(0.0, opens - time.time()))
        await edges.open()
        await asyncio.sleep(args.seconds)
        engine = await edges.close()
    parts = []
    for child in children:
        out, _ = await child.communicate()
        if child.returncode:
            raise RuntimeError(f"a load process failed ({child.returncode})")
        parts.append(json.loads(out))
    counts = {k: sum(part["counts"][k] for part in parts) for k in parts[0]["counts"]}
    samples = {k: [v for part in parts for v in part[k]] for k in ("ttft", "latency", "gaps")}
    return summary(args, counts, samples, args.seconds, engine) | {"procs": len(parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL (without /v1)")
    parser.add_argument("--key", default="", help="bearer key (or set BENCH_KEY)")
    parser.add_argument("--model", default="qwen2.5-7b-instruct")
    parser.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=50)
    parser.add_argument("--max-tokens", default="64", help="tokens per request, or a range to draw from: 128-384")
    parser.add_argument("--seed", type=int, default=1, help="of the lengths drawn")
    parser.add_argument("--priority", type=int, help="vLLM's priority field in every request (direct to vLLM)")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent one by one before the round")
    parser.add_argument("--seconds", type=float, default=0.0, help="a measured window instead of -n requests")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="of load before the window")
    parser.add_argument("--procs", type=int, default=1, help="processes sharing the streams (with --seconds)")
    parser.add_argument("--at", type=float, default=0.0, help="the wall-clock time (epoch s) the window opens")
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # --procs: counts and samples
    parser.add_argument("--metrics-url", default="", help="the engine's base URL: its counters over the round/window")
    parser.add_argument("--cpu-pid", type=int, help="a process whose CPU over the round/window is reported")
    parser.add_argument("--metrics-key", default="", help="bearer key for --metrics-url (or BENCH_METRICS_KEY)")
    args = parser.parse_args()
    args.key = args.key or os.environ.get("BENCH_KEY", "")
    args.metrics_key = args.metrics_key or os.environ.get("BENCH_METRICS_KEY", "")
    if args.procs > 1 and not args.seconds:
        parser.error("--procs needs --seconds (processes share a measured window)")
    print(json.dumps(asyncio.run(spread(args) if args.procs > 1 else run(args))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
