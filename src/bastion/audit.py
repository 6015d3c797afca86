"""The audit log: one JSON line per /v1 request, on its own logger and handler.

Who (principal, client IP), what (method, path, model, stream), how it ended
(status, outcome, reason), how long (latency, TTFT) and how much (tokens). It is
built only from the `Exchange`, which never holds a credential or prompt text;
the fields a client chooses (request id, path, model) still pass through the
redacting filter from `logs`, in case a client put a key there.
The logger `bastion.audit` does not propagate, so audit lines never mix with the
human-readable log, and with `BASTION_AUDIT_LOG=off` no listener exists at all.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Iterable

from .exchange import Exchange
from .logs import RedactingFilter

LOGGER_NAME = "bastion.audit"
# Client-supplied strings are cut to this length: a log line stays a line, not a payload.
_MAX_FIELD = 256


class AuditLog:
    """The listener: formats and emits the line for one finished exchange."""

    __slots__ = ("_enabled", "_handle", "_redact")

    def __init__(self, logger: logging.Logger, redactor: RedactingFilter) -> None:
        self._enabled = logger.isEnabledFor
        self._redact = redactor.redact
        # `logger.handle` with a ready record: `logger.info` would walk the stack for the caller's
        # file and line (findCaller), which an audit line does not need.
        self._handle = logger.handle

    def __call__(self, exchange: Exchange) -> None:
        if not self._enabled(logging.INFO):
            return
        now = time.time()
        usage = exchange.usage
        latency, ttft = exchange.latency, exchange.ttft
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "request_id": self._redact(exchange.request_id),
            "principal": exchange.principal,
            "client_ip": exchange.client_ip,
            "method": exchange.method,
            "path": self._redact(exchange.path[:_MAX_FIELD]),
            "model": self._redact(exchange.model[:_MAX_FIELD]),
            "stream": exchange.stream,
            "status": exchange.status,
            "outcome": exchange.outcome,
            "reason": exchange.reason,
            "latency_ms": None if latency is None else round(latency * 1000, 3),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
            "prompt_tokens": None if usage is None else usage.prompt_tokens,
            "completion_tokens": None if usage is None else usage.completion_tokens,
        }
        line = json.dumps(entry, separators=(",", ":"))
        self._handle(logging.LogRecord(LOGGER_NAME, logging.INFO, "", 0, line, None, None))


def audit_log(destination: str, secrets: Iterable[str] = ()) -> AuditLog | None:
    """Set up the `bastion.audit` logger for `destination` (stdout, off, or a file path).

    Returns None when off. A file is opened with `WatchedFileHandler`, so
    logrotate can move it; a path that cannot be opened is a start-up error.
    `secrets` (the upstream key, the metrics token) are redacted should they
    ever appear.
    """
    where = destination.strip()
    if where.lower() == "off" or not where:
        return None
    handler: logging.Handler
    if where.lower() == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        try:
            handler = logging.handlers.WatchedFileHandler(where, encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot open the audit log {where!r}: {exc.strerror}") from None
    redactor = RedactingFilter()
    for secret in secrets:
        redactor.add_secret(secret)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return AuditLog(logger, redactor)
