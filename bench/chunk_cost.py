"""What relaying one streamed chunk costs in Python, piece by piece, without the sockets.

    PYTHONPATH=src .venv/bin/python bench/chunk_cost.py [--chunks 100000] [--runs 5]

The running gateway spends ~40-50 µs of CPU per paced chunk on the 2-core machine (bench/run.py),
about a third of it in the kernel (one read, one write: the floor nginx pays too). This drives
the real objects of the relay path with a transport that drops what is written, so only the
user-space cost remains, and splits it:

- parse: `http1.Connection.data_received` for one chunk of a chunked SSE body (httptools, the
  response's buffer, waking its reader), the reader's buffer then emptied by hand;
- send: uvicorn's `RequestResponseCycle.send` for one body message (chunked framing), through
  `server.HeadHoldingTransport`;
- wake: resuming a task parked on a future at the depth of the /v1 chain (12 coroutines) and
  parking it again, as every chunk does;
- relay: all of it as the gateway ran it before pushing: the bytes fed to the connection in
  one loop iteration, `Proxy._relay` (with its StreamTap) woken in the next, sending through
  uvicorn's `send`;
- relay pushed: as the gateway runs it now, the hook offering the server's direct writer
  (`Response.push_to`): the tap and the write happen in `data_received`, no task wakes.

Each piece is timed with `time.process_time` over `--chunks`, `--runs` times; the median is
printed with the range. The loop is uvloop's, as in the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bastion import server
from bastion.asgi import CONNECTION_HOOK, ConnectionHook, DisconnectWatch
from bastion.context import Exchange
from bastion.http.http1 import Connection, Response
from bastion.proxy import Proxy
from bastion.server import HeadHoldingTransport

EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"qwen2.5-7b-instruct","choices":[{"index":0,"delta":{"content":" token"},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
DEPTH = 12  # coroutines between the task and the future a chunk wakes: uvicorn's run_asgi ... Response._wait


class NullTransport:
    """A socket that takes every write at once."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Owner:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def put_back(self, connection: Connection) -> None: ...
    def retire(self, connection: Connection) -> None: ...


def upstream_response(loop: asyncio.AbstractEventLoop) -> tuple[Connection, Response]:
    connection = Connection(Owner(loop))
    connection.connection_made(NullTransport())  # type: ignore[arg-type]
    response = connection.send(b"POST", b"POST /v1/chat/completions HTTP/1.1\r\n\r\n", b"", 600.0)
    connection.data_received(HEAD)
    return connection, response


def client_cycle(loop: asyncio.AbstractEventLoop) -> RequestResponseCycle:
    transport = HeadHoldingTransport(NullTransport(), loop)  # type: ignore[arg-type]
    scope: Any = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    return RequestResponseCycle(
        scope=scope, transport=transport, flow=FlowControl(transport), logger=logging.getLogger("x"),  # type: ignore[arg-type]
        access_logger=logging.getLogger("y"), access_log=False, default_headers=[], message_event=asyncio.Event(),
        expect_100_continue=False, keep_alive=True, on_response=lambda: None,
    )  # fmt: skip


async def parse(chunks: int) -> float:
    connection, response = upstream_response(asyncio.get_running_loop())
    feed = connection.data_received
    start = time.process_time()
    for _ in range(chunks):
        feed(CHUNK)
        response._chunks.clear()
    return time.process_time() - start


async def send(chunks: int) -> float:
    cycle = client_cycle(asyncio.get_running_loop())
    await cycle.send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    start = time.process_time()
    for _ in range(chunks):
        await cycle.send({"type": "http.response.body", "body": EVENT, "more_body": True})
    return time.process_time() - start


async def wake(chunks: int) -> float:
    """A task parked DEPTH coroutines down, woken by a callback once per loop iteration."""
    loop = asyncio.get_running_loop()
    box: list[asyncio.Future[None] | None] = [None]

    async def leaf() -> None:
        for _ in range(chunks):
            box[0] = loop.create_future()
            await box[0]

    def down(depth: int) -> Callable[[], Awaitable[None]]:
        if depth == 0:
            return leaf

        async def level() -> None:
            await down(depth - 1)()

        return level

    done = False

    def pump() -> None:
        future = box[0]
        if future is not None and not future.done():
            future.set_result(None)
        if not done:
            loop.call_soon(pump)

    loop.call_soon(pump)
    start = time.process_time()
    await down(DEPTH)()
    done = True
    return time.process_time() - start - await idle(chunks)


async def idle(iterations: int) -> float:
    """What the pump alone costs: one callback per loop iteration (subtracted from wake and relay)."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    left = [iterations]

    def pump() -> None:
        left[0] -= 1
        if left[0] > 0:
            loop.call_soon(pump)
        else:
            finished.set_result(None)

    start = time.process_time()
    loop.call_soon(pump)
    await finished
    return time.process_time() - start


async def relay(chunks: int, streams: int = 1, push: bool = False, per_read: int = 1) -> float:
    """The whole path: bytes in one iteration, Proxy._relay woken in the next, out through uvicorn.

    With `streams` > 1, that many relays run at once and every step feeds each of them one chunk
    in the same iteration, as an engine step's burst arrives (a larger working set per step).
    With `push`, the hook offers bastion's server's direct writer, as in the gateway: the chunk
    goes from `data_received` to the client's transport, and the relay task sleeps to the end.
    With `per_read` > 1, each read holds that many chunks (a burst after a busy turn of the loop).
    """
    loop = asyncio.get_running_loop()
    proxy = object.__new__(Proxy)
    pairs = [(upstream_response(loop), client_cycle(loop)) for _ in range(streams)]
    exchanges = [Exchange(request_id="bench", method="POST", path="/v1/chat/completions") for _ in range(streams)]
    steps = max(2, chunks // (streams * per_read))
    burst = CHUNK * per_read
    left = [steps]

    def pump() -> None:
        left[0] -= 1
        data = burst if left[0] > 0 else b"0\r\n\r\n"
        for (connection, _), _ in pairs:
            connection.data_received(data)
        if left[0] > 0:
            loop.call_soon(pump)

    async def run(response: Response, cycle: RequestResponseCycle, exchange: Exchange) -> None:
        hook = ConnectionHook()
        if push:
            hook.writer = server.ChunkWriter(weakref.ref(cycle))
        watch = DisconnectWatch({CONNECTION_HOOK: hook}, cycle.receive)
        await proxy._relay(response, cycle.send, exchange, watch, [])  # usage_added False: nothing stripped

    tasks = [
        loop.create_task(run(response, cycle, exchange))
        for ((_, response), cycle), exchange in zip(pairs, exchanges, strict=True)
    ]
    await asyncio.sleep(0)
    loop.call_soon(pump)
    start = time.process_time()
    await asyncio.gather(*tasks)
    spent = time.process_time() - start
    assert all(exchange.events == (steps - 1) * per_read for exchange in exchanges), exchanges[0].events
    return (spent - await idle(steps)) * chunks / (steps * streams * per_read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    pieces: list[tuple[str, Callable[[int], Awaitable[float]]]] = [
        ("parse (http1 data_received, one chunk)", parse),
        ("send (uvicorn send + HeadHoldingTransport)", send),
        (f"wake (task resumed and parked, depth {DEPTH})", wake),
        ("relay (all of it: feed, wake, Proxy._relay, send)", relay),
        ("relay, 128 streams fed in one step", lambda chunks: relay(chunks, 128)),
        ("relay pushed (the gateway's path: hook.writer)", lambda chunks: relay(chunks, 1, push=True)),
        ("relay pushed, 128 streams fed in one step", lambda chunks: relay(chunks, 128, push=True)),
        ("relay pushed, 4 chunks per read (one write each read)", lambda chunks: relay(chunks, 1, True, 4)),
    ]
    print("| piece | µs per chunk (median, range) |")
    print("|---|---|")
    for name, piece in pieces:
        costs = [uvloop.run(piece(args.chunks)) / args.chunks * 1e6 for _ in range(args.runs)]
        print(f"| {name} | {statistics.median(costs):.2f} ({min(costs):.2f}–{max(costs):.2f}) |")


if __name__ == "__main__":
    main()
