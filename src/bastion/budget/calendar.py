"""When periods start and reset: calendar day, ISO week, month, in UTC or a configured zone.

Every function takes `now` (Unix seconds), so tests cross a boundary by choosing
the time. Boundaries are local midnights of the zone (`zoneinfo`), so a day is
23 or 25 hours across a DST change. Usage is rolled up by local hour: an hour
always lies inside one day, week and month. `Calendar.at` caches the current
hour's answer, so a request pays for zone arithmetic once an hour, not each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .policy import PERIODS, Period

HOUR = 3600


def zone(name: str) -> ZoneInfo:
    """A zone by IANA name ("UTC", "Europe/Paris"); ValueError naming it if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as UTC or Europe/Paris)") from None


@dataclass(frozen=True, slots=True)
class Windows:
    """The periods around one instant: starts and resets per period (day, week, month), as Unix seconds."""

    hour: int  # start of the local hour: the roll-up bucket
    hour_end: int
    starts: tuple[int, int, int]
    resets: tuple[int, int, int]
    reset_texts: tuple[str, str, str]  # ISO 8601 in the zone, for headers and messages

    def start(self, period: Period) -> int:
        return self.starts[period.ordinal]

    def reset(self, period: Period) -> int:
        return self.resets[period.ordinal]


class Calendar:
    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._cached: Windows | None = None

    def at(self, now: float) -> Windows:
        cached = self._cached
        if cached is not None and cached.hour <= now < cached.hour_end:
            return cached
        windows = self._compute(now)
        self._cached = windows
        return windows

    def _compute(self, now: float) -> Windows:
        local = datetime.fromtimestamp(now, self.tz)
        hour = int(local.replace(minute=0, second=0, microsecond=0).timestamp())
        today = local.date()
        bounds = [period_bounds(period, today) for period in PERIODS]
        starts = tuple(self.midnight(start) for start, _ in bounds)
        resets = tuple(self.midnight(end) for _, end in bounds)
        texts = tuple(self.text(reset) for reset in resets)
        return Windows(hour, hour + HOUR, starts, resets, texts)  # type: ignore[arg-type]

    def midnight(self, day: date) -> int:
        return int(datetime(day.year, day.month, day.day, tzinfo=self.tz).timestamp())

    def text(self, at: float) -> str:
        """ISO 8601 with the zone's offset, e.g. 2025-06-02T00:00:00+02:00."""
        return datetime.fromtimestamp(at, self.tz).isoformat()

    def hour_of(self, now: float) -> int:
        return self.at(now).hour

    def day_of(self, hour: int) -> str:
        """The local date of an hour bucket (`bastion usage --by day`)."""
        return datetime.fromtimestamp(hour, self.tz).date().isoformat()


def period_bounds(period: Period, today: date) -> tuple[date, date]:
    """First day of the period holding `today`, and the first day of the next one."""
    if period is Period.DAY:
        return today, today + timedelta(days=1)
    if period is Period.WEEK:
        monday = today - timedelta(days=today.weekday())
        return monday, monday + timedelta(days=7)
    first = today.replace(day=1)
    return first, (first + timedelta(days=32)).replace(day=1)
