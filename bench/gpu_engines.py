"""Two vLLM replicas (one per GPU) behind one bastion: scaling, a rolling restart and a kill, in one run.

On the 2-GPU machine (after `source .gpu/pN/device_setup.sh`, see ../shared/gpu/README.md):

    python3 bench/gpu_engines.py --out "$OUT"

Here, without a GPU, the same steps against two simulators (to check the script):

    python bench/gpu_engines.py --simulate --out /tmp/engines

Steps (results.json is rewritten after each one; progress on stderr, the load's every 10 s):
1. start `bastion serve` with BASTION_ENGINES = one model, 2 replicas, `gpus: [0, 1]` (CUDA_VISIBLE_DEVICES
   per child), both children started at once; wait for /ready (~210 s on an H200);
2. tokens/s at c=256 through bastion (2 replicas) vs straight to one replica (its port from bastion's log):
   target >= 1.9x; each measurement --seconds (25) or less if the budget needs it;
3. a rolling restart of replica 1 (`POST /admin/engines/restart?model=<model>/1`) under c=64 load: 0 failed
   requests; it takes a new child's start (about as long as step 1) plus the drain;
4. kill -9 of one replica's engine core (vLLM's EngineCore process; the simulator itself here) under c=64
   load for --kill-seconds (10): no request that had not started streaming fails (retried on the other replica).
The whole run fits --budget (560 s; a GPU host command is killed at 600 s): about 210 + 2x29 + 230 + 14 + 30 s
(stop) on the H200s; a step that would not fit is shortened (scaling) or skipped and said so in results.json.

The load comes from --load-procs (8) worker processes of this script, each a small asyncio-streams HTTP/1.1
client: one Python process cannot read ~20k SSE chunks/s. Each load result records the workers' own CPU
(`load_cpu_s`, `load_cpu_busiest_core`, `load_client_bound` when a worker used over 90 % of a core).
Each replica gets gpu_memory_utilization 0.45 so a restarted child fits beside the old one while it drains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

MODEL = "qwen2.5-7b-instruct"
ADMIN = "gpu-engines-admin-token-0123456789"
KEY = "bst-gpuengines_" + "k" * 40


def say(message: str) -> None:
    print(f"[engines {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the load generator: worker processes, each a light asyncio-streams client ------------------------

# The time budget (see Run.plan): a GPU host command is killed at 600 s; vLLM takes ~210 s to start.
STOP_RESERVE_S = 30.0  # SIGTERM to bastion, which stops both vLLM children (each takes seconds to exit)
RESTART_SLACK_S = 20.0  # a restart = a new child's start (about the first start) + drain + stop of the old one
LOAD_OVERHEAD_S = 4.0  # a load step's worker start-up and the tail of its last streams
MIN_SCALING_S = 10.0

# One stream of MAX_TOKENS tokens: the usage chunk (include_usage) says how many were generated.
MAX_TOKENS = 64
WORKER_PROGRESS_S = 2.0
REQUEST_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0


class Load:
    """`concurrency` streams spread over `procs` worker processes (this script with --load-worker).

    Measured against a simulator at c=64: httpx in one process spent 187 us of CPU per streamed token
    (0.93 of a core at 5k tokens/s), so ~20k tokens/s would need ~4 cores and cap the 2-replica number,
    not the engines; this client spends ~50 us per token, and 8 processes share that. The workers
    start, connect nothing, say ready; all start at once on "go" (their start-up is not measured), stop
    on "stop", finish the streams in flight and report counts and their own CPU time, so a client
    bottleneck shows in results.json.
    The API key goes to them on stdin, never in argv.
    """

    def __init__(self, url: str, headers: dict[str, str], concurrency: int, procs: int) -> None:
        self.url = url
        self.headers = headers
        self.concurrency = concurrency
        self.procs = max(1, min(procs, concurrency))
        self.workers: list[asyncio.subprocess.Process] = []
        self.progress: list[dict[str, float]] = []
        self._readers: list[asyncio.Future[dict[str, Any]]] = []
        self.began = 0.0

    async def start(self) -> None:
        shares = [self.concurrency // self.procs + (i < self.concurrency % self.procs) for i in range(self.procs)]
        for share in shares:
            worker = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--load-worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert worker.stdin is not None
            config = {"url": self.url, "headers": self.headers, "concurrency": share}
            worker.stdin.write(json.dumps(config).encode() + b"\n")
            self.workers.append(worker)
            self.progress.append({})
        for worker in self.workers:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), 60)
            if json.loads(line or b"{}").get("ready") is not True:
                raise SystemExit(f"a load worker did not start: {line!r}")

    async def go(self) -> None:
        for worker in self.workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
        self.began = time.monotonic()
        self._readers = [asyncio.ensure_future(self._read(i, w)) for i, w in enumerate(self.workers)]

    async def _read(self, index: int, worker: asyncio.subprocess.Process) -> dict[str, Any]:
        """The worker's progress lines until its result."""
        assert worker.stdout is not None
        while line := await worker.stdout.readline():
            message = json.loads(line)
            if "result" in message:
                return dict(message["result"])
            self.progress[index] = message["progress"]
        raise SystemExit(f"load worker {index} exited without a result (rc {await worker.wait()})")

    async def report(self, what: str) -> None:
        """A progress line every 10 s: requests, failures and tokens/s over the last 10 s."""
        last_tokens, last_time = 0.0, time.monotonic()
        while True:
            await asyncio.sleep(10)
            now = time.monotonic()
            tokens = sum(p.get("tokens", 0) for p in self.progress)
            requests = sum(p.get("requests", 0) for p in self.progress)
            failed = sum(p.get("failed", 0) for p in self.progress)
            rate = (tokens - last_tokens) / (now - last_time)
            say(f"  load {what}: {now - self.began:.0f}s, {requests:.0f} requests ({failed:.0f} failed), "
                f"{rate:,.0f} tok/s over the last {now - last_time:.0f}s")  # fmt: skip
            last_tokens, last_time = tokens, now

    async def stop(self) -> dict[str, Any]:
        for worker in self.workers:
            assert worker.stdin is not None
            worker.stdin.write(b"stop\n")
        parts = await asyncio.wait_for(asyncio.gather(*self._readers), REQUEST_TIMEOUT_S + 30)
        elapsed = time.monotonic() - self.began
        for worker in self.workers:
            await worker.wait()
        total = {key: sum(part[key] for part in parts) for key in ("requests", "ok", "failed", "failed_not_started",
                                                                   "failed_started", "tokens")}  # fmt: skip
        errors: dict[str, int] = {}
        for part in parts:
            for name, count in part["errors"].items():
                errors[name] = errors.get(name, 0) + count
        busiest = max(part["cpu_s"] / part["wall_s"] for part in parts if part["wall_s"] > 0)
        return {
            "concurrency": self.concurrency,
            "seconds": round(elapsed, 1),
            **{key: total[key] for key in ("requests", "ok", "failed", "failed_not_started", "failed_started")},
            "tokens_per_s": round(total["tokens"] / elapsed, 1),
            "errors": errors,
            # The load generator's own CPU: a worker near 1.0 core would be the bottleneck, not the engines.
            "load_procs": len(parts),
            "load_cpu_s": round(sum(part["cpu_s"] for part in parts), 2),
            "load_cpu_busiest_core": round(busiest, 3),
            "load_client_bound": busiest > 0.9,
        }

    def kill(self) -> None:
        for worker in self.workers:
            if worker.returncode is None:
                worker.kill()


def _request(url: str, headers: dict[str, str]) -> tuple[str, int, bytes]:
    """The host, port and bytes of one streaming chat request (the same bytes every time)."""
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    body = json.dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a story."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip
    lines = ["POST /v1/chat/completions HTTP/1.1", f"host: {host}:{port}", "content-type: application/json",
             f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Stream:
    """One keep-alive connection, one streamed request at a time: status, chunked body, usage."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def one(self) -> dict[str, Any]:
        started = False
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                if self.conn is None:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        self.conn = await asyncio.open_connection(self.host, self.port)
                reader, writer = self.conn
                writer.write(self.request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                fields = head.lower()
                parts: list[bytes] = []
                if b"transfer-encoding: chunked" in fields:
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        chunk = await reader.readexactly(size + 2)
                        started = started or (status == 200 and b"data:" in chunk)
                        parts.append(chunk[:-2])
                    await reader.readuntil(b"\r\n")  # the end of the chunked body (no trailers)
                elif b"content-length:" in fields:
                    length = int(fields.split(b"content-length:")[1].split(b"\r\n")[0])
                    parts.append(await reader.readexactly(length))
                else:
                    parts.append(await reader.read())
                    self.close()
                if b"connection: close" in fields:
                    self.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
            self.close()
            return {"status": 0, "started": started, "done": False, "tokens": 0, "error": type(exc).__name__}
        body = b"".join(parts)
        tokens = 0
        cut = False  # a stream ended by an error event (vLLM's, or bastion's when the engine broke) is not a success
        for line in body.splitlines():
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = usage.get("completion_tokens") or tokens
            elif line.startswith(b'data: {"error"'):
                cut = True
        result = {"status": status, "started": started, "done": b"[DONE]" in body and not cut, "tokens": tokens}
        if cut:
            result["error"] = "error event"
        return result

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


async def _worker() -> None:
    """--load-worker: config on stdin, then "go" and "stop"; progress and the result as JSON lines on stdout."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    config = json.loads(await stdin.readline())
    host, port, request = _request(config["url"], config["headers"])
    counts = {"requests": 0, "ok": 0, "failed": 0, "failed_not_started": 0, "failed_started": 0, "tokens": 0}
    errors: dict[str, int] = {}
    stop = asyncio.Event()

    def emit(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def stream() -> None:
        connection = _Stream(host, port, request)
        while not stop.is_set():
            result = await connection.one()
            counts["requests"] += 1
            if result["status"] == 200 and result["done"]:
                counts["ok"] += 1
                counts["tokens"] += result["tokens"]
            else:
                counts["failed"] += 1
                counts["failed_started" if result["started"] else "failed_not_started"] += 1
                error = result.get("error") or f"status {result['status']}"
                errors[error] = errors.get(error, 0) + 1
        connection.close()

    async def progress() -> None:
        while True:
            await asyncio.sleep(WORKER_PROGRESS_S)
            emit({"progress": counts})

    emit({"ready": True})
    await stdin.readline()  # go
    cpu0, began = time.process_time(), time.monotonic()
    streams = [asyncio.ensure_future(stream()) for _ in range(config["concurrency"])]
    ticker = asyncio.ensure_future(progress())
    await stdin.readline()  # stop (or the parent is gone)
    stop.set()
    await asyncio.gather(*streams)
    ticker.cancel()
    wall, cpu = time.monotonic() - began, time.process_time() - cpu0
    emit({"result": {**counts, "errors": errors, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}})


class Run:
    def __init__(self, out: Path, simulate: bool, port: int, options: argparse.Namespace) -> None:
        self.out = out
        self.simulate = simulate
        self.port = port
        self.seconds = options.seconds
        self.restart_seconds = options.restart_seconds
        self.kill_seconds = options.kill_seconds
        self.load_procs = options.load_procs
        self.began = time.monotonic()
        self.deadline = self.began + options.budget
        self.stop_reserve = 3.0 if simulate else STOP_RESERVE_S
        self.base = f"http://127.0.0.1:{port}"
        self.work = Path(tempfile.mkdtemp(prefix="bastion-engines-"))
        self.log = self.out / "bastion.log"
        self.results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "simulated": simulate,
            "model": MODEL,
            "budget_s": options.budget,
            "host_cpus": os.cpu_count(),
            "steps_s": {},
            "skipped": {},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def left(self) -> float:
        """Seconds left in the budget once the gateway and its children have been given time to stop."""
        return self.deadline - time.monotonic() - self.stop_reserve

    def step(self, name: str, began: float) -> None:
        self.results["steps_s"][name] = round(time.monotonic() - began, 1)
        say(f"{name} took {self.results['steps_s'][name]}s; {self.left():.0f}s of the budget left")
        self.write()

    def skip(self, name: str, reason: str) -> None:
        self.results["skipped"][name] = reason
        say(f"skipping {name}: {reason}")
        self.write()

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))

    # --- the gateway -----------------------------------------------------------------------

    def engines(self) -> list[dict[str, Any]]:
        if self.simulate:
            command = "{python} -m bastion simulate --host {host} --port {port} --tokens 64 --itl 0.01"
            command += f" --model {MODEL} --max-num-seqs 128"
            return [{"model": MODEL, "command": command, "replicas": 2}]
        vllm_env = {"PYTHONPATH": os.environ.get("VLLM_PYTHONPATH", "")}
        return [
            {
                "model": MODEL,
                "vllm_model": os.environ["QWEN_DIR"],
                "python": "python3",
                "extra_args": "--load-format dummy",
                "max_model_len": 4096,
                "gpu_memory_utilization": 0.45,
                "gpus": [0, 1],
                "replicas": 2,
                "env": vllm_env,
            }
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        if "APP_PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["APP_PYTHONPATH"]
        env.update(
            BASTION_ENGINES=json.dumps(self.engines()),
            BASTION_API_KEYS=KEY,
            BASTION_ADMIN_TOKEN=ADMIN,
            BASTION_AUDIT_LOG=str(self.work / "audit.jsonl"),
            BASTION_STARTUP_TIMEOUT="900",
            BASTION_DRAIN_TIMEOUT="60",
            BASTION_RATE_LIMIT_RPM="0",
            BASTION_RATE_LIMIT_TPM="0",
            BASTION_RATE_LIMIT_MAX_CONCURRENT="0",
            BASTION_UPSTREAM_MAX_CONNECTIONS="2048",
            BASTION_PORT=str(self.port),
        )
        return env

    def start(self) -> None:
        say(f"starting bastion with 2 replicas of {MODEL} (log: {self.log})")
        log = self.log.open("wb")
        python = "python3" if not self.simulate else sys.executable
        self.proc = subprocess.Popen(
            [python, "-m", "bastion", "serve"], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            cwd=self.work, start_new_session=True,
        )  # fmt: skip
        started = time.monotonic()
        next_note = started + 15
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"bastion exited ({self.proc.returncode}); see {self.log}")
            try:
                ready = httpx.get(self.base + "/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > next_note:
                say(f"waiting for both replicas: {time.monotonic() - started:.0f}s")
                next_note += 15
            if self.left() < 0:
                raise SystemExit(f"not ready after {time.monotonic() - started:.0f}s: the budget is spent")
            time.sleep(0.2 if self.simulate else 1)
        self.results["ready_s"] = round(time.monotonic() - started, 1)
        say(f"ready after {self.results['ready_s']}s")
        self.step("start", started)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def children(self) -> list[tuple[int, int]]:
        """(pid, port) of every child bastion started, in order, from its log."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if " started: " in line and "pid=" in line and "--port " in line:
                pid = int(line.split("pid=")[1].split()[0])
                port = int(line.split("--port ")[1].split()[0])
                found.append((pid, port))
        return found

    # --- load --------------------------------------------------------------------------------

    async def _load(
        self, url: str, headers: dict[str, str], concurrency: int, seconds: float, during: Any = None
    ) -> dict[str, Any]:
        """`concurrency` streams for `seconds` (and at least until `during()`, started 2 s in, returns),
        spread over `load_procs` worker processes so the client is never what limits tokens/s."""
        load = Load(url, headers, concurrency, self.load_procs)
        await load.start()
        ticker = asyncio.ensure_future(load.report(f"c={concurrency}"))
        try:
            await load.go()
            extra: Any = None
            if during is not None:
                await asyncio.sleep(min(2.0, seconds / 2))
                extra = await during()
            remaining = seconds - (time.monotonic() - load.began)
            if remaining > 0:
                await asyncio.sleep(remaining)
            result = await load.stop()
        finally:
            ticker.cancel()
            load.kill()
        result["during"] = extra
        return result

    # --- steps -------------------------------------------------------------------------------

    def scaling(self, seconds: float) -> None:
        began = time.monotonic()
        auth = {"authorization": f"Bearer {KEY}"}
        say(f"tokens/s at c=256 through bastion (2 replicas), {seconds:.0f}s")
        two = asyncio.run(self._load(self.base, auth, 256, seconds))
        self.results["through_bastion_2_replicas"] = two
        self.write()
        _, port = self.children()[0]
        say(f"tokens/s at c=256 straight to one replica (port {port}), {seconds:.0f}s")
        direct = asyncio.run(self._load_direct(port, 256, seconds))
        self.results["direct_1_replica"] = direct
        ratio = two["tokens_per_s"] / direct["tokens_per_s"] if direct["tokens_per_s"] else None
        self.results["scaling_2_vs_1"] = round(ratio, 3) if ratio else None
        say(f"2 replicas through bastion: {two['tokens_per_s']} tok/s; 1 replica direct: {direct['tokens_per_s']} "
            f"tok/s; ratio {self.results['scaling_2_vs_1']} (target >= 1.9); load generator: busiest worker "
            f"{two['load_cpu_busiest_core']} / {direct['load_cpu_busiest_core']} of a core")  # fmt: skip
        self.step("scaling", began)

    async def _load_direct(self, port: int, concurrency: int, seconds: float) -> dict[str, Any]:
        key = _child_key(self.children()[0][0])
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self._load(f"http://127.0.0.1:{port}", headers, concurrency, seconds)

    def rolling_restart(self, limit: float) -> None:
        """Replica 1 restarted under c=64; the admin call is bounded by `limit` (the budget left for it)."""
        began = time.monotonic()
        auth = {"authorization": f"Bearer {KEY}"}
        say(f"rolling restart of replica 1 under c=64 load (a new child starts beside the old one; <= {limit:.0f}s)")

        async def restart() -> dict[str, Any]:
            began = time.monotonic()
            async with httpx.AsyncClient(timeout=httpx.Timeout(limit, connect=10)) as client:
                try:
                    answer = await client.post(
                        self.base + "/admin/engines/restart",
                        params={"model": f"{MODEL}/1"},
                        headers={"authorization": f"Bearer {ADMIN}"},
                    )
                except httpx.TimeoutException:
                    return {"status": 0, "body": "no answer within the budget", "took_s": limit}
            return {"status": answer.status_code, "body": answer.json(), "took_s": round(time.monotonic() - began, 1)}

        result = asyncio.run(self._load(self.base, auth, 64, self.restart_seconds, during=restart))
        self.results["rolling_restart"] = result
        say(f"rolling restart: {result['during']}; requests {result['requests']}, failed {result['failed']}")
        self.step("rolling_restart", began)

    def kill_engine(self) -> None:
        began = time.monotonic()
        auth = {"authorization": f"Bearer {KEY}"}
        say(f"kill -9 of replica 0's engine core under c=64 load, {self.kill_seconds:.0f}s")

        async def kill() -> dict[str, Any]:
            pid = self.children()[0][0]
            victims = _engine_cores(pid) or [pid]
            for victim in victims:
                os.kill(victim, signal.SIGKILL)
            return {"killed": victims}

        result = asyncio.run(self._load(self.base, auth, 64, self.kill_seconds, during=kill))
        self.results["engine_kill"] = result
        say(f"kill: {result['during']}; failed before streaming {result['failed_not_started']} (target 0), "
            f"cut mid-stream {result['failed_started']}")  # fmt: skip
        self.step("engine_kill", began)

    def plan(self, skip: set[str]) -> None:
        """The steps in an order that needs no second wait for a replica, each only if it fits the budget.

        The rolling restart waits for a new child to start (about as long as the first start took), so
        its time is known once the gateway is ready; the kill comes last (its replica restarts meanwhile,
        and nothing waits for it). The scaling measurement gets what is left, up to --seconds each.
        """
        restart_need = self.results["ready_s"] + RESTART_SLACK_S if "restart" not in skip else 0.0
        kill_need = self.kill_seconds + LOAD_OVERHEAD_S if "kill" not in skip else 0.0
        if "scaling" not in skip:
            seconds = min(self.seconds, (self.left() - restart_need - kill_need) / 2 - LOAD_OVERHEAD_S)
            floor = min(self.seconds, MIN_SCALING_S)
            if seconds < floor:
                say(f"the budget leaves {seconds:.0f}s per scaling measurement: measuring {floor:.0f}s anyway")
            self.scaling(max(seconds, floor))
        if "restart" not in skip:
            if self.left() < restart_need + kill_need:
                self.skip("restart", f"{self.left():.0f}s left, a restart needs about {restart_need:.0f}s")
            else:
                self.rolling_restart(self.left() - kill_need)
        if "kill" not in skip:
            if self.left() < kill_need:
                self.skip("kill", f"{self.left():.0f}s left, the kill step needs {kill_need:.0f}s")
            else:
                self.kill_engine()


def _child_key(pid: int) -> str:
    """The supervised child's VLLM_API_KEY, read from its environment (we run as the same user)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    for item in environ:
        if item.startswith(b"VLLM_API_KEY="):
            return item.split(b"=", 1)[1].decode()
    return ""


def _engine_cores(pid: int) -> list[int]:
    """vLLM's engine core processes under the replica's process group."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            comm = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        pgrp = int(stat[stat.rindex(b")") + 2 :].split()[2])
        if pgrp == pid and int(entry) != pid and (b"EngineCore" in comm or b"EngineCore" in stat):
            found.append(int(entry))
    return found


def main() -> None:
    if sys.argv[1:] == ["--load-worker"]:
        asyncio.run(_worker())
        return
    parser = argparse.ArgumentParser(description="two replicas behind one bastion (see module docstring)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bastion-engines")))
    parser.add_argument("--simulate", action="store_true", help="two simulators instead of vLLM (no GPU)")
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port")
    parser.add_argument("--seconds", type=float, default=25.0, help="each scaling measurement, at most")
    parser.add_argument("--restart-seconds", type=float, default=5.0,
                        help="load around the rolling restart, at least (it lasts as long as the restart)")  # fmt: skip
    parser.add_argument("--kill-seconds", type=float, default=10.0, help="load around the kill -9")
    parser.add_argument("--load-procs", type=int, default=8, help="load generator processes")
    parser.add_argument("--budget", type=float, default=560.0,
                        help="seconds the whole run may take (a GPU host command is killed at 600 s)")  # fmt: skip
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: scaling,restart,kill")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.simulate, args.port, args)
    try:
        run.start()
        run.plan(set(filter(None, args.skip.split(","))))
    finally:
        stopping = time.monotonic()
        run.stop()
        run.results["steps_s"]["stop"] = round(time.monotonic() - stopping, 1)
        run.results["total_s"] = round(time.monotonic() - run.began, 1)
        run.write()
        say(f"done in {run.results['total_s']}s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
