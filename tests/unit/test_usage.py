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
