"""The ceiling of one gateway process: the paced chunks/s and requests/s one bastion carries at >= 98 % of direct.

    .venv/bin/python bench/ceiling.py [--upstreams 2] [--clients 1] [--seconds 5] [--rounds 1] \\
        [--stream-steps 32,64,128,256,512,1024] [--request-rates 1000,2000,3000,4000,6000,8000] [--out DIR] \\
        [--workers N] [--redis]

`--upstreams` canned upstreams (bench/fast_upstream.py --paced --reuse-port: one port, the kernel
spreads connections among the processes) behind one bastion with every feature on (as in
bench/run.py). Two ramps:

- streams: paced streams of `--tokens` tokens, one per stream per `--itl` engine step (64 and
  10 ms: c streams offer c x 100 chunks/s), the first at once;
- requests: non-streaming requests in an open loop (bench/streams.py --rate: R requests/s fall
  due on a schedule, sent on whichever of `--pool` connections is free), each answered whole at
  the next engine step (a short generation). A closed loop would not do here: its rate falls with
  any added latency, so it would measure the gateway's latency, not what it can carry.

At each step the load runs direct and through bastion (`--rounds` times, alternating), spread over
`--clients` bench/streams.py processes that share one measured window. A step passes when bastion
delivers >= 98 % of direct's chunks/s (requests/s) without errors; the ramp stops at the first step
that fails (`--past` more steps are still measured, to show the fall). The ceiling is the last step
that passed: what bastion delivered there, its CPU (share of one core, and per chunk or request),
and the TTFT it added. Direct's rate is the offered load: where direct itself falls short of the
offer (upstreams or clients out of CPU), the step is marked and says nothing about bastion; give
more `--upstreams` and `--clients` (on a 16-core host: e.g. 4 and 4).

`--workers N` runs `bastion serve --workers N` (a master and N worker processes on one port) with
a redis-server of its own (BASTION_REDIS_URL, which several workers need; `--redis` gives one worker
the same Redis, for a like-for-like comparison). bastion's CPU is then the master's plus every
worker's (every process below the `bastion serve` PID, read again at each step).

Writes ceiling.json and ceiling.md under --out; waits for a quiet machine (--max-load) first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    HERE,
    PYTHON,
    bastion,
    clean_env,
    create_key,
    descendants,
    free_port,
    gateway_env,
    percentile,
    process,
    redis,
    say,
    stop_children_on_sigterm,
    wait_for_quiet,
)

PASS = 0.98


def wait_for_workers(pid: int, workers: int, timeout: float = 60.0) -> None:
    """/ready answers once one worker does: wait until all of them run (the master spawns them at once)."""
    deadline = time.monotonic() + timeout
    while workers > 1 and len([p for p in descendants(pid) if b"spawn_main" in _cmdline(p)]) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bastion did not start {workers} workers in {timeout:.0f}s")
        time.sleep(0.2)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def load(args: argparse.Namespace, url: str, key: str, step: int, plain: bool, gateway: int | None) -> Any:
    """One measured window over `args.clients` streams.py processes, merged.

    `step` is the number of paced streams, or (`plain`) the requests/s due over `args.pool` connections.
    """
    ramp = args.tokens * args.itl if not plain else 0.5
    warmup = args.tokens * args.itl if not plain else 0.5
    opens = time.time() + 1.0 + ramp + warmup  # every client's window opens at the same moment
    connections = args.pool if plain else step
    clients = min(args.clients, connections)
    procs = []
    for index in range(clients):
        share = connections // clients + (1 if index < connections % clients else 0)
        command = [
            PYTHON, str(HERE / "streams.py"), "--url", url, "-c", str(share), "--max-tokens", str(args.tokens),
            "--ramp", str(ramp), "--warmup", str(warmup), "--seconds", str(args.seconds), "--at", str(opens), "--raw",
            *(["--plain", "--rate", str(step / clients)] if plain else []),
            *([f"--pid=gateway={pid}" for pid in [gateway, *descendants(gateway)]] if gateway and index == 0 else []),
        ]  # fmt: skip
        procs.append(subprocess.Popen(command, env={**os.environ, "BENCH_KEY": key}, stdout=subprocess.PIPE, text=True))
    rows = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.seconds + 4 * (ramp + warmup) + 60)
        if proc.returncode:
            raise RuntimeError(f"bench/streams.py failed ({proc.returncode}) against {url}")
        rows.append(json.loads(out))
    ttft = [t for row in rows for t in row.pop("ttft_samples_ms")]
    merged: dict[str, Any] = {
        "chunks_per_s": round(sum(r["chunks_per_s"] for r in rows), 1),
        "requests_per_s": round(sum(r["requests_per_s"] for r in rows), 1),
        "errors": sum(r["errors"] for r in rows),
        "error_examples": sorted({e for r in rows for e in r["error_examples"]})[:3],
        "ttft_p50_ms": round(percentile(ttft, 0.5), 3),
        "ttft_p99_ms": round(percentile(ttft, 0.99), 3),
        "gap_p99_ms": max(r["gap_p99_ms"] for r in rows) if not plain else None,
        "client_cores": round(sum(r["cpu"]["client"]["cpu_share"] for r in rows), 3),
        "others_cores": rows[0]["others_cores"],
    }
    if gateway:
        cpu = rows[0]["cpu"]["gateway"]
        merged["gateway_cores"] = cpu["cpu_share"]
        done = merged["requests_per_s"] if plain else merged["chunks_per_s"]
        merged["gateway_cpu_us_per_unit"] = round(cpu["cpu_share"] / done * 1e6, 2) if done else None
    return merged


def new_lines(log: Path, offset: int, most: int = 8) -> list[str]:
    """The gateway's log lines written since `offset` (a round with errors: what the gateway said of them)."""
    with log.open("rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    return list(dict.fromkeys(line[:300] for line in lines))[-most:]


def ramp(
    args: argparse.Namespace, kind: str, steps: list[int], direct: str, through: str, key: str, pid: int, log: Path
) -> Any:
    plain = kind == "requests"
    unit = "requests_per_s" if plain else "chunks_per_s"
    rows = []
    failed = 0
    name = "rate" if plain else "c"
    for step in steps:
        pairs = []
        for index in range(args.rounds):
            wait_for_quiet(args.max_load, args.patience)
            say(f"{kind} {name}={step} round {index + 1}: direct")
            d = load(args, direct, "", step, plain, None)
            wait_for_quiet(args.max_load, args.patience)
            say(f"{kind} {name}={step} round {index + 1}: bastion")
            offset = log.stat().st_size
            b = load(args, through, key, step, plain, pid)
            if b["errors"]:
                b["gateway_log"] = new_lines(log, offset)
                say(f"{b['errors']} errors through bastion; its log: {b['gateway_log']}")
            pairs.append((d, b))
        ratios = [b[unit] / d[unit] if d[unit] else 0.0 for d, b in pairs]
        ratio = statistics.median(ratios)
        offered = step if plain else step / args.itl
        direct_short = statistics.median(d[unit] for d, _ in pairs) < PASS * offered
        errors = sum(b["errors"] for _, b in pairs)
        passed = ratio >= PASS and not errors
        row = {
            "concurrency": args.pool if plain else step,
            "offered_per_s": offered,
            "direct": [d for d, _ in pairs],
            "bastion": [b for _, b in pairs],
            "ratio": round(ratio, 4),
            "ratios": [round(r, 4) for r in ratios],
            "passed": passed,
            "direct_short_of_offer": direct_short,
        }
        rows.append(row)
        say(f"{kind} {name}={step}: bastion/direct {ratio:.3f} ({'pass' if passed else 'FAIL'})")
        if not passed:
            failed += 1
            if failed > args.past:
                break
    passed_rows = [r for r in rows if r["passed"]]
    ceiling = max(passed_rows, key=lambda r: statistics.median(b[unit] for b in r["bastion"]), default=None)
    return {"unit": unit, "steps": rows, "ceiling": ceiling}


def summary_table(kind: str, result: dict[str, Any]) -> str:
    unit = result["unit"]
    label = "chunks/s" if unit == "chunks_per_s" else "requests/s"
    per = "chunk" if unit == "chunks_per_s" else "request"
    lines = [
        f"{kind}: median over rounds",
        "",
        f"| c | offered {label} | direct {label} | bastion {label} | bastion / direct | bastion CPU (cores) "
        f"| CPU µs per {per} | TTFT p50 direct / bastion (ms) | TTFT p99 direct / bastion (ms) | |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["steps"]:

        def med(path: str, key: str, row: dict[str, Any] = row) -> float:
            return float(statistics.median(r[key] for r in row[path]))

        note = "pass" if row["passed"] else "FAIL"
        if row["direct_short_of_offer"]:
            note += " (direct short of the offer: upstreams or clients saturated)"
        offered = f"{row['offered_per_s']:,.0f}"
        lines.append(
            f"| {row['concurrency']} | {offered} | {med('direct', unit):,.0f} | {med('bastion', unit):,.0f} "
            f"| {row['ratio']:.3f} | {med('bastion', 'gateway_cores'):.2f} "
            f"| {med('bastion', 'gateway_cpu_us_per_unit'):.1f} "
            f"| {med('direct', 'ttft_p50_ms'):.2f} / {med('bastion', 'ttft_p50_ms'):.2f} "
            f"| {med('direct', 'ttft_p99_ms'):.2f} / {med('bastion', 'ttft_p99_ms'):.2f} | {note} |"
        )
    ceiling = result["ceiling"]
    if ceiling is None:
        lines.append(f"\nNo step passed: start the {kind} ramp lower.")
    else:
        rate = statistics.median(b[unit] for b in ceiling["bastion"])
        cores = statistics.median(b["gateway_cores"] for b in ceiling["bastion"])
        lines.append(
            f"\nCeiling ({kind}): {rate:,.0f} {label} (offered {ceiling['offered_per_s']:,.0f}, "
            f"c={ceiling['concurrency']}), the gateway using "
            f"{cores:.2f} of a core ({rate / cores:,.0f} {label} per core of gateway CPU)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstreams", type=int, default=2, help="fast_upstream processes sharing one port")
    parser.add_argument("--clients", type=int, default=1, help="bench/streams.py processes sharing the load")
    parser.add_argument("--stream-steps", default="32,64,128,256,512,1024")
    parser.add_argument("--request-rates", default="1000,2000,3000,4000,6000,8000", help="requests/s due")
    parser.add_argument("--pool", type=int, default=256, help="connections the open-loop requests go out on")
    parser.add_argument("--only", choices=("streams", "requests"), help="run one ramp only")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--itl", type=float, default=0.01)
    parser.add_argument("--seconds", type=float, default=5.0, help="the measured window of each step")
    parser.add_argument("--rounds", type=int, default=1, help="direct/bastion pairs per step (the median counts)")
    parser.add_argument("--past", type=int, default=1, help="steps still measured after the first that fails")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load average below this")
    parser.add_argument("--patience", type=float, default=120.0, help="seconds to wait for it")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workers", type=int, default=1, help="bastion worker processes (bastion serve --workers)")
    parser.add_argument("--redis", action="store_true", help="limits in Redis even with one worker (always with 2+)")
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server program to start")
    args = parser.parse_args()
    stop_children_on_sigterm()
    args.max_load *= max(1, (os.cpu_count() or 2) // 2)  # the limit is for 2 cores; scale it on a larger host
    work = Path(tempfile.mkdtemp(prefix="bastion-ceiling-"))
    env = gateway_env(work)
    key = create_key(env)
    port, gw_port = free_port(), free_port()
    upstream_args = [PYTHON, str(HERE / "fast_upstream.py"), "--port", str(port), "--paced", "--itl", str(args.itl),
                     "--tokens", str(args.tokens), "--reuse-port"]  # fmt: skip
    extra = [
        subprocess.Popen(upstream_args, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(args.upstreams - 1)
    ]
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if args.workers > 1 or args.redis:
                env["BASTION_REDIS_URL"] = stack.enter_context(redis(free_port(), work, args.redis_server))
            health = f"http://127.0.0.1:{port}/health"
            stack.enter_context(process(upstream_args, clean_env(), health, work / "upstream.log"))
            gateway = stack.enter_context(bastion(gw_port, f"http://127.0.0.1:{port}", env, work, workers=args.workers))
            wait_for_workers(gateway.pid, args.workers)
            direct, through = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gw_port}"
            kinds = [args.only] if args.only else ["streams", "requests"]
            for kind in kinds:
                steps = [int(s) for s in (args.stream_steps if kind == "streams" else args.request_rates).split(",")]
                results[kind] = ramp(args, kind, steps, direct, through, key, gateway.pid, work / "gateway.log")
    finally:
        for proc in extra:
            proc.terminate()
            proc.wait(10)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    text = "\n\n".join(summary_table(kind, result) for kind, result in results.items())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceiling.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / "ceiling.md").write_text(f"# One bastion process's ceiling, {meta['date']}\n\n{meta}\n\n{text}\n")
    say(f"written to {args.out}/ceiling.md and ceiling.json")


if __name__ == "__main__":
    main()
