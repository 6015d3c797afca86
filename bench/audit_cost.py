"""Cost of one audit line: the `AuditLog` listener with a file destination, inside an event loop.

    python bench/audit_cost.py [lines]

Calls the listener on a finished `Exchange` (default 100,000 times) inside a running event
loop, yielding to the loop every 64 calls as a busy gateway would (so buffered lines get
written), and prints the wall-clock microseconds per line, writes included (best of 5 runs).
A micro-benchmark, not a timed test.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bastion.audit import AuditLog, audit_log
from bastion.auth.identity import Principal
from bastion.context import Exchange
from bastion.usage import Usage


def finished() -> Exchange:
    e = Exchange(request_id="0123456789abcdef0123456789abcdef", method="POST", path="/v1/chat/completions")
    e.client_ip, e.model, e.stream, e.status = "127.0.0.1", "qwen2.5-7b-instruct", True, 200
    e.principal = Principal("k1", "team-a", "key")
    e.usage = Usage(57, 312)
    e.first_byte, e.finished = e.started + 0.0812345, e.started + 2.4012345
    return e


async def run(listener: AuditLog, exchange: Exchange, n: int) -> float:
    """Seconds for n lines, yielding to the loop every 64."""
    start = time.perf_counter()
    for i in range(n):
        listener(exchange)
        if i % 64 == 63:
            await asyncio.sleep(0)
    await asyncio.sleep(0)  # the last flush
    return time.perf_counter() - start


async def main(n: int) -> None:
    exchange = finished()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        listener = audit_log(str(path), ["internal-upstream-key-123"])
        assert listener is not None
        await run(listener, exchange, 1000)  # warm up
        best = min([await run(listener, exchange, n) for _ in range(5)])
        await asyncio.sleep(0.01)
        lines = len(path.read_bytes().splitlines())
    print(f"audit line (file, in a loop): {best / n * 1e6:.2f} us/line ({lines} lines written)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
