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

`--streams`: the same for paced streams (the upstream `fast_upstream.py --paced`, one token per
engine step, so each read the gateway makes holds one chunk, as behind a GPU): streams of 16 and of
64 tokens on 4 connections, counted apart, give the cost of a streamed request (its stages) and of
each relayed chunk (the difference over the 48 extra tokens).

Needs valgrind (apt-get install valgrind); a run takes about a minute (the gateway starts
~50 times slower under valgrind), `--streams` about two.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from harness import PYTHON, create_key, free_port, gateway_env, process, say, stop_children_on_sigterm, upstream

BODY = b'{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
CONNECTIONS = 16
STREAM = b'{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":%d}'
STREAM_CONNECTIONS = 4  # few: under valgrind the gateway must still read one chunk per engine step
STREAM_TOKENS = (16, 64)


def _load(port: int, key: str, requests: int, body: bytes = BODY, connections: int = CONNECTIONS) -> None:
    """`requests` POSTs over `connections` keep-alive connections, each waiting for its whole answer."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer " + key.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
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

    threads = [threading.Thread(target=client, args=(requests // connections,)) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"requests failed: {failures[:3]}")


def _complete(data: bytes) -> bool:
    """Whether `data` holds a whole response: its content-length's worth, or a chunked body's last chunk."""
    head, found, body = data.partition(b"\r\n\r\n")
    if found and b"\r\ntransfer-encoding: chunked" in head.lower():
        return body.endswith(b"\r\n0\r\n\r\n") or body == b"0\r\n\r\n"
    for line in head.split(b"\r\n")[1:] if found else ():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _counted(pid: int, out: Path, work: Path, load: Callable[[], None], requests: int) -> int:
    """Instructions per request of `load` (`requests` of them) in the gateway `pid` runs under callgrind."""
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    load()
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    dump = max(work.glob(out.name + ".*"), key=os.path.getmtime)
    summary = next(line for line in dump.read_text().splitlines() if line.startswith("summary:"))
    return int(summary.split()[1]) // requests


def measure(src: str, requests: int, work: Path, upstream_port: int, streams: bool = False) -> str:
    """Instructions per request (and per chunk, for `streams`) of a gateway running `src`."""
    env = {**gateway_env(work), "PYTHONPATH": src}
    key = create_key(env)
    port = free_port()
    out = work / f"callgrind-{free_port()}.out"
    args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", PYTHON, "-m", "bastion", "serve",
            "--port", str(port), "--upstream-url", f"http://127.0.0.1:{upstream_port}"]  # fmt: skip
    # The gateway starts ~50 times slower under valgrind; its counters are dumped before it is stopped.
    with process(args, env, f"http://127.0.0.1:{port}/ready", work / "gateway.log", timeout=600) as gateway:
        if not streams:
            _load(port, key, CONNECTIONS * 20)  # warm-up: connections, caches, label children
            requests = requests // CONNECTIONS * CONNECTIONS
            return f"{_counted(gateway.pid, out, work, lambda: _load(port, key, requests), requests):,} per request"
        counts = []
        requests = max(requests // 40 // STREAM_CONNECTIONS, 1) * STREAM_CONNECTIONS  # 1,600 -> 40 of each length
        for tokens in STREAM_TOKENS:
            body = STREAM % tokens
            _load(port, key, STREAM_CONNECTIONS * 2, body, STREAM_CONNECTIONS)  # warm-up
            load = functools.partial(_load, port, key, requests, body, STREAM_CONNECTIONS)
            counts.append(_counted(gateway.pid, out, work, load, requests))
        (short, long), (few, many) = counts, STREAM_TOKENS
        chunk = (long - short) / (many - few)
        return (
            f"{short:,} per {few}-token stream, {long:,} per {many}-token stream: {chunk:,.0f} per chunk, "
            f"{short - few * chunk:,.0f} per streamed request besides its chunks"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", help="a checkout's src directory (repeatable; default: ours)")
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--streams", action="store_true", help="paced streams of 16 and 64 tokens instead")
    args = parser.parse_args()
    stop_children_on_sigterm()
    sources = args.src or [str(Path(__file__).resolve().parents[1] / "src")]
    work = Path(tempfile.mkdtemp(prefix="bastion-instructions-"))
    port = free_port()
    # Paced at 20 ms: slow enough that the gateway, ~50 times slower under valgrind, reads one chunk per step.
    flags = ("--paced", "--itl", "0.02") if args.streams else ()
    with upstream(port, work, *flags):
        for index, src in enumerate(sources):
            say(f"{src}: gateway under callgrind, {'streams' if args.streams else f'{args.requests} requests'}")
            own = work / str(index)  # a key file of its own
            own.mkdir()
            print(f"{src}: instructions {measure(src, args.requests, own, port, args.streams)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
