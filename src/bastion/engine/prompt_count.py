"""How many tokens a prompt was, as the engine that served it counts them (vLLM's `POST /tokenize`).

A request whose usage was never read (its client left, mid-stream or before the first token; the engine
broke mid-stream) used to be charged its prompt as `len(body) // 4`. A digit- or symbol-heavy prompt is about
one token per byte on Qwen, so a key holder who sent a 100k-token prompt and left after the first token paid a
quarter of the prefill it caused. Accounting follows what the engine did: its tokenizer (and chat template)
counts the prompt, over a small client of its own (client traffic never queues ahead of it, and it never
takes a traffic connection), bounded by a short timeout. Any failure (an upstream without `/tokenize`, such as
OpenAI's API; a timeout; an answer that is not a count) is `None`: the caller keeps the estimate.

Only a prompt `/tokenize` can express is asked about: a chat's text `messages` (with the chat-template fields
the request carried), a completions `prompt` that is one string (or a list of one); a prompt of token ids is
its own count. Anything else (several prompts, `prompt_embeds`, media parts, `documents`) is `None`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import TracebackType
from typing import Any, TypeGuard

from .. import http
from .state import Upstream

log = logging.getLogger("bastion.engine.prompt_count")

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
COUNTED_ROUTES = frozenset({CHAT_ROUTE, COMPLETIONS_ROUTE})
# What a chat request carries that its chat template reads, as vLLM's TokenizeChatRequest takes it.
_CHAT_FIELDS: tuple[str, ...] = (
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "mm_processor_kwargs",
)
_COMPLETION_FIELDS: tuple[str, ...] = ("add_special_tokens",)
# The part types vLLM reads as text on any model (chat_utils' MM_PARSER_MAP), media being everything else: a
# client's `input_text` or bare-string parts were a 100k-token prompt charged its bytes/4 estimate.
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})
PROMPT_COUNT_TIMEOUT = 2.0  # the whole call: connect, send, answer
PROMPT_COUNT_CONNECTIONS = 8  # per engine: a burst of clients leaving at once waits at most the timeout
_KEEPALIVE = 4.0  # below uvicorn's (and so vLLM's) 5 s keep-alive
# vLLM answers the token ids too (~6 bytes each): a 128k-token prompt is under 1 MiB.
_MAX_ANSWER = 4 * 1024 * 1024


def tokenize_request(route: str, body: bytes, model: str) -> bytes | int | None:
    """The `/tokenize` body that counts this request's prompt as the engine did; an int when the request
    itself says (a prompt of token ids); None when `/tokenize` cannot express it."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict):
        return None
    asked: dict[str, Any] = {"model": model} if model else {}
    if route == CHAT_ROUTE:
        messages = request.get("messages")
        # `documents` (which /tokenize does not take) only when there are some: null or [] is vLLM's default.
        if not isinstance(messages, list) or not messages or request.get("documents"):
            return None
        if not all(_text_message(message) for message in messages):
            return None  # media: /tokenize would fetch it again, and its placeholder count is not the bytes'
        asked["messages"] = messages
        fields = _CHAT_FIELDS
    elif route == COMPLETIONS_ROUTE:
        if request.get("prompt_embeds") is not None:
            return None
        prompt = request.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):  # token ids: counted as they are (vLLM adds no special token to them)
            return len(prompt) if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt) else None
        if not isinstance(prompt, str):
            return None
        asked["prompt"] = prompt
        fields = _COMPLETION_FIELDS
    else:
        return None
    for name in fields:
        if name in request:
            asked[name] = request[name]
    return json.dumps(asked, separators=(",", ":")).encode()


def _text_message(message: object) -> bool:
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, str) or (isinstance(part, dict) and part.get("type") in _TEXT_PARTS) for part in content
    )


def count_of(answer: bytes) -> int | None:
    """The `count` of a `/tokenize` answer, if it is a non-negative integer; never more than the answer's own
    `max_model_len` (vLLM's), as no prompt the engine ran can be longer: a broken upstream charges no more."""
    try:
        payload = json.loads(answer)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    count, limit = payload.get("count"), payload.get("max_model_len")
    if not _natural(count):
        return None
    return min(count, limit) if _natural(limit) and limit > 0 else count


def _natural(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PromptCounter:
    """Asks an engine to count a prompt, over connections of its own; an async context manager."""

    def __init__(
        self, timeout: float = PROMPT_COUNT_TIMEOUT, *, max_connections: int = PROMPT_COUNT_CONNECTIONS
    ) -> None:
        self.timeout = timeout
        self._client = http.Client(
            timeouts=http.Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout),
            max_connections=max_connections,
            keepalive_expiry=_KEEPALIVE,
        )

    async def count(self, upstream: Upstream, route: str, body: bytes, model: str, request_id: str) -> int | None:
        """The prompt's tokens as `upstream` counts them, or None (the caller keeps its estimate). Never raises
        but for a cancellation; takes at most `timeout` seconds."""
        asked = tokenize_request(route, body, model)
        if asked is None or isinstance(asked, int):
            return asked
        headers = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]
        if upstream.api_key:
            headers.append((b"authorization", b"Bearer " + upstream.api_key.encode()))
        why = ""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.open("POST", upstream.base_url, b"/tokenize", headers, asked)
                try:
                    answer, size = [], 0
                    while chunk := await response.read_some():
                        size += len(chunk)
                        if size > _MAX_ANSWER:
                            break
                        answer.append(chunk)
                finally:
                    response.release()  # read to its end: kept; anything else: closed
            if response.status != 200:
                why = f"POST /tokenize answered {response.status}"
            elif size > _MAX_ANSWER:
                why = f"its answer is over {_MAX_ANSWER} bytes"
            else:
                count = count_of(b"".join(answer))
                if count is not None:
                    return count
                why = "its answer holds no count"
        except TimeoutError:
            why = f"no answer within {self.timeout:g}s"
        except Exception as exc:  # refused, reset, not HTTP...: whatever it is, the estimate stands
            why = str(exc) or type(exc).__name__
        log.debug("request %s: the engine did not count its prompt (%s): charged the estimate", request_id, why)
        return None

    async def __aenter__(self) -> PromptCounter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.__aexit__(exc_type, exc, tb)
