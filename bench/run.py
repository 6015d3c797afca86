"""The performance harness: the same workload direct to the upstream and through bastion.

    make bench                      # or: .venv/bin/python bench/run.py [--quick]

Starts, on 127.0.0.1, a fast upstream (bench/fast_upstream.py: canned answers on
asyncio protocols, because the simulator itself capped streaming at ~1,300-2,100
streams/s; the "direct" column shows what the upstream does alone) and a gateway in front
of it configured as in production (a real key, an IP allowlist, rate limits set high
enough never to trigger, metrics and the audit log on), then measures, in one run:
non-streaming at c=1 and c=64 with wrk (RPS, p50/p99), streaming 64 chunks at c=1 (three rounds, the
median kept) and c=16 (streams/s, TTFT p50/p99), chunk timing at a 10 ms inter-token gap (coalesced
chunks), the gateway's CPU time per request and per chunk (from /proc), and its RSS at
idle and under load. Prints a table and writes results.md + results.json under
bench/results/. It is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
%s
"""


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, env=env, stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{args[:4]} did not start; see {log}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Sampler:
    """Peak RSS of a process while a load runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def wrk(url: str, key: str, concurrency: int, seconds: int, script_dir: Path) -> dict[str, float]:
    script = script_dir / f"post-{bool(key)}.lua"
    script.write_text(WRK_SCRIPT % (f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script),
         url + "/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _wrk_ms(out, "50%"),
        "p99_ms": _wrk_ms(out, "99%"),
        "requests": requests,
        "errors": int(non2xx.group(1)) if non2xx else 0,
    }


def _wrk_ms(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def stream_load(url: str, key: str, concurrency: int, requests: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE / "load.py"), "--url", url, "-c", str(concurrency), "-n", str(requests),
         "--max-tokens", "64"],
        env={**os.environ, "BENCH_KEY": key}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)  # type: ignore[no-any-return]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    seconds = 3 if args.quick else 8
    streams = (20, 160) if args.quick else (200, 4800)
    python = sys.executable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "VLLM_"))}
    sim_port, sim_slow_port, gw_port = free_port(), free_port(), free_port()
    sim = [python, str(HERE / "fast_upstream.py"), "--tokens", "64"]
    keys = work / "keys.json"
    env = {
        **base_env,
        "BASTION_KEYS_FILE": str(keys),
        "BASTION_ALLOW_IPS": "127.0.0.0/8",
        "BASTION_RATE_LIMIT_RPM": "100000000",
        "BASTION_RATE_LIMIT_TPM": "100000000000",
        "BASTION_RATE_LIMIT_MAX_CONCURRENT": "100000",
        "BASTION_METRICS_TOKEN": "bench-metrics-token-0123456789",
        "BASTION_AUDIT_LOG": str(work / "audit.jsonl"),
        "BASTION_LOG_LEVEL": "warning",
    }
    key = subprocess.run(
        [python, "-m", "bastion", "keys", "create", "--name", "bench"], env=env, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    results: dict[str, Any] = {}
    with (
        process([*sim, "--port", str(sim_port)], base_env, f"http://127.0.0.1:{sim_port}/health", work / "sim.log"),
        process(
            [python, "-m", "bastion", "serve", "--port", str(gw_port), "--upstream-url", f"http://127.0.0.1:{sim_port}"],
            env, f"http://127.0.0.1:{gw_port}/ready", work / "gateway.log",
        ) as gateway,
    ):  # fmt: skip
        direct, through = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
        pid = gateway.pid
        results["rss_idle_mib"] = round(rss_mib(pid), 1)
        for concurrency in (1, 64):
            for name, url, credential in (("direct", direct, ""), ("bastion", through, key)):
                say(f"non-streaming c={concurrency} {name}")
                cpu = cpu_seconds(pid)
                with Sampler(pid) as sampler:
                    row = wrk(url, credential, concurrency, seconds, work)
                if name == "bastion":
                    row["cpu_us_per_request"] = round((cpu_seconds(pid) - cpu) / max(1, row["requests"]) * 1e6, 1)
                    results["rss_load_mib"] = max(results.get("rss_load_mib", 0), round(sampler.peak, 1))
                results[f"plain_c{concurrency}_{name}"] = row
        for concurrency, count in zip((1, 16), streams, strict=True):
            for name, url, credential in (("direct", direct, ""), ("bastion", through, key)):
                say(f"streaming 64 chunks c={concurrency} {name}")
                cpu = cpu_seconds(pid)
                with Sampler(pid) as sampler:
                    # c=1 latency depends on how 3 processes share 2 cores: three rounds, the median one kept.
                    rounds = [
                        stream_load(url, credential, concurrency, count) for _ in range(3 if concurrency == 1 else 1)
                    ]
                row = sorted(rounds, key=lambda r: r["ttft_p50_ms"])[len(rounds) // 2]
                row["ttft_p50_rounds_ms"] = [r["ttft_p50_ms"] for r in rounds]
                if name == "bastion":
                    chunks = sum(r["requests"] for r in rounds) * 64
                    row["cpu_us_per_chunk"] = round((cpu_seconds(pid) - cpu) / max(1, chunks) * 1e6, 2)
                    results["rss_load_mib"] = max(results.get("rss_load_mib", 0), round(sampler.peak, 1))
                results[f"stream_c{concurrency}_{name}"] = row
    with (
        process(
            [*sim, "--itl", "0.01", "--port", str(sim_slow_port)], base_env,
            f"http://127.0.0.1:{sim_slow_port}/health", work / "sim-slow.log",
        ),
        process(
            [python, "-m", "bastion", "serve", "--port", str(gw_port), "--upstream-url",
             f"http://127.0.0.1:{sim_slow_port}"],
            env, f"http://127.0.0.1:{gw_port}/ready", work / "gateway-slow.log",
        ),
    ):  # fmt: skip
        say("chunk timing at 10 ms inter-token gaps")
        for name, url, credential in (
            ("direct", f"http://127.0.0.1:{sim_slow_port}", ""),
            ("bastion", f"http://127.0.0.1:{gw_port}", key),
        ):
            results[f"timing_{name}"] = stream_load(url, credential, 4, 8 if args.quick else 40)
    shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: dict[str, Any]) -> str:
    def row(metric: str, direct: Any, through: Any, target: str = "") -> str:
        return f"| {metric} | {direct} | {through} | {target} |"

    r = results
    lines = [
        "| metric | direct | through bastion | target |",
        "|---|---|---|---|",
        row("non-stream c=1 p50 (ms)", r["plain_c1_direct"]["p50_ms"], round(r["plain_c1_bastion"]["p50_ms"], 3),
            f"≤ +0.35 ms (added {r['plain_c1_bastion']['p50_ms'] - r['plain_c1_direct']['p50_ms']:.3f})"),
        row("non-stream c=64 RPS", r["plain_c64_direct"]["rps"], r["plain_c64_bastion"]["rps"], "≥ 4,000"),
        row("non-stream c=64 p99 (ms)", r["plain_c64_direct"]["p99_ms"], r["plain_c64_bastion"]["p99_ms"], ""),
        row("CPU per request (µs)", "–", r["plain_c64_bastion"]["cpu_us_per_request"], "≤ 250"),
        row("stream c=16 streams/s", r["stream_c16_direct"]["requests_per_s"],
            r["stream_c16_bastion"]["requests_per_s"], "≥ 1,400"),
        row("CPU per chunk (µs)", "–", r["stream_c16_bastion"]["cpu_us_per_chunk"], "≤ 10"),
        row("stream TTFT c=1 p50 (ms)", r["stream_c1_direct"]["ttft_p50_ms"], r["stream_c1_bastion"]["ttft_p50_ms"],
            f"≤ +0.7 ms (added {r['stream_c1_bastion']['ttft_p50_ms'] - r['stream_c1_direct']['ttft_p50_ms']:.2f})"),
        row("stream TTFT c=16 p99 (ms)", r["stream_c16_direct"]["ttft_p99_ms"], r["stream_c16_bastion"]["ttft_p99_ms"]),
        row("coalesced chunks at 10 ms gaps", r["timing_direct"]["coalesced_chunks"],
            r["timing_bastion"]["coalesced_chunks"], "0"),
        row("RSS idle / under load (MiB)", "–", f"{r['rss_idle_mib']} / {r['rss_load_mib']}", "≤ 150 under load"),
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the harness)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is missing (apt-get install wrk)")
    results = measure(args)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("bastion", "uvicorn", "httptools", "uvloop", "httpx", "fastapi")},
        "quick": args.quick,
    }
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / "results.md").write_text(f"# bastion benchmark, {meta['date']}\n\n{meta}\n\n{text}\n")
    say(f"written to {args.out}/results.md and results.json")


if __name__ == "__main__":
    main()
