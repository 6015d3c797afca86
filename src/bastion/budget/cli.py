"""`bastion usage`: the operator's view of the store the gateway writes (SQLite file or Redis).

Reads the same roll-ups `GET /v1/usage` is built from, so a key's figures agree
(SQLite: once the gateway has flushed, within a second, or after it stopped).
The SQLite file is opened read-only: this runs safely beside a live gateway.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from ..config import Settings, load
from .calendar import Calendar
from .ledger import LedgerUnavailable, Row
from .options import BudgetOptions
from .report import By, Format, aggregate, parse_since, render
from .sqlite import UsageDB, UsageDBError


def register(commands: Any) -> None:
    """Add `usage` to bastion's subparsers."""
    usage = commands.add_parser(
        "usage",
        help="token usage per key, from the budget store (SQLite file or Redis)",
        description="Token usage per principal (key id, or jwt:<subject>) from hourly roll-ups.",
    )
    usage.add_argument("--key", metavar="ID", help="only this principal: a key id, or jwt:<subject> (default: all)")
    usage.add_argument(
        "--since",
        default="7d",
        help="7d, 12h, 2w, day/week/month (the current period), or a date such as 2025-06-01 (default: 7d)",
    )
    usage.add_argument("--by", choices=["model", "day", "hour"], default="model", help="group by (default: model)")
    usage.add_argument("--format", choices=["table", "json", "csv"], default="table", help="default: table")
    usage.add_argument("--db", metavar="PATH", help="SQLite usage file [BASTION_BUDGET_DB]")
    usage.set_defaults(handler=_usage)


def _say(message: str) -> None:
    print(f"bastion: {message}", file=sys.stderr)


def _usage(args: dict[str, Any]) -> int:
    settings = load(Settings, {"budget_db": args["db"]} if args.get("db") else {})  # ConfigError: main says it
    options = settings.budget_options()
    calendar = options.calendar()
    now = time.time()
    try:
        since = parse_since(args["since"], calendar, now)
    except ValueError as exc:
        _say(str(exc))
        return 2
    try:
        rows = _rows(options, calendar, since, args["key"], now)
    except UsageDBError as exc:
        _say(str(exc))
        return 1
    except LedgerUnavailable as exc:
        _say(f"{exc}; check BASTION_REDIS_URL (the gateway's) and that Redis runs")
        return 1
    if rows is None:
        return 2
    by: By = args["by"]
    fmt: Format = args["format"]
    text = render(aggregate(rows, by, calendar), by, fmt, since=calendar.text(since), timezone=options.timezone)
    sys.stdout.write(text)
    return 0


def _rows(options: BudgetOptions, calendar: Calendar, since: int, key: str | None, now: float) -> list[Row] | None:
    if options.redis_url is not None:
        from .redis_ledger import RedisLedger, connect  # only Redis users pay for its import

        client = connect(options.redis_url, max(options.redis_timeout, 5.0))
        ledger = RedisLedger(client, calendar)

        async def read() -> list[Row]:
            try:
                return await ledger.rows(since, key, now)
            finally:
                await client.aclose()

        return asyncio.run(read())
    if options.db is None:
        _say(
            "no usage store: set BASTION_BUDGET_DB (or BASTION_KEYS_FILE, beside which usage.sqlite3 is kept), "
            "or BASTION_REDIS_URL, as the gateway has them; or pass --db PATH"
        )
        return None
    if not options.db.exists():
        _say(f"usage database {options.db} does not exist: the gateway creates it at start (or pass --db PATH)")
        return None
    db = UsageDB(options.db, readonly=True)
    try:
        return db.rows(since, key)
    finally:
        db.close()
