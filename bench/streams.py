"""Streaming load on asyncio protocols: TTFT, chunk gaps and CPU per chunk over a steady window.

    python bench/streams.py --url http://127.0.0.1:8000 --key bst-... -c 128 --seconds 5 \\
        --ramp 0.64 --pid gateway=1234 --pid upstream=1233

`-c` connections, each streaming one chat completion after another (keep-alive, HTTP/1.1,
`stream_options.include_usage`). Why not bench/load.py (aiohttp): at paced rates its own
cost per chunk (stream reader, async iterator, a task switch per read) competes for the same
two cores as the gateway it measures, and its loop lags behind a burst of reads, which shows
up as TTFT. This client parses with httptools in `data_received` and timestamps each read as
it is handed over.

Three choices keep the numbers honest:
- the connections start `--ramp` seconds apart in all (one stream's length: 64 tokens at
  10 ms is 0.64 s), so requests arrive spread out as from many users, not as `-c` requests
  in one burst every stream length (a closed loop started at once stays synchronised; the
  burst then queues behind itself and that queueing, not the path, is what TTFT measures);
- everything is counted inside a window (`--warmup` after the ramp, then `--seconds`):
  chunks read and streams finished in it, and the CPU time of every `--pid NAME=PID` over it
  (/proc, user + system; several PIDs under one name are summed, e.g. nginx's processes),
  so "CPU per chunk" is that process's CPU over the chunks the clients received;
- TTFT is from writing the request to reading the first content token, and gaps are between
  two reads that carried content tokens of one stream, from its second token on (the first
  gap depends on where in the engine's step a stream started, the same on every path).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import uvloop

TOKEN = b'"delta":{"content"'  # a token event (vLLM and the fast upstream; the role event does not match)
TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle so far (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


class Stats:
    """What the window saw, across connections."""

    def __init__(self) -> None:
        self.start = self.end = float("inf")
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.chunks = 0  # content tokens read in the window
        self.coalesced = 0  # tokens that arrived in the same read as an earlier one of their stream
        self.finished = 0  # streams that ended in the window
        self.tokens = 0  # completion tokens of those streams, from their usage event
        self.short = 0  # streams (sent in the window) that ended with fewer tokens than asked
        self.errors: list[str] = []

    def inside(self, now: float) -> bool:
        return self.start <= now < self.end


class Connection(asyncio.Protocol):
    """One client connection: sends the next request as soon as a response ends."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.stats = run.stats
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.now = 0.0
        self.sent = 0.0
        self.first = 0.0
        self.last = 0.0
        self.events = 0
        self.usage = b""
        self.status = 0
        self.closed = asyncio.get_running_loop().create_future()

    def send(self) -> None:
        assert self.transport is not None
        self.first = self.last = 0.0
        self.events = 0
        self.usage = b""
        self.sent = time.perf_counter()
        self.transport.write(self.run.request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.stats.errors.append(f"parse: {exc}")
            assert self.transport is not None
            self.transport.close()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        events = body.count(TOKEN)
        if events:
            now, stats = self.now, self.stats
            if not self.first:
                self.first = now
                if stats.inside(self.sent):
                    stats.ttft.append(now - self.sent)
            elif self.events >= 2 and now != self.last and stats.inside(now):
                stats.gaps.append(now - self.last)
            if stats.inside(now):
                stats.chunks += events
                if now == self.last:
                    stats.coalesced += events
                else:
                    stats.coalesced += events - 1
            self.events += events
            self.last = now
        if b'"usage":{' in body:
            self.usage = body

    def on_message_complete(self) -> None:
        stats, run = self.stats, self.run
        now = time.perf_counter()
        if self.status != 200:
            stats.errors.append(f"status {self.status}")
        elif stats.inside(now):
            stats.finished += 1
            stats.tokens += _completion_tokens(self.usage)
        if self.status == 200 and self.events < run.max_tokens and stats.inside(self.sent):
            stats.short += 1
        if now < stats.end and not run.stopping:
            self.send()
        else:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent and not self.run.stopping and time.perf_counter() < self.stats.end:
            self.stats.errors.append(f"connection lost: {exc}")
        if not self.closed.done():
            self.closed.set_result(None)


def _completion_tokens(usage: bytes) -> int:
    at = usage.rfind(b'"completion_tokens":')
    if at < 0:
        return 0
    digits = usage[at + 20 : at + 32].split(b"}")[0].split(b",")[0]
    return int(digits) if digits.strip().isdigit() else 0


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        body = json.dumps(
            {
                "model": args.model,
                "messages": [{"role": "user", "content": args.prompt}],
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            separators=(",", ":"),
        ).encode()
        auth = f"authorization: Bearer {args.key}\r\n".encode() if args.key else b""
        self.request = (
            b"POST %s/v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
            b"%scontent-length: %d\r\n\r\n%s"
            % (url.path.rstrip("/").encode(), self.host.encode(), self.port, auth, len(body), body)
        )
        self.max_tokens = args.max_tokens
        self.stats = Stats()
        self.stopping = False


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    state = Run(args)
    stats = state.stats
    pids: dict[str, list[int]] = {}
    for item in args.pid:
        name, _, pid = item.partition("=")
        pids.setdefault(name, []).append(int(pid))
    begin = time.perf_counter()
    stats.start = begin + args.ramp + args.warmup
    stats.end = stats.start + args.seconds
    connections: list[Connection] = []
    step = args.ramp / args.concurrency
    for index in range(args.concurrency):
        delay = begin + index * step - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        _, connection = await loop.create_connection(lambda: Connection(state), state.host, state.port)
        connections.append(connection)
        connection.send()
    await asyncio.sleep(max(0.0, stats.start - time.perf_counter()))
    cpu_before = {name: [cpu_seconds(p) for p in group] for name, group in pids.items()}
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    busy_before = machine_busy()
    await asyncio.sleep(max(0.0, stats.end - time.perf_counter()))
    busy = machine_busy() - busy_before
    cpu_after = {name: [cpu_seconds(p) for p in group] for name, group in pids.items()}
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    # The window is over: no new requests; streams in flight may finish (bounded), then every connection closes.
    try:
        async with asyncio.timeout(args.drain):
            await asyncio.gather(*(c.closed for c in connections))
    except TimeoutError:
        pass
    state.stopping = True
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    chunks = max(1, stats.chunks)
    cpu: dict[str, dict[str, float]] = {}

    def account(name: str, user: float, system: float) -> None:
        cpu[name] = {
            "cpu_s": round(user + system, 3),
            "cpu_us_per_chunk": round((user + system) / chunks * 1e6, 2),
            "system_us_per_chunk": round(system / chunks * 1e6, 2),  # in the kernel: reads, writes, wake-ups
            "cpu_share": round((user + system) / args.seconds, 3),  # of one core
        }

    for name in pids:
        before, after = cpu_before[name], cpu_after[name]
        account(
            name,
            sum(a[0] - b[0] for a, b in zip(after, before, strict=True)),
            sum(a[1] - b[1] for a, b in zip(after, before, strict=True)),
        )
    account(
        "client",
        self_after.ru_utime - self_before.ru_utime,
        self_after.ru_stime - self_before.ru_stime,
    )
    ours = sum(entry["cpu_s"] for entry in cpu.values())
    return {
        "url": args.url,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "requests": stats.finished,
        "errors": len(stats.errors),
        "error_examples": sorted(set(stats.errors))[:3],
        "short_streams": stats.short,
        "requests_per_s": round(stats.finished / args.seconds, 1),
        "chunks": stats.chunks,
        "chunks_per_s": round(stats.chunks / args.seconds, 1),
        "tokens_per_s": round(stats.tokens / args.seconds, 1),
        "ttft_p50_ms": round(percentile(stats.ttft, 0.5) * 1000, 3),
        "ttft_p90_ms": round(percentile(stats.ttft, 0.9) * 1000, 3),
        "ttft_p99_ms": round(percentile(stats.ttft, 0.99) * 1000, 3),
        "gap_p50_ms": round(percentile(stats.gaps, 0.5) * 1000, 3),
        "gap_p99_ms": round(percentile(stats.gaps, 0.99) * 1000, 3),
        "gap_max_ms": round(max(stats.gaps, default=float("nan")) * 1000, 3),
        "coalesced_chunks": stats.coalesced,
        "cpu": cpu,
        # Cores busy with anything not measured here (other users of the machine, the kernel's own threads):
        # a round where this is high measured them too.
        "others_cores": round(max(0.0, busy - ours) / args.seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL (without /v1)")
    parser.add_argument("--key", default=os.environ.get("BENCH_KEY", ""), help="bearer key (or set BENCH_KEY)")
    parser.add_argument("--model", default="qwen2.5-7b-instruct")
    parser.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ramp", type=float, default=0.64, help="seconds over which the connections start")
    parser.add_argument("--warmup", type=float, default=0.64, help="seconds after the ramp before the window")
    parser.add_argument("--seconds", type=float, default=5.0, help="the measured window")
    parser.add_argument("--drain", type=float, default=2.0, help="seconds streams in flight get after the window")
    parser.add_argument("--pid", action="append", default=[], help="NAME=PID whose CPU to measure (repeatable)")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
