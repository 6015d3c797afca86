"""A low-overhead streaming load generator: TTFT, inter-chunk gaps, tokens/s.

Runs the same chat workload against one base URL (direct to the upstream, or
through bastion) and prints one JSON object. Streams with
`stream_options.include_usage` so completion tokens are counted from the
server's own usage, and `ignore_eos` so every request generates max_tokens.

    python bench/load.py --url http://127.0.0.1:8000 --key bst-... -c 64 -n 640 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stats: dict[str, list[float]]
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
                chunks += events
                coalesced += events - 1
                if first is None:
                    first = now
                elif last is not None:
                    stats["gaps"].append(now - last)
                last = now
            if b'"usage":{' in chunk:
                usage = json.loads(chunk[chunk.rindex(b"data: {") + 6 :].split(b"\n\n")[0])["usage"]
                tokens = usage["completion_tokens"]
    end = time.perf_counter()
    stats["ttft"].append((first or end) - start)
    stats["latency"].append(end - start)
    stats["tokens"].append(tokens)
    stats["chunks"].append(chunks)
    stats["coalesced"].append(coalesced)


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = args.url.rstrip("/") + "/v1/chat/completions"
    body = json.dumps(
        {
            "model": args.model,
            "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"content-type": "application/json"}
    if args.key:
        headers["authorization"] = f"Bearer {args.key}"
    stats: dict[str, list[float]] = {
        k: [] for k in ("ttft", "latency", "tokens", "chunks", "coalesced", "gaps", "errors")
    }
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(args.warmup):
            await one(session, url, body, headers, {k: [] for k in stats})
        queue = iter(range(args.requests))

        async def worker() -> None:
            for _ in queue:
                await one(session, url, body, headers, stats)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    done = len(stats["latency"])
    return {
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": done,
        "errors": len(stats["errors"]),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(done / elapsed, 2),
        "tokens_per_s": round(sum(stats["tokens"]) / elapsed, 1),
        "ttft_p50_ms": round(percentile(stats["ttft"], 0.5) * 1000, 2),
        "ttft_p99_ms": round(percentile(stats["ttft"], 0.99) * 1000, 2),
        "latency_p50_ms": round(percentile(stats["latency"], 0.5) * 1000, 2),
        "latency_p99_ms": round(percentile(stats["latency"], 0.99) * 1000, 2),
        "gap_p50_ms": round(percentile(stats["gaps"], 0.5) * 1000, 3),
        "chunks_per_stream": statistics.mean(stats["chunks"]) if stats["chunks"] else 0,
        "coalesced_chunks": int(sum(stats["coalesced"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL (without /v1)")
    parser.add_argument("--key", default="", help="bearer key (or set BENCH_KEY)")
    parser.add_argument("--model", default="qwen2.5-7b-instruct")
    parser.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if not args.key:
        import os

        args.key = os.environ.get("BENCH_KEY", "")
    print(json.dumps(asyncio.run(run(args))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
