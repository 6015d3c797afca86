"""The master's private line to one worker: JSON messages over a socket pair, length-prefixed.

A socket pair (not a `multiprocessing.Pipe`) so both ends run on asyncio streams: a send
never blocks the event loop (the transport buffers it), so a large metrics page going one
way cannot deadlock against another going the other way. The pair is created by the
master and one end handed to the worker when it is spawned; nothing else can connect to it,
so the engines' keys may travel on it (never on argv or a port).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from typing import Any

Message = dict[str, Any]
_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 << 20  # a merged metrics page of a large fleet stays far below this


class Channel:
    """One end of the line: `send` queues a message, `receive` waits for the next (None once the other end is gone)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_MESSAGE)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        """Queue `message`; a closed line drops it (its reader sees the end and acts on that)."""
        if self._writer.is_closing():
            return
        data = json.dumps(message, separators=(",", ":")).encode()
        self._writer.write(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> Message | None:
        try:
            head = await self._reader.readexactly(_LENGTH.size)
            (size,) = _LENGTH.unpack(head)
            if size > MAX_MESSAGE:
                return None
            message = json.loads(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return None
        return message if isinstance(message, dict) else None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
