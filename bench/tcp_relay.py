"""The floor of any proxy written in Python on uvloop: bytes pumped between two sockets, nothing else.

    python bench/tcp_relay.py --port 8002 --upstream-port 8001

Each client connection gets its own upstream connection; whatever one side sends is written to
the other in the same callback (`data_received` -> `transport.write`), with the two sides' flow
control tied together. No HTTP parsing, no key check, no limits, no accounting: bench/run.py
measures it beside bastion and nginx so that a paced chunk's cost can be split into what any
Python relay pays on this machine (a callback per read, uvloop's read and write) and what
bastion adds to it. It is a benchmark instrument, not a proxy: it trusts both sides.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class Side(asyncio.Protocol):
    """One socket of a pair: what it reads goes to `peer`; a full peer pauses this side's reading."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early: list[bytes] = []  # bytes read before the peer's connection was made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def serve(host: str, port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()

    class Client(Side):
        connecting: asyncio.Task[None] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.connecting = loop.create_task(self.connect())

        async def connect(self) -> None:
            try:
                _, upstream = await loop.create_connection(Side, "127.0.0.1", upstream_port)
            except OSError:
                if self.transport is not None:
                    self.transport.close()
                return
            if self.transport is None or self.transport.is_closing():  # the client left while we connected
                if upstream.transport is not None:
                    upstream.transport.close()  # else held open until the upstream's own idle timeout
                return
            upstream.peer, self.peer = self, upstream
            if upstream.transport is not None:
                for data in self.early:
                    upstream.transport.write(data)
            self.early.clear()

    server = await loop.create_server(Client, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream_port))


if __name__ == "__main__":
    main()
