"""End to end: bastion supervising real vLLM, proven and measured in one run.

On the GPU machine (after `source .gpu/pN/device_setup.sh`, see ../shared/gpu/README.md):

    python3 bench/gpu_e2e.py --out "$OUT"

Here, without a GPU, the same steps run against the simulator (to check the script):

    python bench/gpu_e2e.py --simulate --out /tmp/e2e

Steps: start `bastion serve` with its default vLLM command; wait for ready (progress
shown); check the openai SDK and curl, streaming and not, a wrong key, /metrics and
vLLM's own series through /metrics/upstream, the audit log, and that the internal key
is in no argv; measure direct vs through bastion (c=1, 64, 256 and 512, 64 tokens, alternating,
the gateway's CPU per chunk; `--seconds` for measured windows read by the engine's own counters,
`--max-tokens 64,32-96` for identical and drawn lengths, `--targets direct` for vLLM alone, `--paired` for
both paths at once, half the streams each, in one window: the engine's own swings between rounds, far more
than the few % asked about, then reach both alike); check that a
client disconnect aborts generation in vLLM; kill vLLM's engine and time the recovery;
SIGTERM bastion during a stream and check it drains and leaves no vLLM process or GPU
memory behind. Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
from harness import series_sums

HERE = Path(__file__).resolve().parent
MODEL = "qwen2.5-7b-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}


def say(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the overhead step measures."""

    concurrency: list[int]
    rounds: int
    seconds: float
    warmup: float
    max_tokens: list[str]  # one step per spec and concurrency: "64", "32-96"
    targets: list[str]
    procs: int  # load processes per round (with a window)
    paired: bool  # direct and bastion at once, half the streams each, in one window
    control: bool = False  # with paired: after each round, one whose two halves both go direct


class Run:
    def __init__(self, out: Path, simulate: bool, port: int, plan: Plan, engine_args: str) -> None:
        self.out = out
        self.simulate = simulate
        self.plan = plan
        self.engine_args = engine_args
        self.results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "simulated": simulate}
        self.work = Path(tempfile.mkdtemp(prefix="bastion-e2e-"))
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.env = self._env()
        self.key = ""
        self.proc: subprocess.Popen[bytes] | None = None

    # --- set-up ----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        if "APP_PYTHONPATH" in os.environ:  # the GPU recipe: bastion's own packages only, not vLLM's
            env["PYTHONPATH"] = os.environ["APP_PYTHONPATH"]
        env["BASTION_KEYS_FILE"] = str(self.work / "keys.json")
        env["BASTION_METRICS_TOKEN"] = "e2e-metrics-token-0123456789"
        env["BASTION_AUDIT_LOG"] = str(self.work / "audit.jsonl")
        env["BASTION_STARTUP_TIMEOUT"] = "900"
        env["BASTION_ALLOW_IPS"] = "127.0.0.0/8"
        env["BASTION_RATE_LIMIT_RPM"] = "1000000"
        env["BASTION_RATE_LIMIT_TPM"] = "1000000000"
        env["BASTION_RATE_LIMIT_MAX_CONCURRENT"] = "1000"
        if self.simulate:
            env["BASTION_UPSTREAM_COMMAND"] = (
                "{python} -m bastion simulate --host {host} --port {port} --tokens 64 --itl 0.005"
            )
        else:
            env["BASTION_MODEL"] = os.environ["QWEN_DIR"]
            env["BASTION_SERVED_MODEL_NAME"] = MODEL
            env["BASTION_MAX_MODEL_LEN"] = "4096"
            env["BASTION_VLLM_EXTRA_ARGS"] = f"--load-format dummy {self.engine_args}".strip()
            env["BASTION_VLLM_PYTHON"] = "python3"
            env["BASTION_UPSTREAM_ENV"] = json.dumps({"PYTHONPATH": os.environ["VLLM_PYTHONPATH"]})
        return env

    def bastion(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "bastion", *args], env=self.env, capture_output=True, text=True, check=True
        ).stdout.strip()

    def start(self) -> None:
        self.key = self.bastion("keys", "create", "--name", "gpu-e2e")
        log = (self.out / "bastion.log").open("wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "--port", str(self.port)], env=self.env, stdout=log, stderr=log
        )
        say(f"bastion serve started (pid {self.proc.pid}); waiting for the model")
        self.results["cold_start_s"] = round(self.wait_ready(started, 900), 1)
        say(f"ready after {self.results['cold_start_s']} s")

    def wait_ready(self, started: float, timeout: float) -> float:
        next_note = started + 15
        while time.monotonic() - started < timeout:
            assert self.proc is not None and self.proc.poll() is None, "bastion exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() > next_note:
                say(f"still loading: {time.monotonic() - started:.0f} s")
                next_note += 15
            time.sleep(0.5)
        raise TimeoutError("bastion not ready")

    def log_text(self) -> str:
        return (self.out / "bastion.log").read_text(errors="replace")

    def child_pid(self) -> int:
        return int(re.findall(r"upstream pid=(\d+) started", self.log_text())[-1])

    def internal(self) -> tuple[str, str]:
        """The child's URL and key, read as root from /proc: for the direct baseline only."""
        pid = self.child_pid()
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
        )
        cmd = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        port = cmd[cmd.index("--port") + 1]
        return f"http://127.0.0.1:{port}", environ["VLLM_API_KEY"]

    # --- checks ------------------------------------------------------------------------

    def functional(self) -> None:
        checks: dict[str, Any] = {}
        client = openai.OpenAI(base_url=self.base + "/v1", api_key=self.key, max_retries=0)
        reply = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        checks["sdk_non_stream_tokens"] = reply.usage.completion_tokens if reply.usage else None
        chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
        checks["sdk_stream_chunks"] = len(chunks)
        checks["sdk_stream_usage_hidden"] = all(c.usage is None for c in chunks)
        curl = subprocess.run(
            ["curl", "-sN", self.base + "/v1/chat/completions", "-H", f"authorization: Bearer {self.key}",
             "-H", "content-type: application/json", "-d", json.dumps({**CHAT, "stream": True})],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        checks["curl_stream_done"] = curl.stdout.rstrip().endswith("data: [DONE]")
        try:
            openai.OpenAI(base_url=self.base + "/v1", api_key="bst-wrong", max_retries=0).models.list()
            checks["wrong_key"] = "accepted?!"
        except openai.AuthenticationError:
            checks["wrong_key"] = "401"
        auth = {"authorization": "Bearer " + self.env["BASTION_METRICS_TOKEN"]}
        checks["metrics_unauthenticated"] = httpx.get(self.base + "/metrics").status_code
        metrics = httpx.get(self.base + "/metrics", headers=auth).text
        checks["metrics_has_requests"] = "bastion_requests_total" in metrics
        upstream_metrics = httpx.get(self.base + "/metrics/upstream", headers=auth).text
        # A metric name is [a-zA-Z_:][a-zA-Z0-9_:]* (vllm:e2e_request_latency_seconds has digits).
        checks["vllm_series_through_gateway"] = sorted(
            {m for m in re.findall(r"^(vllm:[a-zA-Z0-9_:]+)", upstream_metrics, re.M)}
        )[:8]
        audit = Path(self.env["BASTION_AUDIT_LOG"])
        lines = audit.read_text().splitlines() if audit.exists() else []
        checks["audit_lines"] = len(lines)
        checks["audit_example"] = json.loads(lines[-1]) if lines else None
        _, internal_key = self.internal()
        leaks = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                if internal_key.encode() in cmdline.read_bytes() or self.key.encode() in cmdline.read_bytes():
                    leaks.append(cmdline.parent.name)
        checks["key_in_any_argv"] = leaks
        checks["key_in_log"] = internal_key in self.log_text() or self.key in self.log_text()
        self.results["functional"] = checks
        say(f"functional: {json.dumps(checks)[:400]}")

    def load(
        self, url: str, key: str, concurrency: int, requests: int, max_tokens: str, cpu_pid: int | None
    ) -> dict[str, Any]:
        """One round of bench/load.py: `requests` of them, or a `--seconds` window; the engine's counters and the
        gateway's CPU (`cpu_pid`) over it."""
        return self.finish(self.start_load(url, key, concurrency, requests, max_tokens, cpu_pid, procs=self.plan.procs))

    def start_load(
        self, url: str, key: str, concurrency: int, requests: int, max_tokens: str, cpu_pid: int | None, *,
        procs: int, at: float = 0.0,
    ) -> subprocess.Popen[str]:  # fmt: skip
        """bench/load.py started; `at`: the wall-clock moment its window opens (shared with another load)."""
        plan = self.plan
        bound = ["--seconds", str(plan.seconds), "--warmup-seconds", str(plan.warmup)] if plan.seconds else []
        if cpu_pid:
            bound += ["--cpu-pid", str(cpu_pid)]
        if plan.seconds and procs > 1:
            bound += ["--procs", str(min(procs, concurrency))]
        if at:
            bound += ["--at", str(at)]
        engine_url, engine_key = self.internal()
        return subprocess.Popen(
            [sys.executable, str(HERE / "load.py"), "--url", url, "-c", str(concurrency), "-n", str(requests),
             "--max-tokens", max_tokens, "--warmup", "3", *bound, "--metrics-url", engine_url],
            env={**self.env, "BENCH_KEY": key, "BENCH_METRICS_KEY": engine_key},
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    @staticmethod
    def finish(load: subprocess.Popen[str]) -> dict[str, Any]:
        out, _ = load.communicate()
        if load.returncode:
            raise subprocess.CalledProcessError(load.returncode, load.args, out)
        return json.loads(out)  # type: ignore[no-any-return]

    def paired(self, concurrency: int, max_tokens: str, control: bool = False) -> dict[str, dict[str, Any]]:
        """Direct and bastion at once on one engine, half the streams each, the same drawn lengths, one window.

        The engine's batch is shared, so its own swings (±10-20 % between rounds of the same load) reach both
        halves alike: what differs between them is the path. Each half's requests/s and tokens/s are its own.
        `control`: both halves direct ("control" is the second), so the ratio's spread with no gateway at all
        is measured under the same load: what a paired ratio can tell apart."""
        direct_url, internal_key = self.internal()
        # both started (a few seconds for vLLM's tokenizer-bound first requests; the simulator needs less),
        # warmed up (3 requests one by one), loaded
        at = time.time() + (3.0 if self.simulate else 8.0) + self.plan.warmup
        half = concurrency // 2
        procs = max(1, self.plan.procs // 2)
        gateway_pid = self.proc.pid if self.proc else None
        second = (direct_url, internal_key, None) if control else (self.base, self.key, gateway_pid)
        loads = {
            "direct": self.start_load(direct_url, internal_key, half, 0, max_tokens, None, procs=procs, at=at),
            "control" if control else "bastion": self.start_load(*second[:2], half, 0, max_tokens, second[2],
                                                                  procs=procs, at=at),
        }  # fmt: skip
        return {name: self.finish(load) for name, load in loads.items()}

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the engine runs and queues nothing: a cut round's streams are still being aborted."""
        url, key = self.internal()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            page = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {key}"}, timeout=10).text
            if not any(series_sums(page, ("vllm:num_requests_running", "vllm:num_requests_waiting")).values()):
                return
            time.sleep(0.2)
        say("the engine is still busy after the last round")

    def overhead(self) -> None:
        """Direct vs through bastion at each concurrency, alternated (vLLM's own throughput drifts a few %)."""
        direct_url, internal_key = self.internal()
        plan = self.plan
        table: dict[str, dict[str, Any]] = {}
        self.results["plan"] = dataclasses.asdict(plan)
        self.results["overhead"] = table
        pid = self.proc.pid if self.proc is not None else None
        targets = [(n, u, k) for n, u, k in (("direct", direct_url, internal_key), ("bastion", self.base, self.key))
                   if n in plan.targets]  # fmt: skip
        several = len(plan.max_tokens) > 1  # then a step's name says its lengths
        steps = [(c, t, f"c{c}" + (f"_t{t}" if several else "")) for t in plan.max_tokens for c in plan.concurrency]
        for concurrency, max_tokens, step in steps:
            # Without a window: c=1 60 requests once; higher, four waves of requests per connection, twice.
            requests = 60 if concurrency == 1 else concurrency * (2 if self.simulate else 4)
            rounds = plan.rounds or (1 if concurrency == 1 else 2)
            for round_ in range(1, rounds + 1):
                for name, result in self.measure_round(targets, pid, concurrency, requests, max_tokens):
                    table[f"{name}_{step}" + (f"_round{round_}" if round_ > 1 else "")] = result
                    say(f"{name}{' (paired)' if plan.paired else ''} {step} round {round_}: {result}")
                    self.write()  # what a cut run (a device's time limit) has measured so far is kept
        if {"direct", "bastion"} - set(plan.targets):
            return
        for _, _, step in steps:
            suffixes = [f"_round{r}" if r > 1 else "" for r in range(1, (plan.rounds or 2) + 1)]
            pairs = [(f"direct_{step}{r}", f"bastion_{step}{r}") for r in suffixes]
            pairs = [(a, b) for a, b in pairs if a in table and b in table]
            for measure in ("tokens_per_s", "requests_per_s"):
                ratios = [table[b][measure] / table[a][measure] for a, b in pairs]
                self.results[f"{measure}_ratio_{step}_rounds"] = [round(r, 4) for r in ratios]
                self.results[f"{measure}_ratio_{step}"] = round(sum(ratios) / len(ratios), 4)
            controls = [(f"direct_a_{step}{r}", f"control_{step}{r}") for r in suffixes]
            for measure in ("tokens_per_s", "requests_per_s") if plan.control else ():
                ratios = [table[b][measure] / table[a][measure] for a, b in controls if a in table and b in table]
                self.results[f"{measure}_control_ratio_{step}_rounds"] = [round(r, 4) for r in ratios]
            added = [table[b]["ttft_p50_ms"] - table[a]["ttft_p50_ms"] for a, b in pairs]
            self.results[f"ttft_p50_added_ms_{step}_rounds"] = [round(a, 2) for a in added]
            self.results[f"cpu_us_per_chunk_{step}_rounds"] = [table[b].get("cpu_us_per_chunk") for _, b in pairs]

    def measure_round(
        self, targets: list[tuple[str, str, str]], pid: int | None, concurrency: int, requests: int, max_tokens: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """One round's results by target, each as it is measured: the targets one after the other, or paired."""
        if self.plan.paired:
            self.wait_idle()
            yield from self.paired(concurrency, max_tokens).items()
            if self.plan.control:
                self.wait_idle()
                for name, result in self.paired(concurrency, max_tokens, control=True).items():
                    yield f"{name}_a" if name == "direct" else name, result
            return
        for name, url, key in targets:
            self.wait_idle()
            yield name, self.load(url, key, concurrency, requests, max_tokens, pid if name == "bastion" else None)

    def running_in_vllm(self) -> float:
        text = httpx.get(
            self.base + "/metrics/upstream",
            headers={"authorization": "Bearer " + self.env["BASTION_METRICS_TOKEN"]},
        ).text
        values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)", text, re.M)
        return sum(float(v) for v in values)

    def disconnect(self) -> None:
        body = {**CHAT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        headers = {"authorization": f"Bearer {self.key}"}
        with httpx.stream("POST", self.base + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            chunks = r.iter_raw()
            for _ in range(5):
                next(chunks)
            during = self.running_in_vllm()
        closed = time.monotonic()
        while self.running_in_vllm() > 0 and time.monotonic() - closed < 10:
            time.sleep(0.05)
        self.results["disconnect"] = {
            "running_while_streaming": during,
            "running_after": self.running_in_vllm(),
            "seconds_to_abort": round(time.monotonic() - closed, 2),
            "abort_logged": "abort" in self.log_text().lower(),
        }
        say(f"disconnect: {self.results['disconnect']}")

    def kill_engine(self) -> None:
        child = self.child_pid()
        below = _descendants(child)
        engines = [pid for pid in below if b"EngineCore" in _cmdline(pid)] or [
            pid for pid in _gpu_pids() if pid in below
        ]
        victim = engines[0] if engines else child
        say(f"killing {'vLLM engine core' if engines else 'the child'} pid {victim} (child {child})")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        statuses = set()
        while time.monotonic() - killed < 420:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.post(
                    self.base + "/v1/chat/completions", json=CHAT,
                    headers={"authorization": f"Bearer {self.key}"}, timeout=30,
                ).status_code  # fmt: skip
                statuses.add(status)
                if status == 200 and self.child_pid() != child:
                    break
            time.sleep(0.5)
        ready = httpx.get(self.base + "/ready").json()
        self.results["engine_kill"] = {
            "statuses_seen": sorted(statuses),
            "seconds_to_serving_again": round(time.monotonic() - killed, 1),
            "restarts": ready.get("restarts"),
        }
        say(f"engine kill: {self.results['engine_kill']}")

    def sigterm_drain(self) -> None:
        assert self.proc is not None
        body = {**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        headers = {"authorization": f"Bearer {self.key}"}
        result: dict[str, Any] = {}

        def stream() -> None:
            with httpx.stream("POST", self.base + "/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
                data = b"".join(r.iter_raw())
            result["stream_completed"] = data.rstrip().endswith(b"data: [DONE]")

        child = self.child_pid()
        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        code = self.proc.wait(120)
        time.sleep(1)
        result["bastion_exit_code"] = code
        result["vllm_processes_left"] = _pgrep("vllm.entrypoints") + _pgrep("EngineCore")
        result["child_alive"] = Path(f"/proc/{child}").exists()
        if shutil.which("nvidia-smi"):
            result["gpu_memory_used_mib"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
        self.results["sigterm"] = result
        say(f"sigterm: {result}")

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _gpu_pids() -> list[int]:
    """Processes holding the GPU (vLLM's engine core, not its API server)."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _pgrep(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def main() -> None:
    parser = argparse.ArgumentParser(description="bastion + vLLM end to end (see module docstring)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bastion-e2e")))
    parser.add_argument("--simulate", action="store_true", help="use the simulator instead of vLLM (no GPU)")
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port")
    parser.add_argument(
        "--skip", default="", help="comma-separated steps to skip: functional,overhead,disconnect,kill,drain"
    )
    measure = parser.add_argument_group("the overhead step (direct vs through bastion)")
    measure.add_argument("--concurrency", default="1,64,256,512", help="streams at once, one step each")
    measure.add_argument("--rounds", type=int, default=0, help="alternated pairs per step (default: 1 at c=1, else 2)")
    measure.add_argument("--seconds", type=float, default=0.0, help="a measured window per round (default: 4 waves)")
    measure.add_argument("--warmup", type=float, default=5.0, help="seconds of load before each window")
    measure.add_argument(
        "--max-tokens", default="64", help="per request, or a range drawn from (32-96); several: a step each (64,32-96)"
    )
    measure.add_argument("--targets", default="direct,bastion", help="which of the two to measure")
    measure.add_argument(
        "--load-procs", type=int, default=1, help="load processes per windowed round (one is near a core at c=512)"
    )
    measure.add_argument(
        "--paired", action="store_true",
        help="each round: direct and bastion at once, half the streams each, in one window (needs --seconds)",
    )  # fmt: skip
    measure.add_argument(
        "--control", action="store_true",
        help="with --paired: after each round one more whose two halves both go direct (the ratio's own spread)",
    )  # fmt: skip
    measure.add_argument("--engine-args", default="", help="more vLLM arguments, e.g. '--max-num-seqs 64'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plan = Plan(
        concurrency=[int(c) for c in args.concurrency.split(",")], rounds=args.rounds, seconds=args.seconds,
        warmup=args.warmup, max_tokens=args.max_tokens.split(","), targets=args.targets.split(","),
        procs=args.load_procs, paired=args.paired, control=args.control,
    )  # fmt: skip
    if args.control and not args.paired:
        parser.error("--control needs --paired")
    if args.paired and not args.seconds:
        parser.error("--paired needs --seconds (the two halves share a measured window)")
    run = Run(args.out, args.simulate, args.port, plan, args.engine_args)
    skip = set(filter(None, args.skip.split(",")))
    try:
        run.start()
        if "functional" not in skip:
            run.functional()
        if "overhead" not in skip:
            run.overhead()
        if "disconnect" not in skip:
            run.disconnect()
        if "kill" not in skip:
            run.kill_engine()
        if "drain" not in skip:
            run.sigterm_drain()
    finally:
        run.write()
        say(f"results in {run.out}/results.json")
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()


if __name__ == "__main__":
    main()
