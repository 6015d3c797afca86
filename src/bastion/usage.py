"""Reading token usage out of responses, in every shape, without parsing them.

The proxy forwards bytes untouched; to account tokens it only needs the `usage`
object. Where it sits depends on the route and on the engine:

- chat/completions and completions: `usage` with `prompt_tokens`/`completion_tokens`, at the
  top level of the body, or of the last event of a stream (vLLM writes `prompt_logprobs`,
  `prompt_token_ids`, `kv_transfer_params` after it, so it is not necessarily near the end);
- responses: `input_tokens`/`output_tokens`, in a stream inside the `response.completed`
  event (`{"type":"response.completed","response":{...,"usage":{...}}}`), or inside
  `response.incomplete` / `response.failed`, which end a stream the same way;
- embeddings: `prompt_tokens` and `total_tokens` only; anything else: `total_tokens`.

Only a `"usage"` key at the top level of the response object counts (one level down in a
Responses stream's last event): `jsonscan.Depth` follows nesting and string state, so a
`"usage"` inside generated text or a nested object is never taken. `BodyUsage` does this
over a body's chunks holding a few bytes between them; `StreamTap` over SSE events.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .jsonscan import Depth

USAGE_KEY = b'"usage":'
_KEY_TAIL = len(USAGE_KEY) - 1  # bytes at a chunk's end that may start a key the next chunk completes
EVENT_END = b"\n\n"  # what ends an event in an LF stream (vLLM, most servers)
CRLF_EVENT_END = b"\r\n\r\n"  # ... in a CRLF stream (SSE allows it; some external upstreams send it)
# The events that end a Responses stream with its usage: vLLM always ends with `completed`; OpenAI's API (an
# external upstream) ends a response cut at `max_output_tokens` with `incomplete`, a failed one with `failed`.
_RESPONSE_END = re.compile(rb'"type":\s*"response\.(?:completed|incomplete|failed)"')
_NO_CHOICES = re.compile(rb'"choices":\s*\[\s*\]')  # the usage-only event (vLLM writes no spaces; others may)
_DECODER = json.JSONDecoder()
MAX_USAGE_OBJECT = 4096  # bytes of a usage object decoded at most
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


def usage_from(value: object) -> Usage | None:
    """A decoded usage object in any of its shapes; None when it holds no token count."""
    if not isinstance(value, dict):
        return None
    prompt = _count(value.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(value.get("input_tokens"))
    completion = _count(value.get("completion_tokens"))
    if completion is None:
        completion = _count(value.get("output_tokens"))
    total = _count(value.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    usage = Usage(prompt or 0, completion or 0)
    if total is not None and total > usage.total_tokens:  # embeddings, or a total-only shape
        if prompt is None:
            usage.prompt_tokens = total - usage.completion_tokens
        else:
            usage.completion_tokens = total - usage.prompt_tokens
    return usage


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _decode(data: bytes) -> tuple[bool, Any]:
    """(complete, value) of the JSON value at the start of `data` (leading whitespace allowed)."""
    # A usage object is a few hundred bytes: most of the time the first 512 hold it.
    for size in (512, MAX_USAGE_OBJECT):
        text = data[:size].decode("utf-8", "replace").lstrip()
        try:
            return True, _DECODER.raw_decode(text)[0]
        except ValueError:
            if len(data) <= size:
                break
    return False, None


def find_usage(data: bytes, *, depth: int = 1) -> Usage | None:
    """The last usage object keyed at nesting `depth` of the JSON text in `data` (1: the top level)."""
    found: Usage | None = None
    at = data.find(USAGE_KEY)
    if at < 0:
        return None
    tracker = Depth()
    position = 0
    while at >= 0:
        tracker.advance(data[position:at])
        position = at
        if not tracker.in_string and tracker.depth == depth:
            start = at + len(USAGE_KEY)
            usage = usage_from(_decode(data[start : start + MAX_USAGE_OBJECT])[1])
            if usage is not None:
                found = usage
        at = data.find(USAGE_KEY, at + 1)
    return found


def event_usage(event: bytes) -> Usage | None:
    """Usage in one SSE event: top level of its data, or inside `response` for the event that ends a Responses
    stream (`response.completed`, `.incomplete`, `.failed`)."""
    usage = find_usage(event)
    if usage is None and _RESPONSE_END.search(event):
        usage = find_usage(event, depth=2)
    return usage


class BodyUsage:
    """The top-level usage object of a JSON body fed chunk by chunk (`feed`, then `finish`).

    Holds at most the last few bytes of a chunk (a key may straddle two) and, once the key
    is seen, the usage object's first `MAX_USAGE_OBJECT` bytes until it is complete.
    """

    __slots__ = ("_capture", "_depth", "_held", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._depth = Depth()
        self._held = b""
        self._capture: bytes | None = None  # the usage value's bytes so far, while incomplete

    def feed(self, chunk: bytes, *, last: bool = False) -> None:
        """Read on; `last`: no chunk follows (its end need not be tracked for the next one)."""
        if self._capture is not None:
            self._capture += chunk[: MAX_USAGE_OBJECT - len(self._capture)]
            self._decode_capture(final=False)
        data = self._held + chunk if self._held else chunk
        end = len(data) - _KEY_TAIL
        if end <= 0:
            self._held = data
            return
        position = 0
        at = data.find(USAGE_KEY)
        while 0 <= at < end:
            self._depth.advance(data[position:at])
            position = at
            if not self._depth.in_string and self._depth.depth == 1:
                start = at + len(USAGE_KEY)
                self._capture = data[start : start + MAX_USAGE_OBJECT]
                self._decode_capture(final=False)
            at = data.find(USAGE_KEY, at + 1)
        if not last:
            self._depth.advance(data[position:end])
            self._held = data[end:]

    def finish(self) -> Usage | None:
        if self._capture is not None:
            self._decode_capture(final=True)
        return self.usage

    def _decode_capture(self, *, final: bool) -> None:
        capture = self._capture
        assert capture is not None
        complete, value = _decode(capture)
        if complete or final or len(capture) >= MAX_USAGE_OBJECT:
            self._capture = None
            usage = usage_from(value)
            if usage is not None:
                self.usage = usage


class StreamTap:
    """Watches an SSE stream for its usage event, optionally removing it.

    `feed` returns the bytes to forward now. Complete events pass through
    untouched in the same write; only an unfinished trailing event is held until
    its blank line arrives (a client cannot use half an event anyway). The usage
    event is removed only when `strip_usage` is set, i.e. when the gateway asked
    for usage on the client's behalf.

    Line endings (SSE allows CRLF, LF or CR): an event ends with `EVENT_END` (LF) unless bytes fed
    with no LF event end hold a `CRLF_EVENT_END`: `event_end` is then CRLF for the rest of the
    stream (a CRLF stream never holds b"\n\n"). Once a held event has ended with LF the check
    stops, so an LF stream pays it once (one `rfind`), and a whole LF event never. A stream that mixes the two, or
    ends lines with a lone CR, is not split into events: it is held up to `MAX_PENDING_EVENT`, then
    passed on unread (charged an estimate).

    A chunk passes whole and unchanged, with nothing to remember, when nothing is `held`, it ends
    with `EVENT_END` and holds no `USAGE_KEY`: a relay may check that itself, inline, and then
    need not feed it (the pushed relay's fast path, `proxy._pusher`). Events in what `feed`
    returns are counted with `event_end`.
    """

    __slots__ = ("_unsure", "event_end", "held", "strip_usage", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self.held = b""  # an unfinished trailing event
        self.event_end = EVENT_END
        self._unsure = True  # until an event has ended: the stream may end lines with CRLF

    def feed(self, chunk: bytes) -> bytes:
        held = self.held
        data = held + chunk if held else chunk
        end = self.event_end
        cut = data.rfind(end)
        if cut < 0:
            if self._unsure and (crlf := data.rfind(CRLF_EVENT_END)) >= 0:  # the first event of a CRLF stream
                self.event_end, self._unsure, end, cut = CRLF_EVENT_END, False, CRLF_EVENT_END, crlf
            elif len(data) > MAX_PENDING_EVENT:
                self.held = b""
                return data
            else:
                self.held = data
                return b""
        elif held:  # an event held back ended here: the stream is as `event_end` says (not checked again)
            self._unsure = False
        cut += len(end)
        complete, self.held = data[:cut], data[cut:]
        if USAGE_KEY in complete:
            complete = self._take_usage(complete)
        return complete

    def flush(self) -> bytes:
        """Whatever is still held when the stream ends."""
        rest, self.held = self.held, b""
        return rest

    def _take_usage(self, events: bytes) -> bytes:
        # The usual case: one usage event, the last in the block; found and cut out without
        # splitting every event of the block (at high token rates a block holds dozens).
        end_mark = self.event_end
        at = events.rfind(USAGE_KEY)
        before = events.rfind(end_mark, 0, at)
        start = 0 if before < 0 else before + len(end_mark)
        end = events.find(end_mark, at) + len(end_mark)
        event = events[start:end]
        if events.find(USAGE_KEY, 0, start) < 0 and (usage := event_usage(event)) is not None:
            self.usage = usage
            if self.strip_usage and _NO_CHOICES.search(event):
                return events[:start] + events[end:]
            return events
        kept: list[bytes] = []
        for event in events.split(end_mark)[:-1]:
            usage = event_usage(event) if USAGE_KEY in event else None
            if usage is not None:
                self.usage = usage
                if self.strip_usage and _NO_CHOICES.search(event):
                    continue
            kept.append(event + end_mark)
        return b"".join(kept)
