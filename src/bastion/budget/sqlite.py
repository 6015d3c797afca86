"""Usage roll-ups in one SQLite file: a row per (principal, model, local hour), never per request.

A gateway writes it from a single thread of its own (`SQLiteJournal`), never from
the event loop, in batches (the ledger flushes every second and at shutdown).
The file is in WAL mode, so `bastion usage` and `sqlite3 .backup` read it while
the gateway writes. One gateway process per file: the ledger's totals live in
that process, so a second gateway on the same file would enforce budgets of its
own; an exclusive lock beside the file (`<file>.lock`) refuses it at start.

Size: principals x models x hours. 100 keys on 2 models all day every day is
1.75 million rows a year (~100 MB); `BASTION_USAGE_RETENTION_DAYS` bounds it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .ledger import Row

T = TypeVar("T")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    principal TEXT NOT NULL,
    model TEXT NOT NULL,
    hour INTEGER NOT NULL,  -- start of the local hour, Unix seconds
    tokens INTEGER NOT NULL,
    PRIMARY KEY (principal, model, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_hour ON usage (hour);
"""
_ADD = (
    "INSERT INTO usage (principal, model, hour, tokens) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (principal, model, hour) DO UPDATE SET tokens = tokens + excluded.tokens"
)
BUSY_TIMEOUT = 5.0  # seconds a write waits for a reader's lock (a backup) before failing


class UsageDBError(RuntimeError):
    """The usage file cannot be used; the message names it and says why."""


class UsageDBBusy(UsageDBError):
    """Another gateway process holds the usage file (its lock)."""


class UsageDB:
    """A connection to the usage file. Used from one thread only (SQLite's rule, kept by the journal)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                uri = path.resolve().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
                self._schema_version()  # reads the header: a file that is not a database says so here
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise UsageDBError(f"usage database {path}: {exc}") from None

    def _schema_version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise UsageDBError(f"usage database {self.path} was written by a newer bastion (schema {version})")
        return version

    def _migrate(self) -> None:
        self._schema_version()
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def rows(self, since: int, principal: str | None = None) -> list[Row]:
        query = "SELECT principal, model, hour, tokens FROM usage WHERE hour >= ?"
        params: tuple[object, ...] = (since,)
        if principal is not None:
            query += " AND principal = ?"
            params += (principal,)
        try:
            found = self._db.execute(query + " ORDER BY hour", params).fetchall()
            return [(str(p), str(m), int(h), int(t)) for p, m, h, t in found]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # an empty file: nothing recorded yet
            raise UsageDBError(f"usage database {self.path}: {exc}") from None
        except sqlite3.Error as exc:  # a file damaged past its header
            raise UsageDBError(f"usage database {self.path}: {exc}") from None

    def add(self, rows: list[Row]) -> None:
        with self._transaction():
            self._db.executemany(_ADD, rows)

    def prune(self, before: int) -> int:
        with self._transaction():
            return self._db.execute("DELETE FROM usage WHERE hour < ?", (before,)).rowcount

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


class SQLiteJournal:
    """The ledger's journal on a UsageDB, every call on one writer thread (never the event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-usage-db")
        self._db: UsageDB | None = None
        self._lock_fd: int | None = None

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def open(self, since: int) -> list[Row]:
        return await self._run(lambda: self._open(since))

    def _open(self, since: int) -> list[Row]:
        self._lock_fd = _lock(self.path)
        try:
            self._db = UsageDB(self.path)
            return self._db.rows(since)
        except BaseException:
            self._close()
            raise

    async def write(self, rows: list[Row]) -> None:
        db = self._opened()
        await self._run(lambda: db.add(rows))

    async def prune(self, before: int) -> int:
        db = self._opened()
        return await self._run(lambda: db.prune(before))

    async def close(self) -> None:
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _opened(self) -> UsageDB:
        if self._db is None:
            raise UsageDBError(f"usage database {self.path} is not open")
        return self._db


def check_free(path: Path, *, lock: bool = True) -> None:
    """Raise UsageDBError (one line) if another gateway process holds `path` (UsageDBBusy; not checked with
    `lock=False`), or if it is there and not a usage database bastion can read (another file named by mistake, a
    damaged one): checked before `serve` starts."""
    if lock:
        os.close(_lock(path))
    if path.exists():
        try:
            UsageDB(path, readonly=True).close()
        except UsageDBError as exc:
            raise UsageDBError(f"{exc}; name a new file (it starts empty) or restore this one from a backup") from None


def _lock(path: Path) -> int:
    """An exclusive lock beside the file for this process's lifetime; UsageDBError if another holds it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UsageDBError(f"usage database {path}: cannot create {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageDBBusy(
            f"usage database {path} is in use by another gateway process; budgets kept in one file work for "
            "one process only: give each its own BASTION_BUDGET_DB, or share budgets with BASTION_REDIS_URL"
        ) from None
    return fd
