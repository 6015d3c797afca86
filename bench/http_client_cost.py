"""CPU per request of the upstream HTTP client (`bastion.http`), sequential, against a local keep-alive server.

    python bench/http_client_cost.py [--requests 5000] [--rounds 5]

A quick micro-benchmark, not a timed test. The server is `bench/fast_upstream.py` in its own
process, so only the client's CPU is counted (`time.process_time` of this process, on uvloop as
the gateway runs). Prints the best of the rounds (on a shared machine, the least disturbed one),
in CPU microseconds per request, for:

- get: `GET /health` with `Client.open`, read whole, released (one kept-alive connection);
- post: a non-streamed chat completion (a ~300-byte JSON answer);
- stream: a 16-event SSE stream, read chunk by chunk as the proxy does.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import uvloop

from bastion.http import Client, Timeouts

HERE = Path(__file__).resolve().parent
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
STREAM = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16,"stream":true}'
HEADERS = [(b"content-type", b"application/json")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _run(client: Client, base: str, kind: str, n: int) -> float:
    method, target, body = {
        "get": ("GET", b"/health", b""),
        "post": ("POST", b"/v1/chat/completions", BODY),
        "stream": ("POST", b"/v1/chat/completions", STREAM),
    }[kind]
    headers = HEADERS if body else []
    start = time.process_time()
    for _ in range(n):
        response = await client.open(method, base, target, headers, body)
        while await response.read_some():
            pass
        response.release()
    return (time.process_time() - start) / n * 1e6


async def measure(port: int, requests: int, rounds: int) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    timeouts = Timeouts(connect=5, read=60, write=60, pool=30)
    results: dict[str, list[float]] = {"get": [], "post": [], "stream": []}
    async with Client(timeouts=timeouts, max_connections=8, keepalive_expiry=30) as client:
        for kind in results:
            await _run(client, base, kind, 200)  # warm up
        for _ in range(rounds):
            for kind, samples in results.items():
                samples.append(await _run(client, base, kind, requests))
    return {kind: min(samples) for kind, samples in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(HERE / "fast_upstream.py"), "--port", str(port), "--tokens", "16"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the fast upstream did not start") from None
                time.sleep(0.05)
        results = uvloop.run(measure(port, args.requests, args.rounds))
    finally:
        server.terminate()
        server.wait(10)
    for kind, micros in results.items():
        print(f"{kind:7} {micros:7.1f} µs CPU per request (client side, best of {args.rounds} x {args.requests})")


if __name__ == "__main__":
    main()
