"""A lean asyncio Redis (RESP2) client for the limits' hot path. Imports nothing of bastion."""

from .client import Redis, Script
from .errors import NoScript, RedisError, RedisTimeout, RedisUnavailable, ReplyError
from .resp import Arg, Reply
from .url import Endpoint, parse_url

__all__ = [
    "Arg",
    "Endpoint",
    "NoScript",
    "Redis",
    "RedisError",
    "RedisTimeout",
    "RedisUnavailable",
    "Reply",
    "ReplyError",
    "Script",
    "parse_url",
]
