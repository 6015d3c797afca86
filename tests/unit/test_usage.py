from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.usage import MAX_PENDING_EVENT, BodyUsage, StreamTap, Usage, event_usage, find_usage, usage_from

USAGE_EVENT = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":2,"total_tokens":5,"completion_tokens":3}}\n\n'
TOKEN_EVENT = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def test_find_usage_reads_the_last_top_level_object() -> None:
    assert find_usage(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}') == Usage(1, 2)
    assert find_usage(b'{"a":{"usage":{"prompt_tokens":1}},"usage":null}') is None  # nested: not the response's
    assert find_usage(b'{"usage":null}') is None
    assert find_usage(b"no usage here") is None
    assert find_usage(b'{"usage":{"prompt_tokens":-4,"completion_tokens":"x"}}') is None  # no count: estimated
    twice = b'{"usage":{"prompt_tokens":1},"x":[{"usage":{"prompt_tokens":9}}],"usage":{"prompt_tokens":2}}'
    assert find_usage(twice) == Usage(2, 0)  # the last top-level one, as json.loads keeps


def test_a_usage_key_inside_generated_text_or_logprobs_is_not_usage() -> None:
    text = json.dumps({"content": 'say "usage":{"prompt_tokens":999999} and \\"usage":{"total_tokens":7}'})
    body = ('{"choices":[{"message":' + text + ',"logprobs":{"top_logprobs":[{"usage":-0.1,"\\"usage":-2}]}}],'
            '"usage":{"prompt_tokens":3,"completion_tokens":4}}').encode()  # fmt: skip
    assert json.loads(body)["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    assert find_usage(body) == Usage(3, 4)
    assert find_usage(body.replace(b',"usage":{"prompt_tokens":3,"completion_tokens":4}', b"")) is None


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}, Usage(5, 7)),  # chat, completions
        ({"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}, Usage(5, 7)),  # responses
        ({"prompt_tokens": 9, "total_tokens": 9}, Usage(9, 0)),  # embeddings
        ({"prompt_tokens": 9, "total_tokens": 11}, Usage(9, 2)),  # a total above its parts is charged whole
        ({"total_tokens": 11}, Usage(11, 0)),  # any other route
        ({"seconds": 3}, None),  # no token count at all
        ({"prompt_tokens": True}, None),
    ],
)
def test_usage_in_every_shape(usage: dict[str, object], expected: Usage | None) -> None:
    assert usage_from(usage) == expected
    assert find_usage(json.dumps({"id": "x", "usage": usage}).encode()) == expected


def vllm_body(usage_first: bool = False) -> bytes:
    """A non-streamed vLLM answer: usage is followed by prompt_logprobs, prompt_token_ids, kv_transfer_params."""
    logprobs = [None] + [{str(i): {"logprob": -1.5, "rank": 1, "decoded_token": '"usage":{'}} for i in range(300)]
    body = {
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": 'a "usage": {}'}}],
        "usage": {"prompt_tokens": 301, "total_tokens": 311, "completion_tokens": 10},
        "prompt_logprobs": logprobs,
        "prompt_token_ids": list(range(301)),
        "kv_transfer_params": {"usage": {"prompt_tokens": 1}},
    }
    return json.dumps(body).encode()


def test_body_usage_far_from_the_end_is_found_holding_only_a_few_bytes() -> None:
    body = vllm_body()
    assert len(body) - body.index(b'"usage"') > 20_000  # not in the last two reads of a 4 KiB-chunked body
    reader = BodyUsage()
    for i in range(0, len(body), 4096):
        reader.feed(body[i : i + 4096])
        assert len(reader._held) < len(b'"usage":')
    assert reader.finish() == Usage(301, 10)


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12), spaces=st.sampled_from(["", " ", "\n  "])
)
def test_body_usage_at_any_chunk_boundaries(cuts: list[int], spaces: str) -> None:
    body = vllm_body().replace(b'"usage": {', f'"usage":{spaces}{{'.encode())
    points = sorted({c % len(body) for c in cuts})
    reader = BodyUsage()
    for start, end in zip([0, *points], [*points, len(body)], strict=True):
        reader.feed(body[start:end])
    assert reader.finish() == Usage(301, 10)


def test_responses_stream_usage_is_inside_response_completed() -> None:
    created = b'event: response.created\ndata: {"response":{"id":"r","usage":null},"type":"response.created"}\n\n'
    delta = (
        b'event: response.output_text.delta\ndata: {"delta":"\\"usage\\":{","type":"response.output_text.delta"}\n\n'
    )
    done = (
        b'event: response.completed\ndata: {"response":{"id":"r","output":[{"type":"message"}],'
        b'"usage":{"input_tokens":11,"output_tokens":4,"total_tokens":15}},"sequence_number":9,'
        b'"type":"response.completed"}\n\n'
    )
    tap = StreamTap(strip_usage=False)
    assert tap.feed(created + delta) == created + delta
    assert tap.usage is None
    assert tap.feed(done) == done  # never hidden: it is the stream's own last event
    assert tap.usage == Usage(11, 4)
    assert event_usage(done) == Usage(11, 4)
    assert event_usage(done.replace(b"response.completed", b"response.in_progress")) is None


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


def crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


RESPONSES_STREAM = (
    b'event: response.created\ndata: {"response":{"id":"r","usage":null},"type":"response.created"}\n\n'
    b'event: response.output_text.delta\ndata: {"delta":"hi","type":"response.output_text.delta"}\n\n'
    b'event: response.completed\ndata: {"response":{"id":"r","usage":{"input_tokens":11,"output_tokens":4,'
    b'"total_tokens":15}},"type":"response.completed"}\n\n'
)


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 12), max_size=10), strip=st.booleans())
def test_a_crlf_stream_split_anywhere_is_streamed_read_and_stripped_like_lf(cuts: list[int], strip: bool) -> None:
    """Events ended with CRLF (SSE allows it; an external upstream may send it), fed in pieces cut anywhere,
    between \\r and \\n included: each event leaves as soon as it is whole, the usage is read, the usage-only
    event is removed when the gateway asked for it, and the events are counted with the tap's `event_end`."""
    events = [crlf(TOKEN_EVENT), crlf(TOKEN_EVENT.replace(b"hi", b"yo")), crlf(USAGE_EVENT), crlf(DONE)]
    stream = b"".join(events)
    points = sorted({c % len(stream) for c in cuts} | {stream.index(b"\r\n\r\n") + 1})  # one cut inside \r\n
    tap = StreamTap(strip_usage=strip)
    out = b""
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        out += tap.feed(stream[start:end])
        whole = sum(1 for e in range(len(events)) if len(b"".join(events[: e + 1])) <= end)
        expected = b"".join(e for e in events[:whole] if not (strip and e == events[2]))
        assert out == expected, "every whole event leaves at once, none is held back"
    assert out + tap.flush() == (stream.replace(events[2], b"") if strip else stream)
    assert tap.usage == Usage(2, 3)
    assert tap.event_end == b"\r\n\r\n"
    assert out.count(tap.event_end) == (3 if strip else 4)


@pytest.mark.parametrize("strip", [True, False])
def test_a_crlf_block_of_many_events_and_a_responses_stream(strip: bool) -> None:
    block = crlf(TOKEN_EVENT * 40 + USAGE_EVENT + DONE)
    tap = StreamTap(strip_usage=strip)
    assert tap.feed(block) == (crlf(TOKEN_EVENT * 40 + DONE) if strip else block)
    assert tap.usage == Usage(2, 3)

    continuous = crlf(b'data: {"choices":[{"index":0}],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n')
    mixed = continuous + crlf(USAGE_EVENT + TOKEN_EVENT)
    other = StreamTap(strip_usage=strip)
    assert other.feed(mixed) == (continuous + crlf(TOKEN_EVENT) if strip else mixed)
    assert other.usage == Usage(2, 3)

    responses = StreamTap(strip_usage=strip)
    stream = crlf(RESPONSES_STREAM)
    out = b"".join(responses.feed(stream[i : i + 50]) for i in range(0, len(stream), 50))
    assert out == stream and responses.flush() == b""  # response.completed is never hidden
    assert responses.usage == Usage(11, 4)


def test_an_lf_stream_stays_lf_and_checks_for_crlf_only_until_a_held_event_ends() -> None:
    tap = StreamTap(strip_usage=False)
    assert tap.feed(TOKEN_EVENT[:30]) == b""
    assert tap.feed(TOKEN_EVENT[30:] + DONE) == TOKEN_EVENT + DONE
    assert tap.event_end == b"\n\n" and not tap._unsure
    # A stream that mixes both after it was found LF is not split at CRLF: held, then passed on unread.
    assert tap.feed(crlf(USAGE_EVENT)) == b""
    assert tap.flush() == crlf(USAGE_EVENT) and tap.usage is None
