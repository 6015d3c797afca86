"""`MemoryStorage`: the in-process storage behind bastion's limits (the strategies stay `limits`').

Why not `limits.aio.storage.MemoryStorage` (5.8)? At ~2,200 requests/s on one key
it cost ~100 µs per request, ~20 % of the gateway's CPU:

- a hit prepends to a Python list (`events[key][:0] = ...`): a full minute holds
  ~130,000 entries, so every request moved ~1 MB, and made an `Entry` object;
- every call took a per-key `asyncio.Lock`, and after each hit it started a new
  expiry task that ran a `bisect` in a thread (`asyncio.to_thread`) for every
  window: a thread-pool round trip per request or so;
- every method was wrapped (twice for the window methods) in an error-translating
  coroutine.

Here everything is synchronous inside the event loop thread (nothing awaits between
a read and its write, so no lock is needed): a moving window is an array of hit
times (`_Hits`), appended on the right and trimmed from the left on access (amortised O(1));
counters are `(count, expires at)` pairs. The answers are those of the library's
storage (tests/unit/test_limits_memory.py compares both under one clock), with one
exception that nothing reads: an empty moving window starts "now" rather than at
whichever expired entry the library has not trimmed yet. Memory stays bounded: at
most every `SWEEP_EVERY` seconds, on access, the windows whose every hit is older
than the window and the expired counters are dropped.
"""

from __future__ import annotations

import inspect
import time
from array import array
from itertools import repeat
from math import floor

from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

SWEEP_EVERY = 10.0  # seconds between sweeps of idle windows and expired counters

_ABSENT = (0, 0.0)  # a counter that does not exist: zero, long expired
_COMPACT_AFTER = 1024  # dropped hits kept at the front of a window's array until at least this many (and half)


class _Hits:
    """A moving window's hit times, oldest first, from `start` on in an array of doubles.

    Not a deque of floats: at ~2,000 requests/s one key's minute holds ~120,000 hits, which as
    float objects in a deque cost ~4 MB and every full garbage collection walked them (~13 ms each).
    An array holds no objects (the collector never looks inside) at 8 bytes a hit. Dropped hits
    are skipped by moving `start`; the array is compacted once they are over half of it.
    """

    __slots__ = ("expiry", "start", "times")

    def __init__(self, expiry: int) -> None:
        self.expiry = expiry  # seconds
        self.times = array("d")
        self.start = 0

    def __len__(self) -> int:
        return len(self.times) - self.start

    def trim(self, cutoff: float) -> None:
        """Drop the hits older than `cutoff` from the front."""
        times, start = self.times, self.start
        end = len(times)
        while start < end and times[start] < cutoff:
            start += 1
        if start >= _COMPACT_AFTER and start * 2 >= end:
            del times[:start]
            start = 0
        self.start = start

    def oldest_after(self, cutoff: float) -> tuple[float, int] | None:
        """(the first hit later than `cutoff`, hits from it on), or None if there is none."""
        times = self.times
        end = len(times)
        edge = self.start
        while edge < end and times[edge] <= cutoff:
            edge += 1
        return None if edge == end else (times[edge], end - edge)


class MemoryStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow):
    """Moving windows and counters with expiries, in this process (`async+bastion-memory://`)."""

    STORAGE_SCHEME = ["async+bastion-memory"]  # noqa: RUF012 (the type `limits` declares)

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: float | str | bool) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._windows: dict[str, _Hits] = {}
        self._counters: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)
        self._next_sweep = 0.0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError  # never raised: there is no backend to fail

    def _now(self) -> float:
        """The time (`time.time()`, which the strategies read too), sweeping first when one is due."""
        now = time.time()
        if now >= self._next_sweep or now < self._next_sweep - SWEEP_EVERY:  # due, or the clock went back
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        # Rebuilt rather than deleted from, so that a dict grown by a burst of keys shrinks again.
        self._windows = {key: w for key, w in self._windows.items() if len(w) and w.times[-1] >= now - w.expiry}
        self._counters = {key: c for key, c in self._counters.items() if c[1] > now}

    def has_window(self, key: str) -> bool:
        """Whether `key` has a moving window (possibly one with only expired hits, until the next sweep)."""
        return key in self._windows

    def size(self) -> int:
        """Windows and counters held (idle ones included until the next sweep)."""
        return len(self._windows) + len(self._counters)

    # --- moving window ------------------------------------------------------------------
    def _window(self, key: str, expiry: int, now: float) -> _Hits:
        """`key`'s hit times, those older than `expiry` seconds dropped."""
        hits = self._windows.get(key)
        if hits is None:
            hits = self._windows[key] = _Hits(expiry)
        hits.trim(now - expiry)
        return hits

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = self._now()
        hits = self._window(key, expiry, now)
        if len(hits) + amount > limit:
            return False
        if amount == 1:
            hits.times.append(now)
        else:
            hits.times.extend(repeat(now, amount))
        return True

    def acquire_with_window(self, key: str, limit: int, expiry: int) -> tuple[bool, float, int]:
        """`acquire_entry` of one hit then `get_moving_window` (what `MovingWindowRateLimiter.hit` then
        `get_window_stats` do) in one plain call on one clock reading: (acquired, window start, hits in it).
        The limiter's per-request path: two strategy calls cost four coroutines and the window trimmed twice."""
        now = self._now()
        hits = self._window(key, expiry, now)
        acquired = limit >= 1 and len(hits) < limit
        if acquired:
            hits.times.append(now)
        counted = hits.oldest_after(now - expiry)
        return (acquired, now, 0) if counted is None else (acquired, *counted)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(time of the oldest hit in the window, hits in it); (now, 0) for an empty window."""
        now = self._now()
        if key not in self._windows:
            return now, 0
        hits = self._window(key, expiry, now)
        # A hit exactly `expiry` old still blocks `acquire_entry` but is not counted here (as in `limits`).
        counted = hits.oldest_after(now - expiry)
        return (now, 0) if counted is None else counted

    # --- counters -----------------------------------------------------------------------
    def _get(self, key: str, now: float) -> int:
        count, expires = self._counters.get(key, _ABSENT)
        if expires <= now:
            self._counters.pop(key, None)
            return 0
        return count

    def _incr(self, key: str, expiry: float, amount: int, now: float) -> int:
        count, expires = self._counters.get(key, _ABSENT)
        if expires <= now:
            count = 0
        if count == 0:  # a fresh counter (or one decremented to zero) starts its expiry again
            expires = now + expiry
        count += amount
        self._counters[key] = (count, expires)
        return count

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        return self._incr(key, expiry, amount, self._now())

    def _decr(self, key: str, amount: int, now: float) -> int:
        count, expires = self._counters.get(key, _ABSENT)
        if expires <= now:
            self._counters.pop(key, None)
            return 0
        count = max(count - amount, 0)
        self._counters[key] = (count, expires)
        return count

    async def decr(self, key: str, amount: int = 1) -> int:
        """Decrement, down to 0 at most; the expiry is kept."""
        return self._decr(key, amount, self._now())

    async def get(self, key: str) -> int:
        return self._get(key, self._now())

    async def get_expiry(self, key: str) -> float:
        now = self._now()
        expires = self._counters.get(key, _ABSENT)[1]
        return expires if expires > now else now

    # --- sliding window counter (two counters: this window and the previous one) -------
    def _sliding_window(self, key: str, expiry: int, now: float) -> tuple[str, int, float, int, float]:
        """(current window's counter key, previous count, previous TTL, current count, current TTL)."""
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous_count = self._get(previous_key, now)
        current_count = self._get(current_key, now)
        previous_ttl = 0.0 if previous_count == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return current_key, previous_count, previous_ttl, current_count, current_ttl

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = self._now()
        current_key, previous_count, previous_ttl, current_count, _ = self._sliding_window(key, expiry, now)
        weighted = previous_count * previous_ttl / expiry
        if floor(weighted + current_count) + amount > limit:
            return False
        current_count = self._incr(current_key, 2 * expiry, amount, now)
        if floor(weighted + current_count) > limit:  # float rounding only: nothing ran in between
            self._decr(current_key, amount, now)
            return False
        return True

    def reserve_sliding_window(
        self, key: str, limit: int, expiry: int, amount: int
    ) -> tuple[bool, int, tuple[int, float, int, float]]:
        """Add `amount` if it fits under `limit`: (admitted, the window's index, the window after)."""
        now = self._now()
        current_key, previous_count, previous_ttl, current_count, current_ttl = self._sliding_window(key, expiry, now)
        weighted = previous_count * previous_ttl / expiry
        admitted = floor(weighted + current_count) + amount <= limit
        if admitted and amount:
            current_count = self._incr(current_key, 2 * expiry, amount, now)
        return admitted, int(now / expiry), (previous_count, previous_ttl, current_count, current_ttl)

    def settle_sliding_window(self, key: str, expiry: int, window: int, delta: int, actual: int) -> None:
        """Add `delta` to window `window`'s counter (never below 0) if it is still counted (this window
        or the previous one); otherwise charge `actual` into the current window."""
        now = self._now()
        current = int(now / expiry)
        counter = f"{key}/{window}"
        if window in (current, current - 1) and self._get(counter, now) > 0:
            if delta > 0:
                self._incr(counter, 2 * expiry, delta, now)
            elif delta < 0:
                self._decr(counter, -delta, now)
        elif actual > 0:
            self._incr(f"{key}/{current}", 2 * expiry, actual, now)

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self._sliding_window(key, expiry, self._now())[1:]

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        for counter in self.sliding_window_keys(key, expiry, self._now()):
            self._counters.pop(counter, None)

    # --- whole keys and the storage -----------------------------------------------------
    async def clear(self, key: str) -> None:
        self._counters.pop(key, None)
        self._windows.pop(key, None)

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        held = max(len(self._counters), len(self._windows))
        self._counters.clear()
        self._windows.clear()
        return held


# `limits` wraps each storage method in an error-translating coroutine (an extra coroutine per
# call, two for the window methods); nothing here raises a storage error, so take them back bare.
for _name, _method in list(vars(MemoryStorage).items()):
    if inspect.isfunction(_method) and hasattr(_method, "__wrapped__"):
        setattr(MemoryStorage, _name, inspect.unwrap(_method))
