"""Overhead of the metrics and audit listeners, per request.

Two measurements:
  micro: timeit of Metrics.open + Metrics.__call__ and of AuditLog.__call__ on a filled Exchange.
  gateway: CPU seconds the gateway process spends per request (utime+stime from /proc), for N
           requests through a real gateway + simulator, with metrics+audit on and off.
Usage: python bench/observability_overhead.py [micro|gateway] [N]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import httpx

from bastion.audit import audit_log
from bastion.config import Settings
from bastion.exchange import Exchange
from bastion.metrics import Metrics
from bastion.upstream.state import Phase, Upstream
from bastion.usage import Usage


def filled() -> Exchange:
    e = Exchange(request_id="0123456789abcdef0123456789abcdef", method="POST", path="/v1/chat/completions")
    e.client_ip, e.principal, e.model, e.stream, e.status = "127.0.0.1", "team-a", "qwen2.5-7b-instruct", True, 200
    e.usage = Usage(57, 312)
    e.first_byte, e.finished = e.started + 0.08, e.started + 2.4
    return e


def micro(n: int) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    metrics = Metrics(settings, Upstream("http://127.0.0.1:9", None, Phase.READY))
    exchange = filled()

    def both() -> None:
        metrics.open(exchange)
        metrics(exchange)

    with tempfile.TemporaryDirectory() as tmp:
        audit = audit_log(str(Path(tmp) / "audit.jsonl"), ["internal-upstream-key-123"])
        assert audit is not None
        for name, fn in (("metrics (open+listener)", both), ("audit (file)", lambda: audit(exchange))):
            fn()
            best = min(timeit.repeat(fn, number=n, repeat=5)) / n
            print(f"{name:28s} {best * 1e6:7.2f} us/request")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, n: int, concurrency: int = 8) -> None:
    body = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    await r.aread()
                    assert r.status_code == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def gateway(n: int) -> None:
    from tests.support import gateway as gw
    from tests.support import simulator

    on = {"BASTION_AUDIT_LOG": "/dev/null"}
    off = {"BASTION_METRICS_ENABLED": "false", "BASTION_AUDIT_LOG": "off"}
    results: dict[str, list[float]] = {"on": [], "off": []}
    with simulator("--tokens", "16") as (_, sim):
        for _round in range(3):
            for label, env in (("off", off), ("on", on)):
                with gw("--upstream-url", sim, env=env) as (proc, url):
                    asyncio.run(load(url, 200))  # warm-up
                    before = cpu_seconds(proc.pid)
                    asyncio.run(load(url, n))
                    results[label].append((cpu_seconds(proc.pid) - before) / n)
    for label, values in results.items():
        print(f"gateway CPU/request, metrics+audit {label:3s}: " + ", ".join(f"{v * 1e6:.0f}" for v in values) + " us")
    delta = min(results["on"]) - min(results["off"])
    print(f"difference of the best runs: {delta * 1e6:.0f} us/request")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "micro"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else (100_000 if mode == "micro" else 3000)
    micro(count) if mode == "micro" else gateway(count)
