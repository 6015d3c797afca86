"""Which ledger a gateway (or `bastion usage`) uses, from plain values.

Redis when `redis_url` is set (several gateways share budgets exactly), else
SQLite at `db`, else memory only (usage then starts from zero at each start).
`Settings.budget_options()` fills this in; nothing here reads settings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..redisio.client import Redis
from .calendar import Calendar, zone
from .ledger import BudgetLedger, Ledger
from .policy import Budgets
from .sqlite import SQLiteJournal

log = logging.getLogger("bastion.budget")
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class BudgetOptions:
    defaults: Budgets = ()
    timezone: str = "UTC"
    db: Path | None = None
    db_is_default: bool = False  # chosen beside the key file, not set by the operator
    redis_url: str | None = None
    redis_timeout: float = 0.5
    retention_days: int = 400
    flush_interval: float = 1.0
    fail_open: bool = True

    @property
    def retention(self) -> float:
        return self.retention_days * DAY

    def calendar(self) -> Calendar:
        return Calendar(zone(self.timezone))


def open_ledger(
    options: BudgetOptions, clock: Callable[[], float] = time.time, *, redis: Redis | None = None
) -> BudgetLedger:
    """The ledger these options describe (not yet running: enter its `running()` at start-up).

    With `redis_url` set, `redis` is the process's client for that URL (shared with the rate limiter, built
    and closed by the caller): one connection per process, not one per user of Redis."""
    calendar = options.calendar()
    if options.redis_url is not None:
        if redis is None:
            raise TypeError("open_ledger: redis_url needs the process's Redis client (redis=...)")
        from .redis_ledger import RedisLedger  # the ledger's scripts: only Redis users load them

        return RedisLedger(redis, calendar, retention=options.retention, clock=clock)
    db = options.db
    if db is not None and options.db_is_default and not _writable_dir(db.parent):
        log.warning(
            "usage is kept in memory only: %s is not writable (set BASTION_BUDGET_DB to a writable file to keep "
            "usage and budget totals across restarts)",
            db.parent,
        )
        db = None
    if db is None:
        return Ledger(calendar, clock=clock)
    return Ledger(
        calendar, SQLiteJournal(db), flush_interval=options.flush_interval, retention=options.retention, clock=clock
    )


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
