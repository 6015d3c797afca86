from __future__ import annotations

import pytest

from bastion.usage import MAX_PENDING_EVENT, StreamTap, Usage, find_usage

USAGE_EVENT = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":2,"total_tokens":5,"completion_tokens":3}}\n\n'
TOKEN_EVENT = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def test_find_usage_reads_the_last_non_null_object() -> None:
    assert find_usage(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}') == Usage(1, 2)
    assert find_usage(b'{"a":{"usage":{"prompt_tokens":1}},"usage":null}') == Usage(1, 0)
    assert find_usage(b'{"usage":null}') is None
    assert find_usage(b"no usage here") is None
    assert find_usage(b'{"usage":{"prompt_tokens":-4,"completion_tokens":"x"}}') == Usage(0, 0)


@pytest.mark.parametrize("strip", [True, False])
def test_tap_passes_events_and_takes_usage(strip: bool) -> None:
    tap = StreamTap(strip_usage=strip)
    out = tap.feed(TOKEN_EVENT) + tap.feed(USAGE_EVENT + DONE) + tap.flush()
    assert tap.usage == Usage(2, 3)
    assert out == (TOKEN_EVENT + DONE if strip else TOKEN_EVENT + USAGE_EVENT + DONE)


def test_tap_holds_only_an_unfinished_event() -> None:
    tap = StreamTap(strip_usage=True)
    stream = TOKEN_EVENT + USAGE_EVENT + DONE
    out = []
    for i in range(0, len(stream), 7):  # split at awkward places
        out.append(tap.feed(stream[i : i + 7]))
    out.append(tap.flush())
    assert b"".join(out) == TOKEN_EVENT + DONE
    assert tap.usage == Usage(2, 3)
    assert tap.feed(TOKEN_EVENT) == TOKEN_EVENT, "a whole event is forwarded in the same call"


def test_tap_does_not_buffer_a_stream_that_is_not_sse() -> None:
    tap = StreamTap(strip_usage=False)
    assert tap.feed(b"x" * 10) == b""
    big = b"y" * MAX_PENDING_EVENT
    assert tap.feed(big) == b"x" * 10 + big


@pytest.mark.parametrize("strip", [True, False])
def test_tap_cuts_usage_out_of_a_block_of_many_events(strip: bool) -> None:
    """The fast path (usage last in a block) and the general one (usage mid-block, or on every event)."""
    first = StreamTap(strip_usage=strip)
    block = TOKEN_EVENT * 40 + USAGE_EVENT + DONE
    assert first.feed(block) == (TOKEN_EVENT * 40 + DONE if strip else block)
    assert first.usage == Usage(2, 3)

    continuous = b'data: {"choices":[{"index":0}],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
    second = StreamTap(strip_usage=strip)
    mixed = continuous + USAGE_EVENT + TOKEN_EVENT + b'data: {"choices":[],"usage":null}\n\n'
    kept = continuous + TOKEN_EVENT + b'data: {"choices":[],"usage":null}\n\n'
    assert second.feed(mixed) == (kept if strip else mixed)
    assert second.usage == Usage(2, 3)
