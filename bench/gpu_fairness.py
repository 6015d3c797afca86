"""Tenants sharing a saturated GPU (issue 20), measured on real vLLM; `--simulate` runs it here.

On the GPU machine (after `source .gpu/pN/device_setup.sh`, see ../shared/gpu/README.md):

    python3 bench/gpu_fairness.py --out "$OUT" --configs "reserve=2;reserve=2,backlog=64,lead=0.1;backlog=8,lead=0"

One vLLM (`--max-num-seqs 64 --scheduling-policy priority`, Qwen2.5-7B geometry, dummy weights) is
started once, by this script. In front of it, in external mode: one plain bastion gateway (no
classes) and one gateway with priority classes and the fair queue per gate configuration
(`--configs`: `;` between configurations, `,` between `key=value`: capacity (default 64), reserve,
backlog, lead (seconds), threshold; each its own process). Then: an interactive key at c=2 (16 tokens, streamed:
TTFT) alone, one short step; then per round, in alternated order, a batch key at c=256 (256
tokens each, or drawn from --batch-tokens LOW-HIGH) alone through the plain gateway (the engine's
batch tokens/s) and, through each configuration, both together (interactive TTFT p50 beside the
flood, batch tokens/s). Targets: TTFT within 2x idle, batch tokens/s >= 95 % of the flood alone.
Batch tokens/s is the engine's own counter (vllm:generation_tokens_total) over the window less the
interactive key's tokens: the tokens of requests that completed in the window (also recorded) swing
by a whole wave of 256-token requests. The engine's running/waiting gauges are sampled every 0.2 s.
results.json is rewritten after each step, with each configuration's share and TTFT ratio per round;
progress goes to stderr.
Budget: vLLM starts in ~220 s; the defaults (3 configurations, 2 rounds, 5 s warm-up + 20 s
windows) measure for ~230 s more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from harness import free_port, series_sums

MODEL = "qwen2.5-7b-instruct"
SEQS = 64
CHAT_TOKENS = 16
STEPS = "vllm:iteration_tokens_total_count"  # one observation per engine step (absent from the simulator)
PREEMPTIONS = "vllm:num_preemptions_total"
ENGINE_SERIES = (
    "vllm:generation_tokens_total",
    STEPS,
    PREEMPTIONS,
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)
DEFAULT_CONFIGS = "reserve=2;reserve=2,backlog=64,lead=0.15;reserve=2,backlog=64,lead=0.3"
_KNOBS = {
    "capacity": "BASTION_ENGINE_CAPACITY",
    "reserve": "BASTION_ENGINE_RESERVE",
    "backlog": "BASTION_ENGINE_BACKLOG",
    "lead": "BASTION_ENGINE_BACKLOG_LEAD",
    "threshold": "BASTION_ENGINE_WAITING_THRESHOLD",
}


def say(message: str) -> None:
    print(f"[fairness {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def engine_series(client: httpx.AsyncClient, engine: str) -> dict[str, float]:
    """The engine's counters and gauges this driver reads, each summed over its label sets."""
    return series_sums((await client.get(engine + "/metrics", timeout=5)).text, ENGINE_SERIES)


def parse_configs(text: str) -> dict[str, dict[str, float]]:
    """`reserve=2;reserve=2,backlog=64,lead=0.1` -> {name: knobs}; the name is the text of the configuration."""
    configs: dict[str, dict[str, float]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        knobs: dict[str, float] = {"capacity": SEQS}
        for item in part.split(","):
            key, sep, value = item.strip().partition("=")
            try:
                number = float(value) if key == "lead" else int(value)
            except ValueError:
                number = -1
            if not sep or key not in _KNOBS or number < 0:
                raise SystemExit(f"--configs: {item!r} is not one of {', '.join(k + '=N' for k in _KNOBS)}")
            knobs[key] = number
        configs[part] = knobs
    if not configs:
        raise SystemExit("--configs: no configuration given")
    return configs


class Bench:
    def __init__(
        self,
        out: Path,
        simulate: bool,
        window: float,
        warmup: float,
        idle: float,
        configs: dict[str, dict[str, float]],
        batch_tokens: tuple[int, int],
    ) -> None:
        self.out = out
        self.batch_tokens = batch_tokens
        self.simulate = simulate
        self.window = window
        self.warmup = warmup
        self.idle = idle
        self.configs = configs
        self.work = Path(tempfile.mkdtemp(prefix="bastion-fair-"))
        self.results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "simulated": simulate,
            "window_s": window,
            "warmup_s": warmup,
            "batch_tokens": list(batch_tokens),
            "configs": configs,
            "rounds": [],
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.keys: dict[str, str] = {}
        self.engine = ""

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")

    def spawn(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        handle = (self.out / log).open("wb")
        proc = subprocess.Popen(argv, env=env, stdout=handle, stderr=handle, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def wait(self, url: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
        started = time.monotonic()
        note = started + 15
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() > note:
                say(f"waiting for {url}: {time.monotonic() - started:.0f} s")
                note += 15
            time.sleep(0.2)
        raise TimeoutError(url)

    def start_engine(self) -> None:
        port = free_port()
        self.engine = f"http://127.0.0.1:{port}"
        if self.simulate:  # a GPU-like engine (a step time that grows a little with the batch), slowed for 2 cores
            argv = [sys.executable, "-m", "bastion", "simulate", "--port", str(port), "--max-num-seqs", str(SEQS)]
            argv += ["--scheduling-policy", "priority", "--tokens", "32", "--ttft", "0.02"]
            argv += ["--itl", "0.05", "--itl-per-seq", "0.0002", "--admission-delay", "0.02"]
            env = dict(os.environ)
        else:
            argv = ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", os.environ["QWEN_DIR"]]
            argv += ["--load-format", "dummy", "--served-model-name", MODEL, "--max-model-len", "4096"]
            argv += ["--port", str(port), "--max-num-seqs", str(SEQS), "--scheduling-policy", "priority"]
            env = {**os.environ, "PYTHONPATH": os.environ["VLLM_PYTHONPATH"]}
        proc = self.spawn(argv, env, "engine.log")
        say(f"engine starting (pid {proc.pid})")
        self.results["engine_start_s"] = round(self.wait(self.engine + "/health", proc, 900), 1)
        say(f"engine ready after {self.results['engine_start_s']} s")

    def env(self, name: str, knobs: dict[str, float] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        if "APP_PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["APP_PYTHONPATH"]
        env |= {
            "BASTION_UPSTREAM_URL": self.engine,
            "BASTION_KEYS_FILE": str(self.work / "keys.json"),
            "BASTION_AUDIT_LOG": "off",
            "BASTION_RATE_LIMIT_RPM": "0",
            "BASTION_RATE_LIMIT_TPM": "0",
            "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0",
            "BASTION_LOG_LEVEL": "warning",
            "BASTION_BUDGET_DB": str(self.work / f"usage-{name}.sqlite3"),  # one per process
        }
        if knobs is not None:
            env["BASTION_FAIRNESS"] = "1"
            env |= {_KNOBS[key]: str(value) for key, value in knobs.items()}
        return env

    def start_gateways(self) -> dict[str, str]:
        """The plain gateway ("plain") and one per configuration, started together."""
        for name, cls in (("chat", "interactive"), ("flood", "batch")):
            self.keys[name] = subprocess.run(
                [sys.executable, "-m", "bastion", "keys", "create", "--name", name, "--priority-class", cls],
                env=self.env("keys", None), capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
        bases: dict[str, str] = {}
        started = []
        for number, (name, knobs) in enumerate([("plain", None), *self.configs.items()]):
            port = free_port()
            label = "plain" if knobs is None else f"fair{number}"
            argv = [sys.executable, "-m", "bastion", "serve", "--port", str(port)]
            started.append((self.spawn(argv, self.env(label, knobs), f"bastion-{label}.log"), port))
            bases[name] = f"http://127.0.0.1:{port}"
        for proc, port in started:
            self.wait(f"http://127.0.0.1:{port}/ready", proc, 60)
        say(f"gateways ready: {', '.join(bases)}")
        return bases

    async def measure(self, base: str, *, interactive: bool, batch: bool, window: float) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        ttfts: list[float] = []
        statuses: dict[str, int] = {}
        tokens = chats_done = 0
        running: list[float] = []
        starts: list[float] = []  # when each measured interactive request was sent, from the window's start
        ends: list[float] = []  # when each counted batch request completed
        t0 = math.inf
        waiting: list[float] = []
        counting = False
        stop = time.monotonic() + (self.warmup if batch else 0.0) + window

        async def flood(client: httpx.AsyncClient, seed: int) -> None:
            nonlocal tokens
            lengths = random.Random(seed)
            body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Write."}]}
            body |= {"ignore_eos": True}
            headers = {"authorization": f"Bearer {self.keys['flood']}"}
            while time.monotonic() < stop:
                body["max_tokens"] = lengths.randint(*self.batch_tokens)
                response = await client.post(base + "/v1/chat/completions", json=body, headers=headers)
                statuses[f"batch {response.status_code}"] = statuses.get(f"batch {response.status_code}", 0) + 1
                if response.status_code == 200 and counting and time.monotonic() < stop:
                    tokens += response.json()["usage"]["completion_tokens"]
                    ends.append(round(time.monotonic() - t0, 4))

        async def sample_engine(client: httpx.AsyncClient) -> None:
            """The engine's own gauges while the window runs: how full its batch was and how much waited in it."""
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    page = await engine_series(client, self.engine)
                    running.append(page["vllm:num_requests_running"])
                    waiting.append(page["vllm:num_requests_waiting"])
                await asyncio.sleep(0.2)

        async def chat(client: httpx.AsyncClient) -> None:
            nonlocal chats_done
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": CHAT_TOKENS}
            body |= {"stream": True, "ignore_eos": True}
            headers = {"authorization": f"Bearer {self.keys['chat']}"}
            while time.monotonic() < stop:
                start = time.monotonic()
                async with client.stream("POST", base + "/v1/chat/completions", json=body, headers=headers) as r:
                    statuses[f"chat {r.status_code}"] = statuses.get(f"chat {r.status_code}", 0) + 1
                    first = True
                    async for _ in r.aiter_raw():
                        if first and r.status_code == 200:
                            if counting:
                                ttfts.append(time.monotonic() - start)
                                starts.append(round(start - t0, 4))
                            first = False
                if r.status_code == 200 and counting:
                    chats_done += 1

        # Two clients: the chat never waits behind the flood in the load generator's own pool.
        async with (
            httpx.AsyncClient(timeout=300, limits=limits) as client,
            httpx.AsyncClient(timeout=300) as chatter,
        ):
            tasks = [asyncio.create_task(flood(client, seed)) for seed in range(256 if batch else 0)]
            if batch:
                await asyncio.sleep(self.warmup)  # the engine fills; the gateway's queue forms
            before = await engine_series(chatter, self.engine)
            counting, t0 = True, time.monotonic()
            tasks += [asyncio.create_task(chat(chatter)) for _ in range(2 if interactive else 0)]
            tasks.append(asyncio.create_task(sample_engine(chatter)))
            await asyncio.sleep(max(0.0, stop - time.monotonic()))
            after = await engine_series(chatter, self.engine)
            elapsed = time.monotonic() - t0
            counting = False
            for task in tasks:
                task.cancel()
            failures = [r for r in await asyncio.gather(*tasks, return_exceptions=True) if isinstance(r, Exception)]
        result: dict[str, Any] = {"statuses": statuses}
        if failures:
            result["client_errors"] = sorted(
                {repr(f)[:200] for f in failures if not isinstance(f, asyncio.CancelledError)}
            )
        if interactive:
            result["ttft_p50_ms"] = round(statistics.median(ttfts) * 1000, 1) if ttfts else None
            result["ttft_p90_ms"] = round(statistics.quantiles(ttfts, n=10)[-1] * 1000, 1) if len(ttfts) > 1 else None
            result["interactive_requests"] = len(ttfts)
            # For reading a TTFT against the batch's waves afterwards: (sent at, TTFT ms) and batch completions.
            sent = [[at, round(ttft * 1000, 1)] for at, ttft in zip(starts, ttfts, strict=True)]
            result["trace"] = {"chat": sent, "batch_ends": ends}
        if batch:
            # The engine's counter, less the interactive key's tokens: every token generated in the window. Tokens of
            # requests that completed in the window (the client's count) swing with where 256-token waves end.
            batch_tokens = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
            batch_tokens -= chats_done * CHAT_TOKENS
            result["batch_tokens_per_s"] = round(batch_tokens / elapsed, 1)
            result["batch_completed_tokens_per_s"] = round(tokens / elapsed, 1)
            result["engine_preemptions"] = after[PREEMPTIONS] - before[PREEMPTIONS]  # requests evicted to recompute
            if steps := after[STEPS] - before[STEPS]:
                # Per engine step: how many of the batch's slots produced a token, whatever the step's speed.
                result["engine_steps_per_s"] = round(steps / elapsed, 1)
                result["batch_tokens_per_step"] = round(batch_tokens / steps, 2)
        if running:
            result["engine_running_mean"] = round(statistics.fmean(running), 2)
            result["engine_running_min"] = min(running)
            result["engine_waiting_mean"] = round(statistics.fmean(waiting), 2)
        return result

    def run(self, rounds: int) -> None:
        self.start_engine()
        bases = self.start_gateways()
        first = next(iter(self.configs))
        say(f"interactive alone (c=2, 16 tokens, {self.idle:g} s, through {first!r})")
        self.results["idle"] = asyncio.run(self.measure(bases[first], interactive=True, batch=False, window=self.idle))
        say(f"idle: { {k: v for k, v in self.results['idle'].items() if k != 'trace'} }")
        self.write()
        idle = self.results["idle"]["ttft_p50_ms"]
        for number in range(rounds):
            steps = ["flood_alone", *self.configs]
            if number % 2:
                steps.reverse()
            entry: dict[str, Any] = {"configs": {}}
            self.results["rounds"].append(entry)
            for name in steps:
                alone = name == "flood_alone"
                result = asyncio.run(
                    self.measure(
                        bases["plain" if alone else name], interactive=not alone, batch=True, window=self.window
                    )
                )
                if alone:
                    entry["flood_alone"] = result
                else:
                    entry["configs"][name] = result
                say(f"round {number + 1}: {name}: { {k: v for k, v in result.items() if k != 'trace'} }")
                self.write()
            base_tps = entry["flood_alone"]["batch_tokens_per_s"]
            for name, result in entry["configs"].items():
                result["batch_share"] = round(result["batch_tokens_per_s"] / base_tps, 3) if base_tps else None
                if per_step := entry["flood_alone"].get("batch_tokens_per_step"):
                    result["batch_step_share"] = round(result["batch_tokens_per_step"] / per_step, 3)
                ttft = result.get("ttft_p50_ms")
                result["ttft_vs_idle"] = round(ttft / idle, 2) if idle and ttft else None
                share, ratio = result["batch_share"], result["ttft_vs_idle"]
                per_step = result.get("batch_step_share")
                say(f"round {number + 1}: {name}: batch {share} of alone ({per_step} per step), TTFT {ratio}x idle")
            self.write()
        self.results["summary"] = {
            name: {
                "batch_share": [r["configs"][name]["batch_share"] for r in self.results["rounds"]],
                "ttft_vs_idle": [r["configs"][name]["ttft_vs_idle"] for r in self.results["rounds"]],
                "batch_step_share": [r["configs"][name].get("batch_step_share") for r in self.results["rounds"]],
            }
            for name in self.configs
        }
        say(f"summary: {self.results['summary']}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="tenants sharing a saturated GPU (see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bastion-fairness")))
    parser.add_argument("--simulate", action="store_true", help="the simulator as the engine (no GPU)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="gate configurations, e.g. " + DEFAULT_CONFIGS)
    parser.add_argument(
        "--batch-tokens",
        default="256",
        help="the batch requests' max_tokens: N (every request alike: the flood runs in lockstep waves) or LOW-HIGH "
        "(each request's drawn uniformly, seeded: requests end spread out, as a real batch job's do)",
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per step")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of flood before measuring")
    parser.add_argument("--idle-window", type=float, default=8.0, help="seconds of the interactive-alone step")
    args = parser.parse_args()
    configs = parse_configs(args.configs)
    args.out.mkdir(parents=True, exist_ok=True)
    low, _, high = args.batch_tokens.partition("-")
    batch_tokens = (int(low), int(high or low))
    bench = Bench(args.out, args.simulate, args.window, args.warmup, args.idle_window, configs, batch_tokens)
    try:
        bench.run(args.rounds)
    finally:
        bench.write()
        bench.stop()


if __name__ == "__main__":
    main()
