"""The two ways a Redis call fails: the server is unavailable, or it refused this command."""

from __future__ import annotations


class RedisError(Exception):
    """Base of every error the client raises."""


class RedisUnavailable(RedisError):
    """Redis cannot serve us now: unreachable, too slow, closed the connection, or refusing us
    (wrong password, a read-only replica mid-failover, still loading its data set). Callers that
    share state through Redis treat this as "storage down" (fail open or closed), never as a bug."""


class RedisTimeout(RedisUnavailable):
    """No connection, or no reply, within the client's timeout."""


class ReplyError(RedisError):
    """An error reply to a command that reached a working server (a script's bug, WRONGTYPE, a syntax
    error): a bug of the caller, not an outage."""


class NoScript(ReplyError):
    """NOSCRIPT: the server does not have the script cached (first use, or after a restart)."""


# Error replies that mean "unavailable", as coredis classed them (its ConnectionError, AuthenticationError and
# ReadOnlyError families), plus MASTERDOWN (a replica that lost its primary: a failover, not our bug).
_UNAVAILABLE = (b"READONLY", b"NOAUTH", b"WRONGPASS", b"LOADING", b"MASTERDOWN", b"ERR max number of clients")


def reply_error(message: bytes) -> RedisError:
    """The exception an error reply (`-MESSAGE`, without the dash) stands for."""
    text = message.decode("utf-8", "replace")
    if message.startswith(b"NOSCRIPT"):
        return NoScript(text)
    if message.startswith(_UNAVAILABLE):
        return RedisUnavailable("Redis refused the command: " + text.split(" ", 1)[0])
    return ReplyError(text)
