"""A keep-alive HTTP/1.1 client (pools per origin, httpx's API over them). Imports nothing of bastion."""

from .client import Client
from .http1 import (
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    Headers,
    HTTPError,
    PoolClosed,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    Response,
    Timeouts,
    WriteTimeout,
)

__all__ = [
    "Client",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionReset",
    "HTTPError",
    "Headers",
    "PoolClosed",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "Timeouts",
    "WriteTimeout",
]
