"""Instructions per request of the gateway process, counted by valgrind: a per-request cost that noise cannot move.

    .venv/bin/python bench/instructions.py [--src DIR ...] [--requests 1600]

On a shared 2-core machine the CPU time per request of one build moves by 20-30 % from run to
run (what else runs, where the scheduler puts the three processes), so a change worth 5 % is
not seen in `features.py` or `run.py`'s c=64 row. Instructions are: for each `--src` (a
checkout's `src`, e.g. main's and yours), a gateway configured as bench/run.py configures it
runs under `valgrind --tool=callgrind`; after a warm-up its counters are zeroed
(`callgrind_control --zero`), `--requests` non-streamed chat completions go through it on 16
keep-alive connections (raw sockets, one request at a time on each), and the count is dumped.
Two runs of one build agree within ~0.5 %. Instructions are not time: system calls (the
kernel's share) are not counted, and an instruction of C code is cheaper than one of the
interpreter's; the wall-clock harnesses say what a change is worth in requests/s.

Needs valgrind (apt-get install valgrind); a run takes about a minute (the gateway starts
~50 times slower under valgrind).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from harness import PYTHON, create_key, free_port, gateway_env, process, say, stop_children_on_sigterm, upstream

BODY = b'{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
CONNECTIONS = 16


def _load(port: int, key: str, requests: int) -> None:
    """`requests` POSTs over CONNECTIONS keep-alive connections, each waiting for its whole answer."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer " + key.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
    )  # fmt: skip
    failures: list[str] = []

    def client(count: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            for _ in range(count):
                sock.sendall(request)
                data = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        failures.append("connection closed")
                        return
                    data += chunk
                    if _complete(data):
                        break
                if not data.startswith(b"HTTP/1.1 200"):
                    failures.append(data[:80].decode("latin-1"))
                    return

    threads = [threading.Thread(target=client, args=(requests // CONNECTIONS,)) for _ in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"requests failed: {failures[:3]}")


def _complete(data: bytes) -> bool:
    """Whether `data` holds a whole response with a content-length (the fast upstream's answers have one)."""
    head, found, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if found else ():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def measure(src: str, requests: int, work: Path, upstream_port: int) -> int:
    """Instructions per request of a gateway running `src`."""
    env = {**gateway_env(work), "PYTHONPATH": src}
    key = create_key(env)
    port = free_port()
    out = work / f"callgrind-{free_port()}.out"
    args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", PYTHON, "-m", "bastion", "serve",
            "--port", str(port), "--upstream-url", f"http://127.0.0.1:{upstream_port}"]  # fmt: skip
    # The gateway starts ~50 times slower under valgrind; its counters are dumped before it is stopped.
    with process(args, env, f"http://127.0.0.1:{port}/ready", work / "gateway.log", timeout=600) as gateway:
        _load(port, key, CONNECTIONS * 20)  # warm-up: connections, caches, label children
        subprocess.run(["callgrind_control", "--zero", str(gateway.pid)], check=True, capture_output=True)
        _load(port, key, requests)
        subprocess.run(["callgrind_control", "--dump", str(gateway.pid)], check=True, capture_output=True)
        dump = max(work.glob(out.name + ".*"), key=os.path.getmtime)
        summary = next(line for line in dump.read_text().splitlines() if line.startswith("summary:"))
        return int(summary.split()[1]) // (requests // CONNECTIONS * CONNECTIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", help="a checkout's src directory (repeatable; default: ours)")
    parser.add_argument("--requests", type=int, default=1600)
    args = parser.parse_args()
    stop_children_on_sigterm()
    sources = args.src or [str(Path(__file__).resolve().parents[1] / "src")]
    work = Path(tempfile.mkdtemp(prefix="bastion-instructions-"))
    port = free_port()
    with upstream(port, work):
        for index, src in enumerate(sources):
            say(f"{src}: gateway under callgrind, {args.requests} requests")
            own = work / str(index)  # a key file of its own
            own.mkdir()
            print(f"{src}: {measure(src, args.requests, own, port):,} instructions per request", flush=True)


if __name__ == "__main__":
    sys.exit(main())
