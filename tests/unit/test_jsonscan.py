"""The JSON structure scanners against `json.loads` and a byte-by-byte reference, on random documents."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.jsonscan import Depth, Malformed, Members, TooComplex, last_byte, skip_whitespace

WANTED = frozenset({"model", "stream", "stream_options", "max_tokens", "n"})

# Text with what trips scanners: quotes, backslashes (runs of them), brackets, braces, colons, unicode.
tricky_text = st.text(
    alphabet=st.sampled_from(['"', "\\", "[", "]", "{", "}", ":", ",", " ", "a", "é", "\u2028", "\x00", "\n"]),
    max_size=12,
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | tricky_text
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4), max_leaves=15
)
keys = st.sampled_from(sorted(WANTED)) | tricky_text
members = st.lists(st.tuples(keys, values), max_size=8)
formats = st.sampled_from(
    [{}, {"separators": (",", ":")}, {"indent": 2}, {"ensure_ascii": False}, {"indent": "\t", "ensure_ascii": False}]
)


def render(pairs: list[tuple[str, Any]], fmt: dict[str, Any]) -> bytes:
    """An object with the members in order, duplicates kept (json.dumps would drop them)."""
    if not pairs:
        return b"{ }"
    inner = ",".join(json.dumps(k, **fmt) + ":" + json.dumps(v, **fmt) for k, v in pairs)
    return ("{" + inner + "}").encode()


def scan(body: bytes, steps: int = 7) -> dict[str, Any]:
    found = Members(body, WANTED, budget=1_000_000)
    while not found.run(steps):
        pass
    return {key: json.loads(body[span.start : span.end]) for key, span in found.spans().items()}


@settings(max_examples=400, deadline=None)
@given(pairs=members, fmt=formats, escape_keys=st.booleans(), pad=st.sampled_from(["", " ", "\n\t "]))
def test_members_read_what_json_loads_reads(
    pairs: list[tuple[str, Any]], fmt: dict[str, Any], escape_keys: bool, pad: str
) -> None:
    body = pad.encode() + render(pairs, fmt) + pad.encode()
    if escape_keys:  # `"model"` written as `"mo\u0064el"`: the same key to json.loads
        body = body.replace(b'"model"', b'"mo\\u0064el"')
    expected = json.loads(body)
    assert scan(body) == {key: expected[key] for key in WANTED if key in expected}


@pytest.mark.parametrize(
    "body",
    [b"[]", b'"{}"', b"", b"  ", b'{"a":1', b'{"a":"b}', b'{"a":1}}', b'{"a":1} {"b":2}', b'{"a":[1}', b"{]"],
)
def test_members_refuse_what_is_not_one_object(body: bytes) -> None:
    with pytest.raises(Malformed):
        scan(body)


def test_members_budget_and_turns() -> None:
    body = b'{"model":"m","messages":[' + b'"a",' * 100_000 + b'"a"]}'
    with pytest.raises(TooComplex):
        Members(body, WANTED, budget=50_000).run(10**9)
    found = Members(body, WANTED, budget=1_000_000)
    turns = 0
    while not found.run(2_000):
        turns += 1
    assert turns > 50 and set(found.spans()) == {"model"}


@pytest.mark.serial  # CPU time per turn
def test_members_cost_is_bounded_per_turn_for_hostile_bodies() -> None:
    """16 MiB shapes that cost json.loads seconds: every burst of steps stays short."""
    size = 16 * 1024 * 1024
    hostile = [
        b'{"messages":[' + b"[]," * (size // 3) + b"[]]}",
        b'{"messages":' + b"[" * (size // 2) + b"]" * (size // 2) + b"}",
        b'{"messages":"' + b"\\\\" * (size // 2) + b'"}',
        b'{"messages":"' + b'\\"' * (size // 2) + b'"}',
        b'{"messages":"' + b"x" * size + b'","model":"m"}',
        b"{" + b" " * size + b'"model":"m"}',
    ]
    for body in hostile:
        found = Members(body, WANTED, budget=500_000)
        worst = 0.0
        try:
            while True:
                started = time.process_time()
                done = found.run(2_000)
                worst = max(worst, time.process_time() - started)
                if done:
                    break
        except (TooComplex, Malformed):
            pass
        assert worst < 0.05, (body[:20], worst)


def test_whitespace_helpers() -> None:
    assert skip_whitespace(b"  x", 0) == 2
    assert skip_whitespace(b"a" + b" " * 1000 + b"b", 1) == 1001
    assert skip_whitespace(b"   ", 0) == 3
    assert last_byte(b"ab  ", 0, 4) == 1
    assert last_byte(b"a" + b" " * 1000, 0, 1001) == 0
    assert last_byte(b"    ", 1, 4) == 0  # none: start - 1


def reference(text: bytes) -> list[tuple[int, bool]]:
    """(depth, inside a string) before each byte, one byte at a time."""
    states = []
    depth, inside, escaped = 0, False, False
    for byte in text:
        states.append((depth, inside))
        if inside:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                inside = False
        elif byte == 0x22:
            inside = True
        elif byte in b"[{":
            depth += 1
        elif byte in b"]}":
            depth -= 1
    states.append((depth, inside))
    return states


@settings(max_examples=400, deadline=None)
@given(value=values, fmt=formats, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_depth_follows_a_document_fed_in_any_pieces(value: Any, fmt: dict[str, Any], cuts: list[int]) -> None:
    text = json.dumps({"k": value, "x": [value]}, **fmt).encode()
    expected = reference(text)
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    tracker = Depth()
    for start, end in itertools.pairwise(points):
        tracker.advance(text[start:end])
        depth, inside = expected[end]
        assert (tracker.depth, tracker.in_string) == (depth, inside), (text, end)
