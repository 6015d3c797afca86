"""What policy reads from a request body, at a bounded cost, and the stage that reads it.

Policy needs a few top-level fields (`model`, `stream`, `stream_options`, the
`max_*tokens` caps, `n`, `best_of`, `priority`), read the way the model server reads
them: vLLM's request models are pydantic in lax mode, so `"stream": "yes"` streams
and `"max_tokens": "64"` caps at 64. Reading them must not cost what the body's size
allows a client to make it cost:

- a body up to `full_parse_limit` (64 KiB) is `json.loads`-ed: exact, ~5 µs for a
  typical chat body, at worst a few ms and MBs;
- a larger one is walked by `jsonscan.Members` (a step per string, in bursts between
  event-loop turns, refused past a step budget) and only the wanted values are decoded.

When the request will stream on a route that takes `stream_options` and the client did
not ask for usage, `"include_usage": true` is written into the bytes (inserted, or
merged into the client's `stream_options`), and the proxy hides that usage event again.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .accounting import RETRIEVAL_ROUTES
from .asgi import (
    ASGIApp,
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    body_received,
    header,
    read_body,
)
from .auth.errors import refusal
from .context import Exchange, Outcome, exchange_of
from .errors import GatewayError, send_error
from .fairness.classes import ClassTable
from .jsonscan import Malformed, Members, Span, TooComplex, valid_unicode

WANTED = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "priority",
        "prompt",
        "prompt_embeds",
        "background",
        "previous_response_id",
        "tools",
        "input",
    }
)
# Wanted values decoded only when policy needs them (a background response's), not for every large body.
_LAZY = frozenset({"tools", "input"})
# What a background response's `input` may hold: text, whose tokens its bytes show (the reservation, all it is
# charged, is estimated from them). Not an image or file (a URL, or a small image of many pixels), nor a stored
# item (`item_reference`): thousands of prompt tokens the bytes do not show.
_TEXT_ITEMS = frozenset({"message", "function_call", "function_call_output", "reasoning"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal", "reasoning_text", "summary_text"})
# Routes whose requests take `stream_options.include_usage` (vLLM's chat and completion requests).
USAGE_OPTION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
# Routes whose `prompt` may be a batch: each prompt of a list gets its own `n` choices (vLLM's completions).
BATCH_PROMPT_ROUTES = frozenset({"/v1/completions"})
# Routes whose requests take vLLM's integer `priority` (lower first under --scheduling-policy priority): the
# generating ones and the pooling ones alike (an embedding scheduled ahead takes the engine's next step too).
PRIORITY_ROUTES = USAGE_OPTION_ROUTES | frozenset(
    {"/v1/responses", "/v1/embeddings", "/v1/pooling", "/v1/classify", "/v1/score", "/v1/rerank"}
)
# The completion caps each route's requests take, in vLLM's order (`max_completion_tokens or max_tokens`: a 0 or
# null falls through to the next); a name of another route is ignored by vLLM there, so it caps nothing. The
# last is written in where a request sets none and the operator asked for it (`enforce_max_tokens`): the engine
# then stops where the reservation did.
CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
}
_CAPS = ("max_completion_tokens", "max_output_tokens", "max_tokens")  # routes vLLM's names are not known for
# Routes whose requests take `background` (vLLM's Responses API: answered at once, generated afterwards).
BACKGROUND_ROUTES = frozenset({"/v1/responses"})
# Routes that generate nothing: their cost is the prompt. Every other POST may generate up to its cap.
PROMPT_ONLY_ROUTES = frozenset(
    {"/v1/embeddings", "/v1/pooling", "/v1/classify", "/v1/score", "/v1/rerank", "/v1/tokenize", "/v1/detokenize"}
)
# No served model has a longer name (Hugging Face ids are at most 96 characters, paths rarely a third of this).
MAX_MODEL_NAME = 512
# A prompt's tokens are estimated from the request's bytes at this many bytes per token.
BYTES_PER_TOKEN = 4
FULL_PARSE_LIMIT = 64 * 1024
STEP_BUDGET = 200_000  # strings of a large body (and KiB between them), ~0.7 µs each: OpenAI caps inputs at 2048
STEPS_PER_TURN = 2_000  # then the event loop gets a turn (a millisecond or so)
_VALUE_LIMIT = 64 * 1024  # a wanted value larger than this is not decoded (no policy value is that large)
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'

_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})
# Unicode White_Space, what pydantic-core (Rust's `trim`) strips; Python's `\s` and `str.strip` also take
# U+001C..U+001F, which pydantic refuses. Digits are ASCII only (`\d` would take "٣").
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
_INTEGRAL_TEXT = re.compile(f"[{_WHITE_SPACE}]*[+-]?[0-9][0-9_]*(\\.0+)?[{_WHITE_SPACE}]*")


class _Unread:
    """A wanted value too large to decode: policy treats it as no valid value."""


UNREAD = _Unread()


def lax_bool(value: object) -> bool | None:
    """`value` as pydantic v2 validates a lax `bool` (vLLM's `stream`, `include_usage`); None if refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return True if value == 1 else False if value == 0 else None
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return None


def lax_int(value: object) -> int | None:
    """`value` as pydantic v2 validates a lax `int` (`max_tokens`, `n`); None if refused."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() and abs(value) < 2**63 else None
    if isinstance(value, str) and len(value) <= 64 and _INTEGRAL_TEXT.fullmatch(value):
        try:
            return int(value.strip(_WHITE_SPACE).split(".")[0])
        except ValueError:  # misplaced underscores
            return None
    return None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a request asks for, as the model server will read it."""

    model: str | None = None
    stream: bool = False  # it will stream (the response's content type decides in the end)
    usage_added: bool = False  # the gateway asked for usage: the usage event is not the client's
    prompt_estimate: int = 0  # prompt tokens, estimated from the bytes received
    completion_cap: int = 0  # the most completion tokens it may generate (all choices)
    priority: int | None = None
    background: bool = False  # generated after the response ends (`background: true`, where allowed)


class RequestInspector:
    """Reads the facts of a request body and makes the edits policy needs (`include_usage`)."""

    def __init__(
        self,
        *,
        default_max_tokens: int,
        enforce_max_tokens: bool = False,
        allow_background: bool = False,
        full_parse_limit: int = FULL_PARSE_LIMIT,
        step_budget: int = STEP_BUDGET,
        steps_per_turn: int = STEPS_PER_TURN,
    ) -> None:
        self.default_max_tokens = default_max_tokens
        # A request that sets no completion cap gets `default_max_tokens` written in, so that what it may
        # generate is what was reserved (else vLLM's own default: the rest of the context window).
        self.enforce_max_tokens = enforce_max_tokens
        # `background: true` on the Responses API: its usage reaches only a later GET of the stored response,
        # never this request; allowed, it is charged its reservation (`accounting.charge`). Else a 400.
        self.allow_background = allow_background
        self.full_parse_limit = full_parse_limit
        self.step_budget = step_budget
        self.steps_per_turn = steps_per_turn

    async def inspect(
        self, path: str, body: bytes, *, json_body: bool = True, priority: int = 0, assign_priority: bool = False
    ) -> tuple[bytes, RequestFacts]:
        """(bytes to forward, facts) of a POST body; GatewayError 400 for a body that is not a JSON object.

        `priority` is the most urgent vLLM priority the principal may use: a client's own `priority`
        is clamped to it (a client may lower its urgency, never raise it); with `assign_priority` a
        body without one gets it written in (fairness on: every request carries its class).
        """
        generates = path not in PROMPT_ONLY_ROUTES
        cap = self.default_max_tokens if generates else 0
        if not json_body:  # a form upload (audio): nothing to read, the prompt is not text
            return body, RequestFacts(completion_cap=cap)
        if not body:
            return body, RequestFacts(completion_cap=cap)
        if body[:1] in _ENCODED_STARTS or body[1:2] == b"\x00":  # (one test for the rare starts: not ASCII JSON)
            if body[:3] == _UTF8_BOM:
                return await self._after_bom(path, body, priority, assign_priority)
            body = _as_utf8(body)
        prompt = max(1, len(body) // BYTES_PER_TOKEN)
        spans: dict[str, Span] | None = None
        if len(body) <= self.full_parse_limit:
            fields = _parse(body)
        else:
            spans = await self._spans(body)
            fields = _decode_values(body, spans)
        model = fields.get("model")
        if isinstance(model, str):
            if not valid_unicode(model):
                # JSON's "\ud800" decodes to a lone surrogate: no server serves a model of that name, and as a
                # metric label or a usage row it broke every scrape and every usage write after it.
                raise GatewayError(400, "The model name is not valid Unicode.", code="invalid_model", param="model")
            if len(model) > MAX_MODEL_NAME:
                # Behind an upstream that serves any name, a 60 KB name became a metric label: 32 of them
                # made every scrape ~45 MB (and a usage row each, every hour).
                raise GatewayError(
                    400,
                    f"The model name is longer than {MAX_MODEL_NAME} characters.",
                    code="invalid_model",
                    param="model",
                )
        stream = lax_bool(fields.get("stream")) is True
        background = path in BACKGROUND_ROUTES and "background" in fields and self._background(fields, body, spans)
        if generates:
            # Enforced, a cap too large to read is replaced by the default (`_write_cap`): that is what it reads.
            unread = self.default_max_tokens if self.enforce_max_tokens and path in CAP_FIELDS else None
            asked = _first_positive(fields, CAP_FIELDS.get(path, _CAPS), unread)
            choices = max(1, lax_int(fields.get("n")) or 1, lax_int(fields.get("best_of")) or 1)
            if path in BATCH_PROMPT_ROUTES:
                choices *= _batch(fields, body, spans)
            cap = (self.default_max_tokens if asked is None else asked) * choices
        facts = RequestFacts(
            model=model if isinstance(model, str) else None,
            stream=stream,
            prompt_estimate=prompt,
            completion_cap=cap,
            priority=lax_int(fields.get("priority")),
            background=background,
        )
        if generates and self.enforce_max_tokens and path in CAP_FIELDS:
            body, spans = await self._write_cap(body, fields, spans, CAP_FIELDS[path])
        if path in PRIORITY_ROUTES:
            body, spans, facts = await self._clamp_priority(body, fields, spans, facts, priority, assign_priority)
        if not stream or path not in USAGE_OPTION_ROUTES:
            return body, facts
        if "stream_options" not in fields:
            opening = body.index(b"{") + 1  # the body is an object with at least `stream` in it
            edited = body[:opening] + _INCLUDE_USAGE + body[opening:]
        else:
            options = fields["stream_options"]
            if not _without_usage(options):
                return body, facts
            if spans is None:
                spans = await self._spans(body)
            span = spans["stream_options"]
            merged = json.dumps({**(options or {}), "include_usage": True}, separators=(",", ":")).encode()
            edited = body[: span.start] + merged + body[span.end :]
        return edited, RequestFacts(
            facts.model, True, True, prompt, facts.completion_cap, facts.priority, facts.background
        )

    async def _after_bom(
        self, path: str, body: bytes, priority: int, assign_priority: bool
    ) -> tuple[bytes, RequestFacts]:
        """A UTF-8 body behind a byte order mark, which `json.loads` (and so vLLM's server) skips: inspected without
        it, as any other (the scanner of a large body and the byte edits know no mark: a large one was a 400),
        and forwarded with it, as received. After the mark, `json.loads` reads UTF-8 alone: no second mark, no
        UTF-16 or UTF-32 (refused here too, where inspecting the rest would have made them UTF-8)."""
        rest = body[3:]
        if rest[:1] in _ENCODED_STARTS or rest[1:2] == b"\x00":
            raise _invalid("The request body is not valid JSON.")
        edited, facts = await self.inspect(path, rest, priority=priority, assign_priority=assign_priority)
        return _UTF8_BOM + edited, facts

    def _background(self, fields: dict[str, Any], body: bytes, spans: dict[str, Span] | None) -> bool:
        """Whether the request asks for a background response (as vLLM reads `background`), if it may."""
        if lax_bool(fields["background"]) is not True:
            return False  # false, null, or a value vLLM refuses itself
        if not self.allow_background:
            raise GatewayError(
                400,
                "Background responses are not enabled on this gateway: their usage is reported only when the "
                "stored response is fetched, so they cannot be accounted. Send the request without `background`.",
                code="background_not_supported",
                param="background",
            )
        if fields.get("previous_response_id") is not None:
            # Its prompt holds the earlier conversation, which the request's bytes do not show: the
            # reservation (all a background response is charged) would be far below what the engine reads.
            raise GatewayError(
                400,
                "A background response cannot continue a previous response (`previous_response_id`): its "
                "prompt cannot be estimated. Send the conversation as `input`, or leave out `background`.",
                code="background_not_supported",
                param="previous_response_id",
            )
        if not _text_only(fields.get("input") if spans is None else _lazy_input(body, spans)):
            raise GatewayError(
                400,
                "A background response's `input` must be text (strings or text parts; a list at most 64 KiB): "
                "images, files and stored items add prompt tokens that cannot be estimated. Leave out "
                "`background`, or send the text alone.",
                code="background_not_supported",
                param="input",
            )
        tools = fields.get("tools") if spans is None else _decode_lazy(body, spans, "tools")
        if _built_in(tools):
            # vLLM calls built-in tools itself (a tool server's code interpreter, web search, container, MCP), in a
            # loop whose later turns may each generate up to the rest of the context window: the enforced cap
            # bounds the first turn only, and the reservation (all a background response is charged) with it.
            raise GatewayError(
                400,
                "A background response cannot use built-in tools (only `function` tools): what they generate "
                "cannot be bounded. Leave out `background`, or the built-in tools.",
                code="background_not_supported",
                param="tools",
            )
        return True

    async def _write_cap(
        self, body: bytes, fields: dict[str, Any], spans: dict[str, Span] | None, names: tuple[str, ...]
    ) -> tuple[bytes, dict[str, Span] | None]:
        """The body with the last of `names` set to `default_max_tokens` where vLLM would read no cap from it:
        written in, or in place of a `null` (of duplicates vLLM reads the last, the one `spans` holds), or of a
        0 that vLLM's `or` passes over; spans None once the bytes moved. A value too large to decode (UNREAD)
        is replaced wherever it is, since vLLM would read it and the gateway reserved the default. A cap set
        to something vLLM refuses (-1, "x", a last 0) is left for it to refuse."""
        present = {name: fields[name] for name in names if name in fields}
        unread = [name for name, value in present.items() if value is UNREAD]
        caps = [lax_int(value) for value in present.values() if value is not None and value is not UNREAD]
        if None in caps:
            return body, spans  # vLLM refuses the request
        default = b"%d" % self.default_max_tokens
        last = names[-1]
        if unread or any(caps):  # the client's own cap, or none readable
            if not unread:
                return body, spans
            assert spans is not None  # UNREAD comes from the scanner's spans
            for span in sorted((spans[name] for name in unread), key=lambda span: span.start, reverse=True):
                body = body[: span.start] + default + body[span.end :]
            return body, None
        if last not in present:
            opening = body.index(b"{") + 1
            return body[:opening] + b'"%s":%s,' % (last.encode(), default) + body[opening:], None
        if present[last] is not None:
            return body, spans  # a 0 where vLLM reads it: refused
        if spans is None:
            spans = await self._spans(body)
        span = spans[last]
        return body[: span.start] + default + body[span.end :], None

    async def _clamp_priority(
        self,
        body: bytes,
        fields: dict[str, Any],
        spans: dict[str, Span] | None,
        facts: RequestFacts,
        floor: int,
        assign: bool,
    ) -> tuple[bytes, dict[str, Span] | None, RequestFacts]:
        """The body with `priority` held to `floor` (or written in); spans None once the bytes moved."""
        if "priority" not in fields:
            if not assign or floor == 0:  # vLLM's default is 0: nothing to write
                return body, spans, facts
            opening = body.index(b"{") + 1
            edited = body[:opening] + b'"priority":%d,' % floor + body[opening:]
            return edited, None, _with_priority(facts, floor)
        claimed = facts.priority
        if claimed is None:  # not an integer: vLLM refuses the request itself
            return body, spans, facts
        wanted = max(claimed, floor)
        if wanted == claimed and fields["priority"] == claimed:
            return body, spans, facts
        if spans is None:
            spans = await self._spans(body)
        span = spans["priority"]
        edited = body[: span.start] + b"%d" % wanted + body[span.end :]
        return edited, None, _with_priority(facts, wanted)

    async def _spans(self, body: bytes) -> dict[str, Span]:
        try:
            members = Members(body, WANTED, self.step_budget)
            while not members.run(self.steps_per_turn):  # noqa: ASYNC110 (a turn for others, not a wait)
                await asyncio.sleep(0)  # a large body never holds the event loop for long
            return members.spans()
        except Malformed:
            raise _invalid("The request body must be a JSON object.") from None
        except TooComplex:
            raise GatewayError(
                400,
                f"The request body has more than {self.step_budget} strings and arrays to inspect.",
                code="request_too_complex",
            ) from None


def _with_priority(facts: RequestFacts, priority: int) -> RequestFacts:
    return RequestFacts(
        facts.model,
        facts.stream,
        facts.usage_added,
        facts.prompt_estimate,
        facts.completion_cap,
        priority,
        facts.background,
    )


_UTF8_BOM = b"\xef\xbb\xbf"
# First bytes of a body that is not plain UTF-8 JSON: a byte order mark (UTF-8's, UTF-16's, or UTF-32's, which
# begins as UTF-16's does) or a NUL (RFC 4627's pattern for UTF-16 and UTF-32, also a NUL second byte). No
# JSON text in UTF-8 starts with a byte that is not ASCII.
_ENCODED_STARTS = frozenset({b"\x00", b"\xff", b"\xfe", b"\xef"})


def _as_utf8(body: bytes) -> bytes:
    """A JSON body in UTF-16 or UTF-32 (json.loads and vLLM's server read those too), as UTF-8: the byte edits
    (`include_usage`, `priority`, the cap) are UTF-8, and written into the original they made a body no server
    reads. Detected as `json.loads` detects it (RFC 4627's NUL pattern, or a byte order mark)."""
    encoding = json.detect_encoding(body)
    if encoding in ("utf-8", "utf-8-sig"):
        return body
    try:
        return body.decode(encoding).encode()
    except UnicodeError:
        raise _invalid("The request body is not valid JSON.") from None


def _parse(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise _invalid("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise _invalid("The request body must be a JSON object.")
    return payload


def _decode_values(body: bytes, spans: dict[str, Span]) -> dict[str, Any]:
    """The wanted values of a large body, each decoded alone (one too large to be a policy value is UNREAD)."""
    return {key: _decode_span(body, span) for key, span in spans.items() if key not in _LAZY}


def _decode_lazy(body: bytes, spans: dict[str, Span], key: str) -> Any:
    """A `_LAZY` value of a large body: None if absent, UNREAD if too large to decode."""
    span = spans.get(key)
    return None if span is None else _decode_span(body, span)


def _decode_span(body: bytes, span: Span) -> Any:
    """One value of a large body, decoded alone; UNREAD if too large to be a policy value."""
    if span.end - span.start > _VALUE_LIMIT:
        return UNREAD
    try:
        return json.loads(body[span.start : span.end])
    except (ValueError, RecursionError):
        raise _invalid("The request body is not valid JSON.") from None


def _lazy_input(body: bytes, spans: dict[str, Span]) -> Any:
    """A large body's `input`: a string (text, whatever its size) as "", else decoded (UNREAD past 64 KiB)."""
    span = spans.get("input")
    if span is not None and body[span.start : span.start + 1] == b'"':
        return ""
    return _decode_lazy(body, spans, "input")


def _text_only(value: object) -> bool:
    """Whether a Responses `input` holds text alone (`_TEXT_ITEMS` of `_TEXT_PARTS`); too large to read: not.
    Neither a string nor a list: vLLM refuses it."""
    if value is UNREAD:
        return False
    if not isinstance(value, list):
        return True
    for item in value:
        if not isinstance(item, dict) or item.get("type", "message") not in _TEXT_ITEMS:
            return False
        for key in ("content", "output", "summary"):
            parts = item.get(key)
            if parts is None or isinstance(parts, str):
                continue
            if not isinstance(parts, list):
                return False
            if not all(isinstance(part, dict) and part.get("type") in _TEXT_PARTS for part in parts):
                return False
    return True


def _built_in(tools: object) -> bool:
    """Whether Responses `tools` may hold a tool vLLM runs itself (any type but `function`); too large to read:
    may. Not a list: vLLM refuses the request."""
    if tools is UNREAD:
        return True
    return isinstance(tools, list) and any(not isinstance(t, dict) or t.get("type") != "function" for t in tools)


def _batch(fields: dict[str, Any], body: bytes, spans: dict[str, Span] | None) -> int:
    """How many prompts a completions request holds: vLLM renders its `prompt_embeds` (one base64 tensor or a
    list of them) and then its `prompt` (absent, null or "" adds none), and generates for each."""
    prompt, embeds = fields.get("prompt"), fields.get("prompt_embeds")
    if embeds is None:
        return _prompts(prompt, body, spans, "prompt")
    count = _prompts(embeds, body, spans, "prompt_embeds")
    if prompt is not None and prompt != "":
        count += _prompts(prompt, body, spans, "prompt")
    return count


def _prompts(prompt: object, body: bytes, spans: dict[str, Span] | None, name: str) -> int:
    """How many prompts a completions `prompt` (or `prompt_embeds`) holds (vLLM generates up to `max_tokens`
    for each).

    A string or a list of token ids is one prompt; a list of strings or of token-id lists is one per
    element. A list too large to decode (UNREAD) is counted in its bytes, at C speed.
    """
    if isinstance(prompt, list):
        return max(1, len(prompt)) if prompt and isinstance(prompt[0], str | list) else 1
    if prompt is UNREAD and spans is not None:
        span = spans[name]
        return _elements(body[span.start : span.end])
    return 1


def _elements(value: bytes) -> int:
    """The elements of a JSON array of strings (its quotes / 2) or of token-id arrays (its inner `[`s),
    counted in C: 1 for anything else. A shape vLLM refuses may be miscounted; it generates nothing."""
    if value[:1] != b"[":
        return 1
    inner = value[1:-1].strip(b" \t\r\n")
    if inner[:1] == b"[":
        return max(1, inner.count(b"["))
    if inner[:1] != b'"':
        return 1  # token ids (or not a prompt vLLM takes): one prompt
    if b"\\" in inner:
        inner = inner.replace(b"\\\\", b"").replace(b'\\"', b"")  # escaped quotes are not string ends
    return max(1, inner.count(b'"') // 2)


def _without_usage(options: object) -> bool:
    """Whether `stream_options` (present) leaves usage off, so that the gateway may merge it in."""
    if options is None:
        return True
    if not isinstance(options, dict):
        return False  # not an object: the model server refuses the request anyway
    # vLLM's `include_usage` defaults to true once `stream_options` is given: absent, the client asked.
    # Asked in any form vLLM accepts: the client's to see; a value vLLM refuses: left for vLLM to refuse.
    asked = options.get("include_usage", True)
    return asked is None or lax_bool(asked) is False


def _first_positive(fields: dict[str, Any], names: tuple[str, ...], unread: int | None = None) -> int | None:
    """The first of `names` holding a positive integer (vLLM: `max_completion_tokens or max_tokens`); a value
    too large to decode counts as `unread`."""
    for name in names:
        value = fields.get(name)
        value = unread if value is UNREAD else lax_int(value)
        if value is not None and value > 0:
            return value
    return None


def _invalid(message: str) -> GatewayError:
    return GatewayError(400, message, code="invalid_json")


class InspectBody:
    """The `/v1` stage between authentication and the limits: reads the body once, records its facts.

    The limiter reserves from the facts (prompt estimate + completion cap) before anything is
    forwarded; the proxy gets the body (edited or not) through `receive`, as if from the client.
    """

    def __init__(
        self,
        app: ASGIApp,
        inspector: RequestInspector,
        *,
        max_body: int,
        body_timeout: float,
        model_routes: frozenset[str] | None = None,
        classes: ClassTable | None = None,
        default_model: str = "",
    ) -> None:
        self.app = app
        # Priority classes (fairness on): every request carries its principal's class as vLLM's priority.
        # Off: a client's own `priority` is still held to 0, so it cannot jump an engine's queue.
        self.classes = classes
        self.inspector = inspector
        self.max_body = max_body
        self.body_timeout = body_timeout
        # Routes whose body names the model (None: every POST). A restricted principal must name one of its
        # own there; elsewhere (the token endpoint) the route table already decided.
        self.model_routes = model_routes
        # The model an engine serves a request that names none (vLLM: its first served name). Such a request
        # is that model's, for budgets scoped to it, usage, metrics and the audit line, or leaving `model`
        # out would spend a model's tokens outside its budget.
        self.default_model = default_model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        try:
            body = await self._read(scope, receive, exchange)
        except GatewayError as error:
            exchange.status, exchange.outcome = error.status, Outcome.REJECTED
            exchange.reason = exchange.reason or error.resolved_code
            await send_error(send, error, [(b"x-request-id", exchange.request_id.encode())])
            return
        except ClientGone:
            exchange.outcome = Outcome.CLIENT_DISCONNECT
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive, exchange: Exchange) -> bytes:
        try:
            # A body already received whole is read without arming a timer (~10 µs per request).
            seconds = None if body_received(scope) else self.body_timeout
            body = await read_body(receive, self.max_body, header(scope, b"content-length"), seconds)
        except BodyTooLarge:
            raise GatewayError(413, f"The request body exceeds {self.max_body} bytes.") from None
        except BodyTimeout:
            raise GatewayError(408, "The request body was not received in time.") from None
        if scope["method"] != "POST" or exchange.route in RETRIEVAL_ROUTES:
            return body  # nothing generated: nothing to reserve (`accounting.charge` charges it nothing)
        content_type = header(scope, b"content-type")
        form = content_type is not None and content_type.startswith(b"multipart/")
        principal = exchange.principal
        scoped = self.model_routes is None or exchange.route in self.model_routes
        restricted = principal if scoped and principal is not None and principal.models is not None else None
        if form and restricted is not None:
            raise refusal("model_not_allowed")  # the model is inside the form: a restricted key may not upload
        classes = self.classes
        floor = classes.of(principal).order if classes is not None else 0
        body, facts = await self.inspector.inspect(
            exchange.path, body, json_body=not form, priority=floor, assign_priority=classes is not None
        )
        if facts.model:
            exchange.model = facts.model
        elif scoped and self.default_model:  # `null`, `""` or absent: vLLM serves its default model
            exchange.model = self.default_model
        if restricted is not None and not restricted.allows(facts.model):  # no model, or not one of its own
            raise refusal("model_not_allowed")
        exchange.stream = facts.stream
        exchange.usage_added = facts.usage_added
        exchange.prompt_estimate = facts.prompt_estimate
        exchange.completion_cap = facts.completion_cap
        exchange.priority = facts.priority
        exchange.background = facts.background
        return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the next stage: the body already read, then the client's own messages (disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
