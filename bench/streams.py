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

`--plain` sends non-streaming requests instead (their TTFT is the whole answer's latency).
`--rate R` makes it an open loop: R requests/s fall due on a schedule and go out on whichever of
the `-c` connections is free (queued when none is), and latency counts from when a request was
due, so a server that falls behind shows it as latency and a lower delivered rate, not as a
politely slower client.
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
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import uvloop
from harness import evenly, percentile

TOKEN = b'"delta":{"content"'  # a token event (vLLM and the fast upstream; the role event does not match)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def machine_busy() -> tuple[float, float, float]:
    """CPU seconds the whole machine spent so far (all cores), from /proc/stat: in processes (user, nice,
    system), in interrupts (irq, softirq: much of loopback TCP's receive path runs there, charged to no
    process), and stolen by the hypervisor."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[0:3]) / TICKS, (fields[5] + fields[6]) / TICKS, fields[7] / TICKS


class Stats:
    """What the window saw, across connections."""

    def __init__(self) -> None:
        self.start = self.end = float("inf")
        self.ttft: list[float] = []
        self.latency: list[float] = []
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
        self.waiting = False  # a request is out and its response not yet whole
        self.closed = asyncio.get_running_loop().create_future()

    def send(self, due: float = 0.0) -> None:
        """The next request; `due` is when an open-loop schedule wanted it sent (latency counts from there)."""
        assert self.transport is not None
        self.first = self.last = 0.0
        self.events = 0
        self.usage = b""
        self.sent = due or time.perf_counter()
        self.waiting = True
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
        self.waiting = False
        stats, run = self.stats, self.run
        now = time.perf_counter()
        if self.status != 200:
            stats.errors.append(f"status {self.status}")
        elif stats.inside(now):
            stats.finished += 1
            stats.tokens += _completion_tokens(self.usage)
        if stats.inside(self.sent):
            stats.latency.append(now - self.sent)
            if run.plain:
                stats.ttft.append(now - self.sent)  # a whole answer: its first token is its last
            elif self.status == 200 and self.events < run.max_tokens:
                stats.short += 1
        if now < stats.end and not run.stopping:
            if run.rate:
                run.ready(self)
            else:
                self.send()
        else:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # An idle keep-alive connection the server closes (its idle timeout) lost nothing: only one with a
        # request out is an error.
        if self.waiting and not self.run.stopping and time.perf_counter() < self.stats.end:
            self.stats.errors.append(f"connection lost: {exc}")
        if self in self.run.idle:
            self.run.idle.remove(self)
        if not self.closed.done():
            self.closed.set_result(None)


RAW_SAMPLES = 4000  # --raw: at most this many TTFT samples (harness.evenly)


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
        request: dict[str, object] = {
            "model": args.model,
            "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
        }
        if not args.plain:
            request |= {"stream": True, "stream_options": {"include_usage": True}}
        body = json.dumps(request, separators=(",", ":")).encode()
        self.plain = args.plain
        auth = f"authorization: Bearer {args.key}\r\n".encode() if args.key else b""
        self.request = (
            b"POST %s/v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
            b"%scontent-length: %d\r\n\r\n%s"
            % (url.path.rstrip("/").encode(), self.host.encode(), self.port, auth, len(body), body)
        )
        self.max_tokens = args.max_tokens
        self.stats = Stats()
        self.stopping = False
        # Open loop (--rate): requests are due on a schedule, sent on whichever connection is free.
        self.rate: float = args.rate
        self.idle: deque[Connection] = deque()  # first in, first out: every connection stays in use
        self.due: deque[float] = deque()
        self.dropped = 0  # due requests given up on: more waited than a bound (the server fell far behind)

    def ready(self, connection: Connection) -> None:
        if self.due:
            connection.send(self.due.popleft())
        else:
            self.idle.append(connection)

    def schedule(self, started: float, bound: int) -> None:
        """Every millisecond: the requests due since the last call, each on a free connection or queued."""
        loop = asyncio.get_running_loop()
        issued = 0

        def tick() -> None:
            nonlocal issued
            now = time.perf_counter()
            if now >= self.stats.end or self.stopping:
                return
            target = int((now - started) * self.rate)
            while issued < target:
                issued += 1
                due = started + issued / self.rate
                if self.idle:
                    self.idle.popleft().send(due)
                elif len(self.due) < bound:
                    self.due.append(due)
                else:
                    self.dropped += 1
            loop.call_later(0.001, tick)

        tick()


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    state = Run(args)
    stats = state.stats
    pids: dict[str, list[int]] = {}
    for item in args.pid:
        name, _, pid = item.partition("=")
        pids.setdefault(name, []).append(int(pid))
    begin = time.perf_counter()
    if args.at:  # several clients share one window: it opens at this wall-clock time
        begin += args.at - args.ramp - args.warmup - time.time()
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
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
        if state.rate:
            state.idle.append(connection)
        else:
            connection.send()
    if state.rate:
        state.schedule(time.perf_counter(), bound=10 * args.concurrency)
    await asyncio.sleep(max(0.0, stats.start - time.perf_counter()))
    cpu_before = {name: [cpu_seconds(p) for p in group] for name, group in pids.items()}
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    busy_before = machine_busy()
    await asyncio.sleep(max(0.0, stats.end - time.perf_counter()))
    busy = [after - before for after, before in zip(machine_busy(), busy_before, strict=True)]
    cpu_after = {name: [cpu_seconds(p) for p in group] for name, group in pids.items()}
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    # The window is over: no new requests; streams in flight may finish (bounded), then every connection closes.
    for connection in state.idle:
        assert connection.transport is not None
        connection.transport.close()
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
        "errors": len(stats.errors) + state.dropped,
        "error_examples": sorted(set(stats.errors))[:3] + ([f"{state.dropped} dropped"] if state.dropped else []),
        "short_streams": stats.short,
        "requests_per_s": round(stats.finished / args.seconds, 1),
        "chunks": stats.chunks,
        "chunks_per_s": round(stats.chunks / args.seconds, 1),
        "tokens_per_s": round(stats.tokens / args.seconds, 1),
        "ttft_p50_ms": round(percentile(stats.ttft, 0.5) * 1000, 3),
        "ttft_p90_ms": round(percentile(stats.ttft, 0.9) * 1000, 3),
        "ttft_p99_ms": round(percentile(stats.ttft, 0.99) * 1000, 3),
        "latency_p50_ms": round(percentile(stats.latency, 0.5) * 1000, 3),
        "latency_p99_ms": round(percentile(stats.latency, 0.99) * 1000, 3),
        "gap_p50_ms": round(percentile(stats.gaps, 0.5) * 1000, 3),
        "gap_p99_ms": round(percentile(stats.gaps, 0.99) * 1000, 3),
        "gap_max_ms": round(max(stats.gaps, default=float("nan")) * 1000, 3),
        "coalesced_chunks": stats.coalesced,
        "cpu": cpu,
        # Cores busy in processes not measured here (other users of the machine, the kernel's threads): a round
        # where this is high measured them too. Interrupt time (loopback's receive path, mostly ours) and time
        # the hypervisor stole are apart.
        "others_cores": round(max(0.0, busy[0] - ours) / args.seconds, 3),
        "interrupt_cores": round(busy[1] / args.seconds, 3),
        "stolen_cores": round(busy[2] / args.seconds, 3),
        **({"ttft_samples_ms": [round(t * 1000, 3) for t in evenly(stats.ttft, RAW_SAMPLES)]} if args.raw else {}),
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
    parser.add_argument("--at", type=float, default=0.0, help="wall-clock time (epoch s) the window opens at")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s due, on -c connections")
    parser.add_argument("--plain", action="store_true", help="non-streaming requests (TTFT is then the latency)")
    parser.add_argument("--raw", action="store_true", help="include every TTFT sample (to merge several clients)")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
