"""RESP2, the Redis wire format: commands out, replies in (incrementally, from whatever the socket gave)."""

from __future__ import annotations

from .errors import RedisError, reply_error

# A reply: integer, bulk or simple string (bytes), nil (None), an error (its exception, not raised: an
# array may hold one), or an array of replies.
Reply = int | bytes | None | RedisError | list["Reply"]
Arg = bytes | str | int | float


class ProtocolError(Exception):
    """Bytes that are not a RESP2 reply: the connection cannot be trusted any more."""


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def encode(args: tuple[Arg, ...] | list[Arg]) -> bytes:
    """A command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + bulk(args)


def bulk(args: tuple[Arg, ...] | list[Arg]) -> bytes:
    """Arguments as consecutive bulk strings (the body of a command's array)."""
    out = []
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    """One reply starting at `pos`: (reply, the position after it); `_Incomplete` if it is not all there."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 58:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 36:  # '$' bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[end + 2 : stop], stop + 2
    if kind == 42:  # '*' array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[Reply] = []
        pos = end + 2
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 43:  # '+' simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # '-' error
        return reply_error(buf[pos + 1 : end]), end + 2
    raise ProtocolError(f"unexpected reply type byte {kind!r}")


class Parser:
    """Feeds on received bytes, returns every complete reply; keeps a partial one for the next feed."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._rest + data if self._rest else data
        replies: list[Reply] = []
        pos, size = 0, len(buf)
        try:
            while pos < size:
                reply, pos = _parse(buf, pos)
                replies.append(reply)
        except _Incomplete:
            pass
        except (ValueError, IndexError) as exc:  # a length or integer that is not a number
            raise ProtocolError(f"malformed reply: {exc}") from None
        self._rest = buf[pos:]
        return replies
