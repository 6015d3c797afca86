"""`bastion usage` reports: hour roll-ups grouped by model, day or hour, as a table, JSON or CSV.

Pure functions over rows, so the SQLite file and Redis give the same report.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from .calendar import HOUR, Calendar
from .ledger import Row
from .policy import Period

By = Literal["model", "day", "hour"]
Format = Literal["table", "json", "csv"]
Entry = tuple[str, str, int]  # principal, model/day/hour, tokens
_AGO = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": HOUR, "d": 24 * HOUR, "w": 7 * 24 * HOUR}


def parse_since(text: str, calendar: Calendar, now: float) -> int:
    """`7d`, `12h`, `2w` ago (from the start of that hour); `day`, `week`, `month`: the current period's
    start; or an ISO date/time (in the budget time zone unless it carries an offset)."""
    text = text.strip().lower()
    if text in {p.value for p in Period}:
        return calendar.at(now).start(Period(text))
    ago = _AGO.match(text)
    if ago:
        return calendar.hour_of(now - int(ago.group(1)) * _UNITS[ago.group(2)])
    try:
        at = datetime.fromisoformat(text.upper() if "t" in text else text)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration (7d, 12h, 2w), day, week, month, or a date such as 2025-06-01"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=calendar.tz)
    return int(at.timestamp())


def aggregate(rows: Iterable[Row], by: By, calendar: Calendar) -> list[Entry]:
    totals: dict[tuple[str, str], int] = {}
    for principal, model, hour, tokens in rows:
        if by == "model":
            label = model
        elif by == "day":
            label = calendar.day_of(hour)
        else:
            label = calendar.text(hour)
        key = (principal, label)
        totals[key] = totals.get(key, 0) + tokens
    return [(principal, label, tokens) for (principal, label), tokens in sorted(totals.items())]


def render(entries: list[Entry], by: By, fmt: Format, *, since: str, timezone: str) -> str:
    if fmt == "json":
        document = {
            "object": "usage_report",
            "since": since,
            "timezone": timezone,
            "by": by,
            "data": [{"principal": p, by: label, "tokens": tokens} for p, label, tokens in entries],
            "total": sum(tokens for _, _, tokens in entries),
        }
        return json.dumps(document, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["principal", by, "tokens"])
        writer.writerows(entries)
        return out.getvalue()
    width = max([len("PRINCIPAL"), *(len(p) for p, _, _ in entries)])
    label_width = max([len(by), *(len(label) for _, label, _ in entries)])
    lines = [f"{'PRINCIPAL':<{width}}  {by.upper():<{label_width}}  {'TOKENS':>12}"]
    lines += [f"{p:<{width}}  {label:<{label_width}}  {tokens:>12}" for p, label, tokens in entries]
    total = sum(tokens for _, _, tokens in entries)
    lines.append(f"{'TOTAL':<{width}}  {'':<{label_width}}  {total:>12}")
    lines.append(f"(since {since}, {timezone})")
    return "\n".join(lines) + "\n"
