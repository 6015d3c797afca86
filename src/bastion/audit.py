"""The audit log: one JSON line per /v1 request, written in batches, apart from the normal log.

Who (principal, client IP), what (method, path, model, stream), how it ended
(status, outcome, reason), how long (latency, TTFT) and how much (tokens reported, tokens charged). It is
built only from the `Exchange`, which never holds a credential or prompt text;
the fields a client chooses (request id, path, model) still pass through the
redacting filter from `logs`, in case a client put a key there.

The lines do not go through the `logging` package (a record, filters, a formatter and a
flush per line): `AuditWriter` collects them and writes all the lines finished in one
event-loop iteration with one system call. With `BASTION_AUDIT_LOG=off` no listener
exists at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import sys
import time
from collections.abc import AsyncIterator, Iterable
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses for a str
from typing import BinaryIO

from .accounting import charge
from .context import Exchange
from .logs import RedactingFilter

log = logging.getLogger(__name__)
# Client-supplied strings are cut to this length: a log line stays a line, not a payload.
_MAX_FIELD = 256
# Redacted paths and models, remembered: they repeat (request ids do not). Emptied when it reaches this size.
_MEMO_SIZE = 1024
_FLUSH_BYTES = 64 * 1024  # buffered lines past this size are written at once
_CHECK_SECONDS = 1.0  # how often a file's path is checked for rotation (logrotate moving it)


class AuditWriter:
    """Buffers lines and writes them with one write per event-loop iteration.

    Inside a running loop, the first line of an iteration schedules a flush with
    `call_soon`: the lines finished in the same iteration go out together, without
    waiting for anything. Outside a loop (or after `close`), a line is written at once.
    A file (`path` given) is reopened when its path no longer names the open file,
    checked at most once a second. A failed write never raises: the lines are dropped,
    counted in `dropped`, and the failure is logged once until writing works again.
    """

    __slots__ = (
        "_checked",
        "_closed",
        "_failing",
        "_identity",
        "_lines",
        "_max_write",
        "_path",
        "_scheduled",
        "_size",
        "_stream",
        "dropped",
    )

    def __init__(self, stream: BinaryIO | None, path: str | None = None, *, max_write: int | None = None) -> None:
        self._stream = stream
        # Several processes sharing one pipe (`--workers N`, stdout): a write of at most PIPE_BUF bytes is
        # atomic, a longer one may interleave with another worker's. Lines are then written in such pieces.
        self._max_write = max_write
        self._path = path
        self._identity = _identity(stream) if path is not None and stream is not None else None
        self._checked = time.monotonic()
        self._lines: list[str] = []
        self._size = 0
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop that has a flush to run
        self._closed = False
        self._failing = False
        self.dropped = 0

    @classmethod
    def to_file(cls, path: str) -> AuditWriter:
        """Append to `path` (created as `open` would create it); raises OSError if it cannot be opened."""
        return cls(open(path, "ab", buffering=0), path)

    def write(self, line: str) -> None:
        """Queue one line (ASCII, ending in a newline)."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_BYTES or self._closed:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: write now
            self.flush()
            return
        if loop is not self._scheduled:  # (a loop that ended before its flush ran is not waited for)
            loop.call_soon(self._scheduled_flush)
            self._scheduled = loop

    def _scheduled_flush(self) -> None:
        self._scheduled = None
        self.flush()

    def flush(self) -> None:
        """Write every buffered line with one write; never raises."""
        if not self._lines:
            return
        pieces = [self._lines] if self._max_write is None else _pieces(self._lines, self._max_write)
        count = len(self._lines)
        self._lines = []
        self._size = 0
        try:
            stream = self._current()
            for piece in pieces:
                data = "".join(piece).encode("ascii")
                while data:
                    written = stream.write(data)
                    if not written:
                        raise BlockingIOError(errno.EAGAIN, "the audit log accepted nothing")
                    data = data[written:]
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: a closed stream
            self.dropped += count
            if not self._failing:
                self._failing = True
                log.error("cannot write the audit log (%s): dropping lines until it works again", exc)
            return
        if self._failing:
            self._failing = False
            log.warning("the audit log is written again; %d lines dropped so far", self.dropped)

    def _current(self) -> BinaryIO:
        """The stream to write to; a file whose path has moved (or that was closed) is reopened."""
        if self._path is not None:
            now = time.monotonic()
            if self._stream is None or now - self._checked >= _CHECK_SECONDS:
                self._checked = now
                self._reopen_if_moved(self._path)
        if self._stream is None:
            raise OSError(errno.EBADF, "the audit log is not open")
        return self._stream

    def _reopen_if_moved(self, path: str) -> None:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            pass  # moved or deleted: open a new file
        else:
            if self._stream is not None and (info.st_dev, info.st_ino) == self._identity:
                return
        self._close_file()
        stream = open(path, "ab", buffering=0)  # noqa: SIM115
        self._stream, self._identity = stream, _identity(stream)

    def close(self) -> None:
        """Write what is buffered and close the file. A line after this is written at once (reopening the file)."""
        self._closed = True
        self.flush()
        self._close_file()

    def _close_file(self) -> None:
        if self._path is not None and self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None


def _pieces(lines: list[str], limit: int) -> list[list[str]]:
    """Lines in groups of at most `limit` characters (a longer line alone)."""
    pieces: list[list[str]] = []
    size = limit + 1
    for line in lines:
        if size + len(line) > limit:
            pieces.append([])
            size = 0
        pieces[-1].append(line)
        size += len(line)
    return pieces


def _identity(stream: BinaryIO) -> tuple[int, int]:
    info = os.fstat(stream.fileno())
    return info.st_dev, info.st_ino


class AuditLog:
    """The listener: formats the line for one finished exchange and hands it to the writer."""

    __slots__ = ("_memo", "_redact", "_redactor", "_second", "_segments", "_stamp", "writer")

    def __init__(self, writer: AuditWriter, redactor: RedactingFilter) -> None:
        self.writer = writer
        self._redactor = redactor
        self._redact = redactor.redact
        self._memo: dict[str, str] = {}
        # The fields from principal to engine, encoded, by their values: they repeat from request to request
        # (one tuple look-up instead of six encodings and two redactions). Emptied as `_memo` is.
        self._segments: dict[tuple[str, str, str, str, str, str], str] = {}
        self._second = -1
        self._stamp = ""

    @contextlib.asynccontextmanager
    async def service(self) -> AsyncIterator[AuditLog]:
        """Lifespan service: at shutdown, the buffered lines are written and the file closed."""
        try:
            yield self
        finally:
            self.writer.close()

    def add_secret(self, value: str) -> None:
        """One more secret to redact, e.g. the key of an engine (re)started after the log was opened. Fields
        already redacted are forgotten: a memoised one may hold it in clear."""
        self._redactor.add_secret(value)
        self._memo.clear()
        self._segments.clear()

    def __call__(self, exchange: Exchange) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time to the second, formatted once a second
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        usage = exchange.usage
        latency, ttft = exchange.latency, exchange.ttft
        key = (
            exchange.principal_name,
            exchange.client_ip,
            exchange.method,
            exchange.path,
            exchange.model,
            exchange.engine,
        )
        segment = self._segments.get(key)
        if segment is None:
            segment = self._segment(*key)
        # What json.dumps(..., separators=(",", ":")) makes of the same dict, field by field, in this order.
        self.writer.write(
            f'{{"time":"{self._stamp}.{int(now % 1 * 1000):03d}Z"'
            f',"request_id":{_json_str(self._redact(exchange.request_id))}'
            f"{segment}"
            f',"stream":{"true" if exchange.stream else "false"}'
            f',"status":{exchange.status:d}'
            f',"outcome":{_json_str(exchange.outcome)}'
            f',"reason":{_json_str(exchange.reason)}'
            f',"latency_ms":{"null" if latency is None else repr(round(latency * 1000, 3))}'
            f',"ttft_ms":{"null" if ttft is None else repr(round(ttft * 1000, 3))}'
            f',"prompt_tokens":{"null" if usage is None else f"{usage.prompt_tokens:d}"}'
            f',"completion_tokens":{"null" if usage is None else f"{usage.completion_tokens:d}"}'
            # What tokens/min and the budgets were charged: the usage, or the estimate when none came back
            # (a client gone mid-stream): the line agrees with the ledger where usage is null.
            f',"charged_tokens":{charge(exchange)[0]:d}}}\n'
        )

    def _segment(self, principal: str, client_ip: str, method: str, path: str, model: str, engine: str) -> str:
        """The encoded fields from principal to engine (path and model cut and redacted), remembered."""
        segment = (
            f',"principal":{_json_str(principal)}'
            f',"client_ip":{_json_str(client_ip)}'
            f',"method":{_json_str(method)}'
            f',"path":{_json_str(self._client_field(path))}'
            f',"model":{_json_str(self._client_field(model))}'
            f',"engine":{_json_str(engine)}'
        )
        # Not remembered past the cut: the key would hold the whole path (any client's, up to the 64 KiB head),
        # _MEMO_SIZE of them. Keying by the cut values instead would cost two slices on every hit.
        if len(path) <= _MAX_FIELD and len(model) <= _MAX_FIELD:
            if len(self._segments) >= _MEMO_SIZE:
                self._segments.clear()
            self._segments[(principal, client_ip, method, path, model, engine)] = segment
        return segment

    def _client_field(self, text: str) -> str:
        """`text` cut to _MAX_FIELD characters and redacted."""
        text = text[:_MAX_FIELD]
        done = self._memo.get(text)
        if done is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            done = self._memo[text] = self._redact(text)
        return done


def audit_log(destination: str, secrets: Iterable[str] = (), *, shared: bool = False) -> AuditLog | None:
    """The listener for `destination` (stdout, off, or a file path); None when off.

    A file is opened for appending (a path that cannot be opened is a start-up error)
    and reopened when logrotate moves it. `secrets` (the upstream key, the metrics
    token) are redacted should they ever appear; keys minted later, with `add_secret`.
    `shared`: several worker processes write to the same stdout, so each write is at most
    PIPE_BUF bytes of whole lines (atomic on a pipe). A file needs nothing: every write of
    whole lines with O_APPEND lands whole.
    """
    where = destination.strip()
    if where.lower() == "off" or not where:
        return None
    if where.lower() == "stdout":
        writer = AuditWriter(sys.stdout.buffer, max_write=select.PIPE_BUF if shared else None)
    else:
        try:
            writer = AuditWriter.to_file(where)
        except OSError as exc:
            raise ValueError(f"cannot open the audit log {where!r}: {exc.strerror}") from None
    redactor = RedactingFilter()
    for secret in secrets:
        redactor.add_secret(secret)
    return AuditLog(writer, redactor)
