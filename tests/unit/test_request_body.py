"""Request inspection: lax coercion against pydantic itself, the facts, the byte edits, both parse paths."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from bastion.errors import GatewayError
from bastion.request_body import PRIORITY_ROUTES, RequestFacts, RequestInspector, lax_bool, lax_int

BOOL = TypeAdapter(bool | None)
INT = TypeAdapter(int | None)
SMALL = RequestInspector(default_max_tokens=100)
LARGE = RequestInspector(default_max_tokens=100, full_parse_limit=0, steps_per_turn=3)  # always the scanner
CHAT = "/v1/chat/completions"


def pydantic(adapter: TypeAdapter[Any], value: object) -> object:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return "refused"


coercible = st.sampled_from(
    ["true", "True", "TRUE", "false", "1", "0", "yes", "No", "on", "OFF", "t", "F", "y", "n", " true", "2", "", "1.0",
     "5", " 7 ", "+3", "-2", "1_000", "1__0", "5.0", "5.5", "1e3", "0x10"]
)  # fmt: skip
json_scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.floats() | st.text(max_size=6)


@settings(max_examples=500, deadline=None)
@given(value=coercible | json_scalars)
@example(value="0\x1f")  # Python's whitespace, not pydantic's (U+001C..U+001F)
@example(value="0.")  # a point needs a zero after it
@example(value="\u0663")  # a non-ASCII digit
@example(value="7\u3000")  # Unicode White_Space is stripped
def test_lax_coercion_is_pydantics(value: object) -> None:
    """vLLM's request models are pydantic v2 in lax mode: `stream`, `include_usage`, `max_tokens`, `n`."""
    expected_bool = pydantic(BOOL, value)
    assert (lax_bool(value) if value is not None else None) == (None if expected_bool == "refused" else expected_bool)
    expected_int = pydantic(INT, value)
    assert lax_int(value) == (None if expected_int == "refused" else expected_int)


async def inspect(body: dict[str, Any] | bytes, path: str = CHAT, inspector: RequestInspector = SMALL) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await inspector.inspect(path, raw)


@pytest.mark.parametrize("inspector", [SMALL, LARGE], ids=["json.loads", "scanner"])
async def test_facts(inspector: RequestInspector) -> None:
    body = {"model": "m", "messages": [], "max_tokens": "64", "n": 2, "best_of": 3, "priority": -1}
    _, facts = await inspect(body, inspector=inspector)
    raw = json.dumps(body).encode()
    # A client's priority more urgent than its own (0 without classes) is clamped: the facts hold what is forwarded.
    assert facts == RequestFacts("m", False, False, len(raw) // 4, 64 * 3, 0)
    _, facts = await inspect({"model": "m", "input": "x" * 400}, "/v1/embeddings", inspector)
    assert (facts.completion_cap, facts.prompt_estimate) == (0, 106)  # embeddings generate nothing (426 bytes)
    _, facts = await inspect({"model": "m", "max_completion_tokens": 0, "max_tokens": 9}, inspector=inspector)
    assert facts.completion_cap == 9  # vLLM: max_completion_tokens or max_tokens
    _, facts = await inspect({"model": "m", "max_output_tokens": 30}, "/v1/responses", inspector)
    assert facts.completion_cap == 30
    _, facts = await inspect({"model": 7, "max_tokens": "lots"}, inspector=inspector)
    assert (facts.model, facts.completion_cap) == (None, 100)  # the default cap when absent or unreadable


@pytest.mark.parametrize("inspector", [SMALL, LARGE], ids=["json.loads", "scanner"])
@pytest.mark.parametrize("stream", [True, 1, "true", "yes", "on", "True", "t", "Y", 1.0])
async def test_usage_is_asked_for_whatever_the_form_of_stream(inspector: RequestInspector, stream: object) -> None:
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": '"stream_options":{}'}]}
    sent, facts = await inspect(body, inspector=inspector)
    assert facts.stream and facts.usage_added
    assert json.loads(sent) == {**body, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("inspector", [SMALL, LARGE], ids=["json.loads", "scanner"])
@pytest.mark.parametrize(
    ("options", "added"),
    [
        (None, True),
        ({}, False),  # vLLM's include_usage defaults to true in stream_options: the client asked
        ({"continuous_usage_stats": True}, False),
        ({"continuous_usage_stats": True, "include_usage": None}, True),
        ({"include_usage": False}, True),
        ({"include_usage": "off"}, True),
        ({"include_usage": None}, True),
        ({"include_usage": 1}, False),  # asked, in a form vLLM accepts: not the gateway's to hide
        ({"include_usage": "true"}, False),
        ({"include_usage": "maybe"}, False),  # vLLM refuses it: left for vLLM to refuse
        ("yes", False),
    ],
)
async def test_stream_options_merged_in_place(inspector: RequestInspector, options: object, added: bool) -> None:
    raw = b'{"model":"m", "stream_options" : ' + json.dumps(options).encode() + b' ,"stream":"1" , "n":1}'
    sent, facts = await inspect(raw, inspector=inspector)
    assert facts.usage_added is added
    if added:
        merged = {**(options or {}), "include_usage": True}  # type: ignore[dict-item]
        assert json.loads(sent) == {"model": "m", "stream_options": merged, "stream": "1", "n": 1}
        assert sent.startswith(b'{"model":"m", "stream_options" : {') and sent.endswith(b' ,"stream":"1" , "n":1}')
    else:
        assert sent == raw


@pytest.mark.parametrize("stream", [False, 0, "false", "no", "off", "f", "n", None, "maybe", 2])
async def test_no_stream_no_edit(stream: object) -> None:
    raw = json.dumps({"model": "m", "stream": stream}).encode()
    assert await inspect(raw) == (raw, RequestFacts("m", False, False, len(raw) // 4, 100, None))


async def test_routes_without_stream_options_are_not_edited() -> None:
    for path in ("/v1/responses", "/v1/embeddings", "/v1/other"):
        raw = json.dumps({"model": "m", "stream": True}).encode()
        sent, facts = await inspect(raw, path)
        assert sent == raw and facts.stream and not facts.usage_added


@pytest.mark.parametrize("inspector", [SMALL, LARGE], ids=["json.loads", "scanner"])
@pytest.mark.parametrize(
    "body", [b"[]", b"{", b'{"a":1} {"model":"x"}', b'{"model":"\xff"}', b'{"max_tokens":' + b"9" * 5000 + b"}"]
)
async def test_not_a_json_object_is_400(inspector: RequestInspector, body: bytes) -> None:
    with pytest.raises(GatewayError) as refused:
        await inspect(body, inspector=inspector)
    assert (refused.value.status, refused.value.code) == (400, "invalid_json")


async def test_too_complex_is_400() -> None:
    body = b'{"model":"m","messages":[' + b'"a",' * 1000 + b'"a"]}'
    strict = RequestInspector(default_max_tokens=1, full_parse_limit=0, step_budget=500)
    with pytest.raises(GatewayError) as refused:
        await strict.inspect(CHAT, body)
    assert (refused.value.status, refused.value.code) == (400, "request_too_complex")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
lax = st.sampled_from([True, False, 1, 0, "true", "no", "On", "t", "n", None, "x", 2])
requests = st.fixed_dictionaries(
    {"model": st.text(max_size=8) | json_values},
    optional={
        "messages": json_values,
        "stream": lax | json_values,
        "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": lax}) | json_values,
        "max_tokens": st.integers(-2, 500) | st.sampled_from(["12", "1.0", None]) | json_values,
        "n": st.integers(-1, 4) | json_values,
        "best_of": st.integers(-1, 4),
        "priority": st.integers(-5, 5) | json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(payload=requests, path=st.sampled_from([CHAT, "/v1/completions", "/v1/responses", "/v1/embeddings"]))
async def test_both_paths_read_and_edit_alike(payload: dict[str, Any], path: str) -> None:
    raw = json.dumps(payload, indent=1).encode()
    small_sent, small = await SMALL.inspect(path, raw)
    large_sent, large = await LARGE.inspect(path, raw)
    assert small == large
    assert json.loads(small_sent) == json.loads(large_sent)
    sent = json.loads(small_sent)
    if small.usage_added:
        assert sent["stream_options"]["include_usage"] is True
    claimed = lax_int(payload.get("priority"))
    clamped = path in PRIORITY_ROUTES and claimed is not None and small.priority != payload["priority"]
    if clamped:  # held to the principal's own (0 without classes) and written as an integer; the rest untouched
        assert small.priority == sent["priority"] == max(claimed or 0, 0)
    if not small.usage_added and not clamped:
        assert small_sent == raw


ENFORCE = RequestInspector(default_max_tokens=100, enforce_max_tokens=True)
ENFORCE_LARGE = RequestInspector(default_max_tokens=100, enforce_max_tokens=True, full_parse_limit=0, steps_per_turn=3)


@pytest.mark.parametrize("inspector", [ENFORCE, ENFORCE_LARGE], ids=["json.loads", "scanner"])
@pytest.mark.parametrize(
    ("path", "sent", "engine_reads"),
    [
        (CHAT, {"messages": []}, {"max_tokens": 100}),
        (CHAT, {"messages": [], "max_tokens": None}, {"max_tokens": 100}),
        (CHAT, {"messages": [], "max_completion_tokens": None}, {"max_completion_tokens": None, "max_tokens": 100}),
        ("/v1/completions", {"prompt": "hi", "n": 2}, {"max_tokens": 100}),
        ("/v1/responses", {"input": "hi"}, {"max_output_tokens": 100}),
        ("/v1/responses", {"input": "hi", "max_output_tokens": None}, {"max_output_tokens": 100}),
        (CHAT, {"messages": [], "max_tokens": 7}, {"max_tokens": 7}),  # the client's own cap is kept
        (CHAT, {"messages": [], "max_completion_tokens": "9"}, {"max_completion_tokens": "9"}),
        (CHAT, {"messages": [], "max_tokens": 0}, {"max_tokens": 0}),  # refused by vLLM itself: left alone
        (CHAT, {"messages": [], "max_tokens": "x"}, {"max_tokens": "x"}),
    ],
)
async def test_a_request_without_a_cap_gets_the_default_written_in(
    inspector: RequestInspector, path: str, sent: dict[str, Any], engine_reads: dict[str, Any]
) -> None:
    body, facts = await inspector.inspect(path, json.dumps({"model": "m", **sent}).encode())
    forwarded = json.loads(body)
    assert {key: forwarded.get(key) for key in engine_reads} == engine_reads, body
    assert {k: v for k, v in forwarded.items() if k not in engine_reads} == {
        k: v for k, v in {"model": "m", **sent}.items() if k not in engine_reads
    }
    assert facts.completion_cap in (100, 200, 7, 9)


async def test_the_last_of_duplicate_caps_is_the_one_replaced() -> None:
    # json.loads (vLLM's reader too) keeps the last of duplicate keys: a null there means no cap.
    body, _ = await ENFORCE.inspect(CHAT, b'{"model":"m","max_tokens":5,"messages":[],"max_tokens":null}')
    assert json.loads(body)["max_tokens"] == 100, body


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/audio/speech", "/v1/tokenize"])
async def test_routes_without_a_known_cap_are_not_edited(path: str) -> None:
    sent = b'{"model":"m","input":"hi"}'
    body, _ = await ENFORCE.inspect(path, sent)
    assert body == sent


async def test_without_the_setting_nothing_is_written() -> None:
    sent = b'{"model":"m","messages":[]}'
    body, facts = await SMALL.inspect(CHAT, sent)
    assert body == sent and facts.completion_cap == 100


async def test_the_cap_and_the_usage_option_are_both_written() -> None:
    body, facts = await ENFORCE.inspect(CHAT, b'{"model":"m","stream":true,"messages":[]}')
    forwarded = json.loads(body)
    assert forwarded["max_tokens"] == 100 and forwarded["stream_options"] == {"include_usage": True}
    assert facts.usage_added


@pytest.mark.parametrize("inspector", [ENFORCE, ENFORCE_LARGE], ids=["json.loads", "scanner"])
@pytest.mark.parametrize(
    ("path", "sent", "name"),
    [
        # Chat has no `max_output_tokens`: vLLM ignores it and generates to the end of the context.
        (CHAT, {"messages": [], "max_output_tokens": 1}, "max_tokens"),
        # vLLM reads `max_completion_tokens or max_tokens`: a 0 there is no cap, not a refused one.
        (CHAT, {"messages": [], "max_completion_tokens": 0}, "max_tokens"),
        (CHAT, {"messages": [], "max_completion_tokens": "0", "max_tokens": None}, "max_tokens"),
        # Completions and responses read one name each; another route's name is ignored by vLLM.
        ("/v1/completions", {"prompt": "hi", "max_completion_tokens": 1}, "max_tokens"),
        ("/v1/responses", {"input": "hi", "max_tokens": 1}, "max_output_tokens"),
    ],
)
async def test_a_cap_the_engine_ignores_is_no_cap(
    inspector: RequestInspector, path: str, sent: dict[str, Any], name: str
) -> None:
    body, facts = await inspector.inspect(path, json.dumps({"model": "m", **sent}).encode())
    assert json.loads(body)[name] == 100, body
    assert facts.completion_cap == 100  # reserved what the engine will generate at most


async def test_a_cap_too_large_to_read_is_replaced() -> None:
    # 1.000…0 is 1 to vLLM (json.loads, then a lax int) but too large for the scanner to decode: it was left in
    # while the default was reserved, so the engine read whatever the client wrote there.
    for cap in (b"1000000." + b"0" * 70_000, b'"' + b" " * 70_000 + b'1000000"'):
        sent = b'{"model":"m","messages":[],"max_completion_tokens":%s,"max_tokens":null}' % cap
        body, facts = await ENFORCE_LARGE.inspect(CHAT, sent)
        forwarded = json.loads(body)
        assert (forwarded["max_completion_tokens"] or forwarded["max_tokens"]) == 100, body[:200]
        assert facts.completion_cap == 100


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
async def test_a_body_in_utf16_or_utf32_is_edited_as_utf8(encoding: str) -> None:
    """json.loads (and vLLM's server) read these; the edits are UTF-8 bytes, so the body is made UTF-8 first."""
    sent = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "héllo ✓"}]}
    body, facts = await ENFORCE.inspect(CHAT, json.dumps(sent, ensure_ascii=False).encode(encoding))
    assert json.loads(body.decode("utf-8")) == {
        **sent, "max_tokens": 100, "stream_options": {"include_usage": True}
    }  # fmt: skip
    assert facts.stream and facts.usage_added and facts.completion_cap == 100


async def test_a_body_that_is_not_valid_in_its_encoding_is_400() -> None:
    with pytest.raises(GatewayError) as refused:
        await SMALL.inspect(CHAT, b'\xff\xfe{\x00"\x00\x00\xd8')  # UTF-16 with a lone surrogate
    assert refused.value.status == 400


@pytest.mark.parametrize("full_parse_limit", [64 * 1024, 0])  # json.loads, then the scanner
@pytest.mark.parametrize("background", [True, "true", 1, "on"])
async def test_a_background_response_is_refused_unless_allowed(full_parse_limit: int, background: object) -> None:
    body = json.dumps({"model": "m", "input": "hi", "background": background}).encode()
    with pytest.raises(GatewayError) as refused:
        await RequestInspector(default_max_tokens=100, full_parse_limit=full_parse_limit).inspect("/v1/responses", body)
    assert refused.value.status == 400 and refused.value.param == "background"
    allowed = RequestInspector(default_max_tokens=100, allow_background=True, full_parse_limit=full_parse_limit)
    _, facts = await allowed.inspect("/v1/responses", body)
    assert facts.background and facts.completion_cap == 100
    _, facts = await SMALL.inspect(CHAT, json.dumps({"model": "m", "messages": [], "background": True}).encode())
    assert not facts.background  # not a field of chat requests (vLLM ignores it there)


@pytest.mark.parametrize("background", [False, "no", 0, None])
async def test_a_request_that_is_not_background_passes(background: object) -> None:
    body = json.dumps({"model": "m", "input": "hi", "background": background}).encode()
    assert not (await SMALL.inspect("/v1/responses", body))[1].background


@pytest.mark.parametrize("size", [10, 40_000], ids=["json.loads", "past 64 KiB: the scanner"])
@pytest.mark.parametrize("options", [None, {"include_usage": False}])  # `include_usage` inserted, or merged
async def test_a_body_behind_a_utf8_byte_order_mark_is_inspected_and_forwarded_with_it(
    size: int, options: dict[str, Any] | None
) -> None:
    """json.loads (vLLM's server) skips a UTF-8 byte order mark. A body past 64 KiB with one was a 400 (the
    scanner knows no mark), and a small one a 400 as soon as an edit needed the scanner's spans (merging
    `include_usage` into the client's `stream_options`). Now both are read without it and forwarded with it."""
    sent: dict[str, Any] = {"model": "m", "stream": "yes", "max_tokens": 7, "priority": -5, "n": 2}
    sent["messages"] = [{"role": "user", "content": "é" * size}]
    if options is not None:
        sent["stream_options"] = options
    plain = json.dumps(sent, ensure_ascii=False).encode()
    body, facts = await SMALL.inspect(CHAT, b"\xef\xbb\xbf" + plain)
    expected_body, expected = await SMALL.inspect(CHAT, plain)
    assert body == b"\xef\xbb\xbf" + expected_body  # the same edits, the mark kept in front
    assert facts == expected
    assert (facts.model, facts.stream, facts.usage_added, facts.priority) == ("m", True, True, 0)
    assert facts.completion_cap == 14  # max_tokens for each of n
    assert json.loads(body)["stream_options"] == {"include_usage": True}  # json.loads reads the mark, as vLLM


@pytest.mark.parametrize("inspector", [SMALL, LARGE], ids=["json.loads", "scanner"])
@pytest.mark.parametrize(
    "rest",
    [b'\xef\xbb\xbf{"model":"m"}', '{"model":"m"}'.encode("utf-16"), '{"model":"m"}'.encode("utf-16-le")],
    ids=["two marks", "utf-16 with its own mark", "utf-16 without"],
)
async def test_after_a_utf8_byte_order_mark_only_utf8_is_read(inspector: RequestInspector, rest: bytes) -> None:
    """What json.loads refuses after the mark (vLLM answers 400) is refused, not made UTF-8 and forwarded."""
    body = b"\xef\xbb\xbf" + rest
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(GatewayError) as refused:
        await inspector.inspect(CHAT, body)
    assert (refused.value.status, refused.value.resolved_code) == (400, "invalid_json")
