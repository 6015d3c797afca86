"""Per-request CPU of request inspection and of the token reservation, and of reading usage back.

    python bench/inspect_cost.py

A micro-benchmark (one event loop, sequential, best of 5 rounds), not a timed test. Prints
microseconds per request for:

- inspection: the body read from `receive`, its policy fields read (`json.loads` up to 64 KiB,
  the scanner above), `include_usage` written in for a stream, the facts recorded; for typical
  1 and 4 KiB chat bodies, streamed and not, and a 1 MiB one (the scanner's path);
- reservation: admit (reserve prompt estimate + max_tokens) + release + settle to the usage, with
  the memory storage, on 200 principals;
- usage: reading it back from a 1 KiB non-streamed body (`BodyUsage`, fed as one chunk).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from bastion.asgi import Message
from bastion.context import Exchange
from bastion.ratelimit import RateLimiter
from bastion.request_body import InspectBody, RequestInspector
from bastion.usage import BodyUsage

ROUNDS = 5


def chat(kib: int, stream: bool) -> bytes:
    content = "Tell me about the history of the Roman empire and its fall, in detail please. "
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": content * max(1, kib * 1024 // len(content))},
    ]
    body = {"model": "qwen2.5-7b-instruct", "messages": messages, "max_tokens": 256, "temperature": 0.7}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def best(n: int, one: Callable[[], Awaitable[None]]) -> float:
    """Microseconds per call, best of ROUNDS rounds of `n` calls."""
    results = []
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(n):
            await one()
        results.append((time.process_time() - start) / n * 1e6)
    return min(results)


async def inspection(body: bytes, n: int) -> float:
    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        pass

    stage = InspectBody(app, RequestInspector(default_max_tokens=4096), max_body=16 << 20, body_timeout=60.0)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def one() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        exchange = Exchange("r", "POST", "/v1/chat/completions")
        scope: dict[str, object] = {"type": "http", "method": "POST", "path": exchange.path, "headers": headers}
        exchange.attach(scope)
        await stage(scope, receive, _send)

    return await best(n, one)


async def _send(message: Message) -> None:
    pass


async def reservation(n: int) -> float:
    limiter = RateLimiter(rpm=0, tpm=1_000_000_000, max_concurrent=0)
    ips = [f"10.0.{i % 200}.1" for i in range(200)]
    count = 0

    async def one() -> None:
        nonlocal count
        count += 1
        admission = await limiter.admit(None, ips[count % 200], 4096 + 300)
        await limiter.release(admission)
        await limiter.settle(admission, 512)

    return await best(n, one)


async def usage(n: int) -> float:
    body = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 400}}],
            "usage": {"prompt_tokens": 30, "total_tokens": 286, "completion_tokens": 256},
        }
    ).encode()

    async def one() -> None:
        reader = BodyUsage()
        reader.feed(body)
        reader.finish()

    return await best(n, one)


async def main() -> None:
    for kib in (1, 4):
        for stream in (False, True):
            body = chat(kib, stream)
            print(
                f"inspection, {len(body):>7} B chat body, stream={stream!s:5}: {await inspection(body, 5000):7.1f} us"
            )
    big = chat(1024, True)
    print(f"inspection, {len(big):>7} B chat body, stream=True : {await inspection(big, 50):7.1f} us (the scanner)")
    print(f"reservation: admit + release + settle (memory):   {await reservation(20_000):7.1f} us")
    print(f"usage from a 1 KiB body (BodyUsage):              {await usage(20_000):7.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
