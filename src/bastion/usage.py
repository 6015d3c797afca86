"""Reading token usage out of responses without parsing them.

The proxy forwards bytes untouched. To account tokens it only needs the `usage`
object, which vLLM puts at the end of a JSON body or in the last event of a
stream. `find_usage` locates it with a byte search and decodes just that object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_USAGE_KEY = b'"usage":'
_EVENT_END = b"\n\n"
_DECODER = json.JSONDecoder()
# An SSE event is held back only while incomplete; past this size a stream that is
# not SSE-shaped is flushed as it is rather than buffered.
MAX_PENDING_EVENT = 1 << 20


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def find_usage(data: bytes) -> Usage | None:
    """The last non-null `"usage": {...}` object in `data`, or None."""
    end = len(data)
    while True:
        at = data.rfind(_USAGE_KEY, 0, end)
        if at < 0:
            return None
        start = at + len(_USAGE_KEY)
        text = data[start : start + 512].decode("utf-8", "replace").lstrip()
        try:
            value, _ = _DECODER.raw_decode(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return Usage(
                prompt_tokens=_int(value.get("prompt_tokens")),
                completion_tokens=_int(value.get("completion_tokens")),
            )
        end = at


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


class StreamTap:
    """Watches an SSE stream for its usage event, optionally removing it.

    `feed` returns the bytes to forward now. Complete events pass through
    untouched in the same write; only an unfinished trailing event is held until
    its blank line arrives (a client cannot use half an event anyway). The usage
    event is removed only when `strip_usage` is set, i.e. when the gateway asked
    for usage on the client's behalf.
    """

    __slots__ = ("_pending", "strip_usage", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(_EVENT_END)
        if cut < 0:
            if len(data) > MAX_PENDING_EVENT:
                self._pending = b""
                return data
            self._pending = data
            return b""
        cut += len(_EVENT_END)
        complete, self._pending = data[:cut], data[cut:]
        if _USAGE_KEY in complete:
            complete = self._take_usage(complete)
        return complete

    def flush(self) -> bytes:
        """Whatever is still held when the stream ends."""
        rest, self._pending = self._pending, b""
        return rest

    def _take_usage(self, events: bytes) -> bytes:
        # The usual case: one usage event, the last in the block; found and cut out without
        # splitting every event of the block (at high token rates a block holds dozens).
        at = events.rfind(_USAGE_KEY)
        before = events.rfind(_EVENT_END, 0, at)
        start = 0 if before < 0 else before + len(_EVENT_END)
        end = events.find(_EVENT_END, at) + len(_EVENT_END)
        event = events[start:end]
        if events.find(_USAGE_KEY, 0, start) < 0 and (usage := find_usage(event)) is not None:
            self.usage = usage
            if self.strip_usage and b'"choices":[]' in event:
                return events[:start] + events[end:]
            return events
        kept: list[bytes] = []
        for event in events.split(_EVENT_END)[:-1]:
            usage = find_usage(event) if _USAGE_KEY in event else None
            if usage is not None:
                self.usage = usage
                if self.strip_usage and b'"choices":[]' in event:
                    continue
            kept.append(event + _EVENT_END)
        return b"".join(kept)
