"""Two vLLM replicas (one per GPU) behind one bastion: scaling, a rolling restart and a kill, in one run.

On the 2-GPU machine (after `source .gpu/pN/device_setup.sh`, see ../shared/gpu/README.md):

    python3 bench/gpu_engines.py --out "$OUT"

Here, without a GPU, the same steps against two simulators (to check the script):

    python bench/gpu_engines.py --simulate --out /tmp/engines

Steps (results.json is rewritten after each one):
1. start `bastion serve` with BASTION_ENGINES = one model, 2 replicas, `gpus: [0, 1]` (CUDA_VISIBLE_DEVICES
   per child), both children started at once; wait for /ready (progress every 15 s);
2. tokens/s at c=256 through bastion (2 replicas) vs straight to one replica (its port from bastion's log):
   target >= 1.9x;
3. a rolling restart of replica 1 (`bastion engines restart <model>/1`) under c=64 load: 0 failed requests;
4. kill -9 of one replica's engine core (vLLM's EngineCore process; the simulator itself here) under c=64
   load: no request that had not started streaming fails (retried on the other replica).
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
from pathlib import Path
from typing import Any

import httpx

MODEL = "qwen2.5-7b-instruct"
ADMIN = "gpu-engines-admin-token-0123456789"
KEY = "bst-gpuengines_" + "k" * 40


def say(message: str) -> None:
    print(f"[engines {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, out: Path, simulate: bool, port: int, seconds: float) -> None:
        self.out = out
        self.simulate = simulate
        self.port = port
        self.seconds = seconds
        self.base = f"http://127.0.0.1:{port}"
        self.work = Path(tempfile.mkdtemp(prefix="bastion-engines-"))
        self.log = self.out / "bastion.log"
        self.results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "simulated": simulate, "model": MODEL}
        self.proc: subprocess.Popen[bytes] | None = None

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
            if time.monotonic() - started > 900:
                raise SystemExit("not ready after 900 s")
            time.sleep(1)
        self.results["ready_s"] = round(time.monotonic() - started, 1)
        say(f"ready after {self.results['ready_s']}s")
        self.write()

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

    async def _one(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict[str, Any]:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a story."}],
            "max_tokens": 64,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = False
        text = ""
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
                async for chunk in response.aiter_text():
                    started = started or (response.status_code == 200 and "data:" in chunk)
                    text += chunk
                status = response.status_code
        except httpx.HTTPError as exc:
            return {"status": 0, "started": started, "done": False, "tokens": 0, "error": type(exc).__name__}
        tokens = 0
        for line in text.splitlines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = usage.get("completion_tokens") or tokens
        return {"status": status, "started": started, "done": "[DONE]" in text, "tokens": tokens}

    async def _load(
        self, url: str, headers: dict[str, str], concurrency: int, seconds: float, during: Any = None
    ) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as client:
            stop = asyncio.Event()

            async def worker() -> None:
                while not stop.is_set():
                    results.append(await self._one(client, url, headers))

            begin = time.monotonic()
            workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
            extra: Any = None
            if during is not None:
                await asyncio.sleep(2)
                extra = await during()
            remaining = seconds - (time.monotonic() - begin)
            if remaining > 0:
                await asyncio.sleep(remaining)
            stop.set()
            await asyncio.gather(*workers)
            elapsed = time.monotonic() - begin
        ok = [r for r in results if r["status"] == 200 and r["done"]]
        failed = [r for r in results if not (r["status"] == 200 and r["done"])]
        return {
            "concurrency": concurrency,
            "seconds": round(elapsed, 1),
            "requests": len(results),
            "ok": len(ok),
            "failed": len(failed),
            "failed_not_started": sum(1 for r in failed if not r["started"]),
            "failed_started": sum(1 for r in failed if r["started"]),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 1),
            "during": extra,
        }

    # --- steps -------------------------------------------------------------------------------

    def scaling(self) -> None:
        auth = {"authorization": f"Bearer {KEY}"}
        say(f"tokens/s at c=256 through bastion (2 replicas), {self.seconds:.0f}s")
        two = asyncio.run(self._load(self.base, auth, 256, self.seconds))
        self.results["through_bastion_2_replicas"] = two
        self.write()
        _, port = self.children()[0]
        say(f"tokens/s at c=256 straight to one replica (port {port}), {self.seconds:.0f}s")
        direct = asyncio.run(self._load_direct(port, 256, self.seconds))
        self.results["direct_1_replica"] = direct
        ratio = two["tokens_per_s"] / direct["tokens_per_s"] if direct["tokens_per_s"] else None
        self.results["scaling_2_vs_1"] = round(ratio, 3) if ratio else None
        say(f"2 replicas through bastion: {two['tokens_per_s']} tok/s; 1 replica direct: {direct['tokens_per_s']} "
            f"tok/s; ratio {self.results['scaling_2_vs_1']} (target >= 1.9)")  # fmt: skip
        self.write()

    async def _load_direct(self, port: int, concurrency: int, seconds: float) -> dict[str, Any]:
        key = _child_key(self.children()[0][0])
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self._load(f"http://127.0.0.1:{port}", headers, concurrency, seconds)

    def rolling_restart(self) -> None:
        auth = {"authorization": f"Bearer {KEY}"}
        say("rolling restart of replica 1 under c=64 load")

        async def restart() -> dict[str, Any]:
            began = time.monotonic()
            async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=10)) as client:
                answer = await client.post(
                    self.base + "/admin/engines/restart",
                    params={"model": f"{MODEL}/1"},
                    headers={"authorization": f"Bearer {ADMIN}"},
                )
            return {"status": answer.status_code, "body": answer.json(), "took_s": round(time.monotonic() - began, 1)}

        result = asyncio.run(self._load(self.base, auth, 64, 5, during=restart))
        self.results["rolling_restart"] = result
        say(f"rolling restart: {result['during']}; requests {result['requests']}, failed {result['failed']}")
        self.write()

    def kill_engine(self) -> None:
        auth = {"authorization": f"Bearer {KEY}"}
        say("kill -9 of replica 0's engine core under c=64 load")

        async def kill() -> dict[str, Any]:
            pid = self.children()[0][0]
            victims = _engine_cores(pid) or [pid]
            for victim in victims:
                os.kill(victim, signal.SIGKILL)
            return {"killed": victims}

        result = asyncio.run(self._load(self.base, auth, 64, 12, during=kill))
        self.results["engine_kill"] = result
        say(f"kill: {result['during']}; failed before streaming {result['failed_not_started']} (target 0), "
            f"cut mid-stream {result['failed_started']}")  # fmt: skip
        self.write()


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
    parser = argparse.ArgumentParser(description="two replicas behind one bastion (see module docstring)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bastion-engines")))
    parser.add_argument("--simulate", action="store_true", help="two simulators instead of vLLM (no GPU)")
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port")
    parser.add_argument("--seconds", type=float, default=25.0, help="length of each throughput measurement")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: scaling,restart,kill")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.simulate, args.port, args.seconds)
    skip = set(filter(None, args.skip.split(",")))
    try:
        run.start()
        if "scaling" not in skip:
            run.scaling()
        if "restart" not in skip:
            run.rolling_restart()
        if "kill" not in skip:
            run.kill_engine()
    finally:
        run.stop()
        run.write()
        say(f"results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
