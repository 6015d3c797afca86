"""The budget ledger in memory and on a real SQLite file: reserve, settle, release, periods, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

import pytest

from bastion.budget.calendar import Calendar, zone
from bastion.budget.ledger import Admitted, Ledger, Refused
from bastion.budget.policy import Budget, Period
from bastion.budget.sqlite import SQLiteJournal, UsageDB, UsageDBError

DAY = 86400
UTC = Calendar(zone("UTC"))
DAILY = (Budget(Period.DAY, 1000),)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


NOW = ts("2025-06-04T10:20:00+00:00")


@contextlib.asynccontextmanager
async def running(
    kind: str, path: Path, clock: Callable[[], float] = lambda: NOW, retention_days: int = 400
) -> AsyncIterator[Ledger]:
    journal = SQLiteJournal(path / "usage.sqlite3") if kind == "sqlite" else None
    ledger = Ledger(Calendar(zone("UTC")), journal, retention=retention_days * DAY, clock=clock)
    async with ledger.running():
        yield ledger


@pytest.fixture(params=["memory", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def spend(ledger: Ledger, tokens: int, now: float = NOW, model: str = "qwen", who: str = "k1") -> None:
    verdict = await ledger.reserve(who, model, tokens, DAILY, now)
    assert isinstance(verdict, Admitted), verdict
    await ledger.settle(verdict.reservation, tokens)


async def test_daily_budget_refuses_once_spent_with_the_reset(kind: str, tmp_path: Path) -> None:
    async with running(kind, tmp_path) as ledger:
        first = await ledger.reserve("k1", "qwen", 400, DAILY, NOW)
        assert isinstance(first, Admitted)
        assert first.tightest is not None
        assert (first.tightest.remaining, first.tightest.reset_text) == (600, "2025-06-05T00:00:00+00:00")
        await ledger.settle(first.reservation, 400)
        await spend(ledger, 600)
        refused = await ledger.reserve("k1", "qwen", 1, DAILY, NOW)
        assert isinstance(refused, Refused)
        assert (refused.budget, refused.used, refused.reset) == (DAILY[0], 1000, ts("2025-06-05T00:00:00+00:00"))
        assert refused.reset_text == "2025-06-05T00:00:00+00:00"
        assert isinstance(await ledger.reserve("k2", "qwen", 1, DAILY, NOW), Admitted)  # others unaffected


async def test_a_reservation_that_does_not_fit_is_refused_before_the_budget_is_spent(kind: str, tmp_path: Path) -> None:
    async with running(kind, tmp_path) as ledger:
        await spend(ledger, 900)
        refused = await ledger.reserve("k1", "qwen", 200, DAILY, NOW)
        assert isinstance(refused, Refused) and refused.used == 900 and refused.tokens == 200
        fits = await ledger.reserve("k1", "qwen", 100, DAILY, NOW)
        assert isinstance(fits, Admitted) and fits.standings[0].remaining == 0


async def test_fifty_concurrent_reservations_never_overshoot(kind: str, tmp_path: Path) -> None:
    async with running(kind, tmp_path) as ledger:

        async def one() -> bool:
            verdict = await ledger.reserve("k1", "qwen", 30, DAILY, NOW)
            if isinstance(verdict, Refused):
                return False
            await asyncio.sleep(0.01)  # in flight while the others arrive
            await ledger.settle(verdict.reservation, 30)
            return True

        admitted = sum(await asyncio.gather(*(one() for _ in range(50))))
        assert admitted == 33  # 33 x 30 = 990 <= 1000 < 34 x 30
        report = await ledger.usage("k1", DAILY, NOW)
        assert (report.periods[0].used, report.periods[0].reserved, report.periods[0].remaining) == (990, 0, 10)


async def test_settle_replaces_the_reservation_and_release_returns_it(kind: str, tmp_path: Path) -> None:
    async with running(kind, tmp_path) as ledger:
        held = await ledger.reserve("k1", "qwen", 800, DAILY, NOW)
        assert isinstance(held, Admitted)
        assert isinstance(await ledger.reserve("k1", "qwen", 300, DAILY, NOW), Refused)
        report = await ledger.usage("k1", DAILY, NOW)
        assert (report.periods[0].used, report.periods[0].reserved) == (0, 800)
        await ledger.settle(held.reservation, 120)  # the engine used far less than max_tokens
        again = await ledger.reserve("k1", "qwen", 880, DAILY, NOW)
        assert isinstance(again, Admitted)
        await ledger.release(again.reservation)  # the upstream failed: nothing generated
        report = await ledger.usage("k1", DAILY, NOW)
        assert (report.periods[0].used, report.periods[0].reserved, report.periods[0].remaining) == (120, 0, 880)
        assert report.by_model == {"qwen": (120, 120, 120)}


async def test_model_budget_applies_to_that_model_only(kind: str, tmp_path: Path) -> None:
    budgets = (Budget(Period.DAY, 1000), Budget(Period.DAY, 100, "qwen"))
    async with running(kind, tmp_path) as ledger:
        first = await ledger.reserve("k1", "qwen", 80, budgets, NOW)
        assert isinstance(first, Admitted)
        assert first.tightest is not None and first.tightest.budget == budgets[1]
        refused = await ledger.reserve("k1", "qwen", 30, budgets, NOW)
        assert isinstance(refused, Refused) and refused.budget == budgets[1]
        other = await ledger.reserve("k1", "llama", 30, budgets, NOW)
        assert isinstance(other, Admitted)
        assert [s.budget for s in other.standings] == [budgets[0]]
        report = await ledger.usage("k1", budgets, NOW)
        rows = [(p.period, p.model, p.reserved, p.limit) for p in report.periods]
        assert rows[:2] == [(Period.DAY, None, 110, 1000), (Period.DAY, "qwen", 80, 100)]


async def test_the_day_boundary(kind: str, tmp_path: Path) -> None:
    """23:59:59 is day 1 (and stays day 1's however long the request runs); 00:00:00 is day 2."""
    last_second = ts("2025-06-04T23:59:59+00:00")
    midnight = ts("2025-06-05T00:00:00+00:00")
    monthly = (*DAILY, Budget(Period.MONTH, 1500))
    async with running(kind, tmp_path, clock=lambda: last_second) as ledger:
        late = await ledger.reserve("k1", "qwen", 1000, monthly, last_second)
        assert isinstance(late, Admitted)
        assert late.tightest is not None and late.tightest.reset_text == "2025-06-05T00:00:00+00:00"
        refused = await ledger.reserve("k1", "qwen", 1, monthly, last_second)
        assert isinstance(refused, Refused) and refused.reset == midnight
        early = await ledger.reserve("k1", "qwen", 400, monthly, midnight)  # a new day, the same month
        assert isinstance(early, Admitted)
        day = next(s for s in early.standings if s.budget.period is Period.DAY)
        assert (day.remaining, day.reset_text) == (600, "2025-06-06T00:00:00+00:00")
        await ledger.settle(late.reservation, 1000)  # settled after midnight: still day 1's
        report = await ledger.usage("k1", monthly, midnight)
        by_period = {(p.period, p.model): p for p in report.periods}
        assert (by_period[Period.DAY, None].used, by_period[Period.DAY, None].reserved) == (0, 400)
        assert by_period[Period.MONTH, None].used == 1000
        month_full = await ledger.reserve("k1", "qwen", 200, monthly, midnight)
        assert isinstance(month_full, Refused) and month_full.budget.period is Period.MONTH
        assert month_full.reset_text == "2025-07-01T00:00:00+00:00"
    if kind == "sqlite":
        db = UsageDB(tmp_path / "usage.sqlite3", readonly=True)
        assert db.rows(0) == [("k1", "qwen", int(ts("2025-06-04T23:00:00+00:00")), 1000)]
        db.close()


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    async with running("sqlite", tmp_path) as ledger:
        await spend(ledger, 700)
        await spend(ledger, 50, model="llama", who="k2")
    async with running("sqlite", tmp_path) as ledger:
        assert isinstance(await ledger.reserve("k1", "qwen", 301, DAILY, NOW), Refused)
        assert isinstance(await ledger.reserve("k1", "qwen", 300, DAILY, NOW), Admitted)
        report = await ledger.usage("k2", DAILY, NOW)
        assert report.periods[0].used == 50 and report.by_model == {"llama": (50, 50, 50)}
    async with running("sqlite", tmp_path, clock=lambda: NOW + DAY) as ledger:  # the next day: a new budget
        assert isinstance(await ledger.reserve("k1", "qwen", 1000, DAILY, NOW + DAY), Admitted)
        report = await ledger.usage("k1", DAILY, NOW + DAY)
        assert [p.used for p in report.periods] == [0, 700, 700]  # week and month remember


async def test_usage_is_rolled_up_per_hour_and_written_in_batches_off_the_loop(tmp_path: Path) -> None:
    async with running("sqlite", tmp_path) as ledger:
        for _ in range(200):
            await spend(ledger, 2)
        await spend(ledger, 5, now=NOW + 3600)
        db = UsageDB(tmp_path / "usage.sqlite3", readonly=True)
        assert db.rows(0) == []  # nothing written per request
        await ledger.flush()
        assert any(t.name.startswith("bastion-usage-db") for t in threading.enumerate())  # the writer thread
        hour = int(ts("2025-06-04T10:00:00+00:00"))
        assert db.rows(0) == [("k1", "qwen", hour, 400), ("k1", "qwen", hour + 3600, 5)]
        await spend(ledger, 1)
        db.close()
    db = UsageDB(tmp_path / "usage.sqlite3", readonly=True)
    assert db.rows(0)[0] == ("k1", "qwen", hour, 401)  # flushed at shutdown
    db.close()


async def test_retention_deletes_old_rollups(tmp_path: Path) -> None:
    db = UsageDB(tmp_path / "usage.sqlite3")
    old, kept = int(NOW - 45 * DAY) // 3600 * 3600, int(NOW - 39 * DAY) // 3600 * 3600
    db.add([("k1", "qwen", old, 5), ("k1", "qwen", kept, 7)])
    db.close()
    async with running("sqlite", tmp_path, retention_days=40):
        pass
    db = UsageDB(tmp_path / "usage.sqlite3", readonly=True)
    assert db.rows(0) == [("k1", "qwen", kept, 7)]
    db.close()


async def test_a_second_gateway_on_the_same_file_is_refused(tmp_path: Path) -> None:
    async with running("sqlite", tmp_path):
        with pytest.raises(UsageDBError, match=r"in use by another gateway process.*BASTION_REDIS_URL"):
            async with running("sqlite", tmp_path):
                pass
    async with running("sqlite", tmp_path):  # released at shutdown
        pass


async def test_a_failed_write_is_kept_and_retried(tmp_path: Path) -> None:
    async with running("sqlite", tmp_path) as ledger:
        await spend(ledger, 10)
        journal = ledger._journal
        assert isinstance(journal, SQLiteJournal)
        db = journal._opened()
        # Every write now fails, as on a full or read-only disk (run on the journal's thread: SQLite's rule).
        await journal._run(lambda: db._db.execute("PRAGMA query_only = ON"))
        await ledger.flush()
        assert ledger.flush_errors == 1
        await journal._run(lambda: db._db.execute("PRAGMA query_only = OFF"))
        await ledger.flush()
    db = UsageDB(tmp_path / "usage.sqlite3", readonly=True)
    assert db.rows(0)[0][3] == 10
    db.close()


def test_open_ledger_picks_the_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bastion.budget.options import BudgetOptions, open_ledger
    from bastion.budget.redis_ledger import RedisLedger
    from bastion.redisio import Redis

    on_file = open_ledger(BudgetOptions(db=tmp_path / "usage.sqlite3", db_is_default=True))
    assert isinstance(on_file, Ledger) and isinstance(on_file._journal, SQLiteJournal)
    beside_missing = open_ledger(BudgetOptions(db=tmp_path / "nope" / "usage.sqlite3", db_is_default=True))
    assert isinstance(beside_missing, Ledger) and beside_missing._journal is None
    assert "usage is kept in memory only" in caplog.text and "BASTION_BUDGET_DB" in caplog.text
    chosen = open_ledger(BudgetOptions(db=tmp_path / "new" / "usage.sqlite3"))  # set by the operator: created
    assert isinstance(chosen, Ledger) and isinstance(chosen._journal, SQLiteJournal)
    url = "redis://127.0.0.1:1/0"
    shared = open_ledger(BudgetOptions(db=tmp_path / "usage.sqlite3", redis_url=url), redis=Redis.from_url(url, 1))
    assert isinstance(shared, RedisLedger)
    with pytest.raises(TypeError):  # the process's one client is passed in, never opened a second time here
        open_ledger(BudgetOptions(redis_url=url))
