"""Finding structure in JSON bytes without decoding them: bounded, and at C speed where it matters.

Two readers share one idea: outside strings, JSON's structure is its brackets, and a
string ends at the first quote that no backslash escapes. Both work on `bytes` with
`find`/`count`/`split` (C loops), never a Python loop per byte.

- `Members` walks a request body's top-level object and returns where each member's
  value lies, so a large body is never `json.loads`-ed whole (a 16 MiB body of small
  arrays costs ~1 s and ~430 MB that way). It does one step of Python work per string
  (and C work between strings, counted in steps too), in bursts the caller spreads over
  event-loop turns, and gives up past a budget of steps (a legitimate body has far fewer).
- `Depth` follows nesting depth and string state across the chunks of a response, so a
  `"usage"` key can be told apart from one nested deeper; the usage readers build on it.

Neither validates what it skips (a body they accept but that is not JSON is refused by the
model server's own parser), but `Members` refuses anything after the top-level object, so
no parser can read a different first object. For valid JSON they read what `json.loads`
reads: the last of duplicate keys, keys written with escapes decoded.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from itertools import accumulate, count
from typing import Any

_BACKSLASH = 0x5C
_COLON = 0x3A
_CLOSE = 0x7D
# For `bytes.translate`: opening brackets become 2, closing ones 0, everything else is deleted.
_BRACKET_STEPS = bytes(2 if b in b"{[" else 0 for b in range(256))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")
_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_GAP_SLICE = 64 * 1024  # string-free bytes counted per step


class Malformed(ValueError):
    """Not a JSON object, or broken in a way the scan sees (an unterminated string, unbalanced brackets)."""


class TooComplex(ValueError):
    """More strings and brackets than the step budget allows."""


@dataclass(frozen=True, slots=True)
class Span:
    """Where a member's value lies in the body: `body[start:end]`."""

    start: int
    end: int


class Members:
    """The top-level members of the JSON object in `body`: `run(steps)` until it returns True.

    Afterwards `spans()` gives the value span of each wanted key (the last one of
    duplicates, as `json.loads` keeps). A step is one string, one escaped quote, or 256
    bytes between strings (about the same time); past `budget` steps `run` raises
    `TooComplex`. Text after the object is refused, as `json.loads` refuses it (a lenient
    parser upstream that reads only a first object must never see another request than
    the gateway did).
    """

    __slots__ = ("_body", "_budget", "_depth", "_final", "_keys", "_opened", "_pos", "_steps", "_wanted", "done")

    def __init__(self, body: bytes, wanted: frozenset[str], budget: int) -> None:
        self._body = body
        self._wanted = wanted
        self._budget = budget
        self._steps = 0
        self._keys: list[tuple[int, int, int]] = []  # (opening quote, closing quote + 1, value start)
        self.done = False
        start = skip_whitespace(body, 0)
        self._final = last_byte(body, 0, len(body))  # the object's closing brace
        if body[start : start + 1] != b"{" or self._final <= start or body[self._final] != _CLOSE:
            raise Malformed("not a JSON object")
        self._pos = start + 1
        self._depth = 1
        self._opened = -1  # the opening quote of the string being read, -1 outside strings

    def run(self, steps: int) -> bool:
        """Scan on for at most about `steps` steps; True once the whole object was read."""
        if self.done:
            return True
        body = self._body
        final = self._final
        pos, depth, opened = self._pos, self._depth, self._opened
        limit = self._steps + steps
        try:
            while self._steps < limit:
                self._steps += 1
                if self._steps > self._budget:
                    raise TooComplex(f"more than {self._budget} strings and brackets")
                if opened >= 0:  # inside a string: does the next quote close it?
                    quote = body.find(b'"', pos, final)
                    if quote < 0:
                        raise Malformed("unterminated string")
                    self._steps += (quote - pos) >> 12
                    if body[quote - 1] == _BACKSLASH and _backslashes_before(body, pos, quote) % 2:
                        pos = quote + 1  # an escaped quote
                        continue
                    pos = quote + 1
                    if depth == 1:
                        after = skip_whitespace(body, pos)
                        if body[after] == _COLON:
                            self._keys.append((opened, pos, after + 1))
                    opened = -1
                    continue
                # Between strings: up to the next quote, the closing brace, or one slice of a longer stretch.
                sliced = final - pos > _GAP_SLICE
                quote = body.find(b'"', pos, pos + _GAP_SLICE if sliced else final)
                gap_end = quote if quote >= 0 else pos + _GAP_SLICE if sliced else final
                if quote < 0 and sliced:
                    quote = -2  # the next step goes on with the stretch
                depth = self._gap(pos, gap_end, depth)
                pos = gap_end
                if quote == -1:  # the whole object is read: only its closing brace is left
                    if depth != 1:
                        raise Malformed("unbalanced brackets")
                    self.done = True
                    return True
                if quote >= 0:
                    opened, pos = quote, quote + 1
            return False
        finally:
            self._pos, self._depth, self._opened = pos, depth, opened

    def _gap(self, start: int, end: int, depth: int) -> int:
        """The depth after `body[start:end]`, a stretch outside strings; Malformed if the object closes in it."""
        body = self._body
        closes = body.count(b"}", start, end) + body.count(b"]", start, end)
        opens = body.count(b"{", start, end) + body.count(b"[", start, end)
        self._steps += (end - start) >> 8  # five C passes over 256 bytes cost about one string step
        # Only a `}` can close the object. If it might here, follow the depth bracket by bracket (in C).
        if closes >= depth and body.find(b"}", start, end) >= 0:
            brackets = body[start:end].translate(_BRACKET_STEPS, _NOT_BRACKETS)
            self._steps += len(brackets) >> 3
            # Opening brackets are 2, closing 0: after k brackets the depth is depth + sum - k.
            if depth + min(map(operator.sub, accumulate(brackets), count(1))) < 1:
                raise Malformed("text after the object")
        return depth + opens - closes

    def spans(self) -> dict[str, Span]:
        """Wanted key -> its value's span (whitespace excluded); call once `run` returned True."""
        body = self._body
        keys = self._keys
        found: dict[str, Span] = {}
        for index, (quote, end, value) in enumerate(keys):
            name = _key(body, quote, end)
            if name not in self._wanted:
                continue
            # The value ends at the comma before the next member's key, or at the closing brace.
            stop = self._final if index + 1 == len(keys) else body.rfind(b",", value, keys[index + 1][0])
            start = skip_whitespace(body, value)
            if stop <= start:
                raise Malformed("a member without a value")
            found[name] = Span(start, last_byte(body, start, stop) + 1)
        return found


def skip_whitespace(body: bytes, pos: int) -> int:
    """The first index at or after `pos` that is not JSON whitespace (C speed even for a long run)."""
    end = _WHITESPACE.match(body, pos, pos + 64).end()  # type: ignore[union-attr]
    if end < pos + 64 or end >= len(body):
        return end
    return len(body) - len(body[end:].lstrip(b" \t\r\n"))


def last_byte(body: bytes, start: int, stop: int) -> int:
    """The index of the last byte in `body[start:stop]` that is not JSON whitespace; `start - 1` if none."""
    tail = body[max(start, stop - 64) : stop].rstrip(b" \t\r\n")
    if tail or stop - start <= 64:
        return max(start, stop - 64) + len(tail) - 1
    return start + len(body[start:stop].rstrip(b" \t\r\n")) - 1


def _backslashes_before(body: bytes, start: int, end: int) -> int:
    """How many backslashes end `body[start:end]` (counted in C, 64 KiB at a time, for a hostile run)."""
    run = 0
    while end > start:
        window = max(start, end - _GAP_SLICE)
        if body.count(b"\\", window, end) < end - window:
            return run + (end - window) - len(body[window:end].rstrip(b"\\"))
        run += end - window
        end = window
    return run


def _key(body: bytes, quote: int, end: int) -> str:
    raw = body[quote + 1 : end - 1]
    if b"\\" in raw:
        try:
            name: Any = json.loads(body[quote:end])
        except ValueError:
            raise Malformed("a key that is not a valid string") from None
        return str(name)
    return raw.decode("utf-8", "replace")


def _brackets(body: bytes, start: int, end: int) -> int:
    """Opening minus closing brackets in `body[start:end]` (a stretch outside strings)."""
    return (
        body.count(b"{", start, end)
        + body.count(b"[", start, end)
        - body.count(b"}", start, end)
        - body.count(b"]", start, end)
    )


class Depth:
    """Nesting depth and string state of a JSON text fed in pieces (`advance`), at C speed.

    Escape pairs are dropped first (`\\\\`, then `\\"`), so every quote left delimits a
    string and quote parity tells inside from outside; brackets are counted outside only.
    """

    __slots__ = ("depth", "escaped", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False  # the last byte fed was an unpaired backslash inside a string

    def advance(self, data: bytes) -> None:
        if self.escaped and data:
            data = data[1:]
            self.escaped = False
        if not data:
            return
        if b"\\" in data:
            data = data.replace(b"\\\\", b"")
            if data.endswith(b"\\"):
                self.escaped = True
                data = data[:-1]
            data = data.replace(b'\\"', b"")
        quotes = data.count(b'"')
        if quotes:
            parts = data.split(b'"')
            data = b"".join(parts[1::2] if self.in_string else parts[0::2])
            self.in_string ^= quotes % 2 == 1
        elif self.in_string:
            return
        self.depth += data.count(b"{") + data.count(b"[") - data.count(b"}") - data.count(b"]")


def valid_unicode(text: str) -> bool:
    """Whether a decoded string is valid Unicode: JSON's escapes can write a lone surrogate ("\\ud800"),
    which no file, database or metric label takes."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
