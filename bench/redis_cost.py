"""What shared (Redis) limits cost the gateway per request, and what one Redis call costs the client.

    python bench/redis_cost.py [--seconds 10] [--rounds 3] [--concurrency 16]

Two measurements, on 127.0.0.1 (a redis-server of its own on a free port):

- per call: CPU (process time) of one small EVALSHA over one connection, sequential, for
  coredis (what `limits` and bastion used before) and bastion's lean client (`bastion.redisio`);
- per request: the gateway's CPU per non-streaming request under wrk (bench/fast_upstream.py
  behind it, the production-like settings of harness.gateway_env plus a daily token budget,
  so the budget ledger reserves and settles too), with memory storage and with
  BASTION_REDIS_URL set; redis-server's own CPU per request beside it.

Run it with PYTHONPATH pointing at another checkout's src/ to measure that code (the gateway
is started with this interpreter and environment). A benchmark, not a test; the 1-minute
load average is printed with each round (other work on the machine shows up in the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from harness import bastion, cpu_seconds, create_key, free_port, gateway_env, load_average, say, upstream
from run import wrk

SCRIPT = "local t = redis.call('TIME') redis.call('INCRBY', KEYS[1], ARGV[1]) return {1, t[1]}"


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[int, str]]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield proc.pid, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def redis_calls(url: str | None) -> tuple[int, int]:
    """Calls clients have made so far (EVALSHA, EVAL, ZREM from INFO commandstats; not the commands scripts run),
    and the server's reads of client sockets (`total_reads_processed`): with one client sending one request at a
    time (c=1), the gateway's round trips."""
    if url is None:
        return 0, 0
    out = subprocess.run(["redis-cli", "-u", url, "INFO", "all"], capture_output=True, text=True).stdout
    calls = sum(int(n) for n in re.findall(r"cmdstat_(?:evalsha|eval|zrem):calls=(\d+)", out))
    reads = re.search(r"total_reads_processed:(\d+)", out)
    return calls, int(reads.group(1)) if reads else 0


async def per_call(url: str, n: int) -> dict[str, float]:
    """µs of CPU per sequential EVALSHA: coredis vs the lean client."""
    import coredis

    from bastion.redisio import Redis

    out: dict[str, float] = {}
    theirs = coredis.Redis.from_url(url)
    their_script = theirs.register_script(SCRIPT)
    ours = Redis.from_url(url, 1.0)
    our_script = ours.script(SCRIPT)
    for name, call in (
        ("coredis", lambda: their_script.execute(keys=["k"], args=[1])),
        ("lean", lambda: our_script(["k"], [1])),
    ):
        for _ in range(300):
            await call()
        samples = []
        for _ in range(3):
            start = time.process_time()
            for _ in range(n):
                await call()
            samples.append((time.process_time() - start) / n * 1e6)
        out[name] = statistics.median(samples)
    await ours.aclose()
    return out


def per_request(redis: str | None, redis_pid: int, seconds: int, concurrency: int, work: Path) -> dict[str, float]:
    env = {**gateway_env(work), "BASTION_BUDGET_DAY": "1000000000000", "BASTION_BUDGET_DB": str(work / "u.sqlite3")}
    if redis is not None:
        env["BASTION_REDIS_URL"] = redis
    key = create_key(env)
    up, gw = free_port(), free_port()
    with upstream(up, work), bastion(gw, f"http://127.0.0.1:{up}", env, work) as proc:
        url = f"http://127.0.0.1:{gw}"
        wrk(url, key, concurrency, 2, work)  # warm-up: connections, scripts loaded
        load = load_average()
        cpu, redis_cpu, (calls, reads) = cpu_seconds(proc.pid), cpu_seconds(redis_pid), redis_calls(redis)
        row = wrk(url, key, concurrency, seconds, work)
        used, redis_used = cpu_seconds(proc.pid) - cpu, cpu_seconds(redis_pid) - redis_cpu
        calls_after, reads_after = redis_calls(redis)
        calls, reads = calls_after - calls, reads_after - reads - 1  # less the INFO's own read
    done = row["requests"] - row["errors"]
    return {
        "calls_per_request": calls / done,
        "reads_per_request": reads / done,
        "us_per_request": used / done * 1e6,
        "redis_us_per_request": redis_used / done * 1e6 if redis else 0.0,
        "rps": row["rps"],
        "errors": row["errors"],
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5000, help="EVALSHA calls per sample (0: skip)")
    args = parser.parse_args()
    with redis_server() as (pid, url), tempfile.TemporaryDirectory() as tmp:
        if args.calls:
            calls = asyncio.run(per_call(url, args.calls))
            say(f"per EVALSHA, µs CPU: coredis {calls['coredis']:.1f}, lean {calls['lean']:.1f}")
        for name, redis in (("memory", None), ("redis", url)):
            rows = []
            for i in range(args.rounds):
                work = Path(tmp) / f"{name}-{i}"
                work.mkdir()
                row = per_request(redis, pid, args.seconds, args.concurrency, work)
                rows.append(row)
                say(
                    f"{name} round {i + 1}: {row['us_per_request']:.0f} µs gateway CPU/request, "
                    f"redis-server {row['redis_us_per_request']:.0f} µs, "
                    f"{row['calls_per_request']:.1f} Redis calls/request, {row['reads_per_request']:.2f} server reads "
                    f"(round trips at c=1)/request, {row['rps']:.0f} req/s, "
                    f"{row['errors']:.0f} errors, load {row['load']:.2f}"
                )
            say(f"{name}: median {statistics.median(r['us_per_request'] for r in rows):.0f} µs gateway CPU/request")


if __name__ == "__main__":
    main()
