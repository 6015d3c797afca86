"""A fake vLLM OpenAI server for tests, benchmarks and the no-GPU demo.

It speaks the same wire format as vLLM (chunk shapes, the usage-only final
chunk, `data: [DONE]`, `{"error": "Unauthorized"}` for a wrong key, `vllm:*`
metrics) and generates deterministic text, so a stream through the gateway can
be compared byte for byte with one taken directly. Like vLLM, it runs at most
`max_num_seqs` sequences at once and queues the rest (`scheduler.py`), so load
shows in TTFT and in `vllm:num_requests_running/waiting`. It is plain ASGI with
pre-encoded chunk templates so that it is never the bottleneck of a benchmark.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import random
import time
import zlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..asgi import ClientGone, DisconnectWatch, Receive, Scope, Send, header, read_body
from .scheduler import Scheduler
from .settings import SimulatorSettings

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright lanterns sway above "
    "calm water and distant bells ring across green hills near an old stone bridge"
).split()
_EVENT_STREAM = (b"content-type", b"text/event-stream; charset=utf-8")
MAX_MODEL_LEN = 32768  # what its model card and its /tokenize answers say, as vLLM's do
_MAX_BODY = 64 << 20


# vLLM's buckets for its request-phase histograms (queue, prefill, decode, end-to-end).
_PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                  480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _Metrics:
    """vLLM's series that the gateway reads; the scheduler's gauges are read from it at scrape time."""

    def __init__(self, model: str, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.prompt = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry)
        self.generation = Counter(
            "vllm:generation_tokens", "Generation tokens produced.", labels, registry=self.registry
        )
        self.finished = Counter(
            "vllm:request_success",
            "Finished requests by reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=self.registry,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=self.registry
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            labels,
            buckets=_PHASE_BUCKETS,
            registry=self.registry,
        )
        self.prompt_m = self.prompt.labels(model)
        self.generation_m = self.generation.labels(model)
        self.queue_time_m = self.queue_time.labels(model)
        self.running.labels(model).set_function(lambda: scheduler.running)
        self.waiting.labels(model).set_function(lambda: scheduler.waiting)
        self.reasons = {r: self.finished.labels(model, r) for r in ("stop", "length", "abort")}


class Simulator:
    """The ASGI app. One instance per process; all state lives here."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.scheduler = Scheduler(settings.max_num_seqs, settings.scheduling_policy)
        self.metrics = _Metrics(settings.model, self.scheduler)
        self._key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self._random = random.Random(settings.seed)
        self._served = 0
        self._created = int(time.time())
        self._model_json = json.dumps(settings.model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            await _send(send, 200, b"", b"application/json")
        elif path == "/metrics":
            await _send(send, 200, generate_latest(self.metrics.registry), b"text/plain; version=0.0.4")
        elif path.startswith("/v1/") and not self._authorized(scope):
            await _send(send, 401, b'{"error":"Unauthorized"}')
        elif path == "/v1/models" and method == "GET":
            await _send(send, 200, self._models())
        elif path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            await self._generate(scope, receive, send, chat=path == "/v1/chat/completions")
        elif path == "/tokenize" and method == "POST":  # like vLLM's: outside /v1, so outside its API key
            await self._tokenize(receive, send)
        else:
            await _send(send, 404, _vllm_error(404, "Not Found"))

    def _authorized(self, scope: Scope) -> bool:
        if self._key is None:
            return True
        given = header(scope, b"authorization") or b""
        return hmac.compare_digest(given, b"Bearer " + self._key)

    def _models(self) -> bytes:
        card = {
            "id": self.settings.model,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm",
            "root": self.settings.model,
            "parent": None,
            "max_model_len": MAX_MODEL_LEN,
        }
        return json.dumps({"object": "list", "data": [card]}).encode()

    async def _tokenize(self, receive: Receive, send: Send) -> None:
        """vLLM's `POST /tokenize`: a chat's `messages` or a `prompt`, counted as this server's usage counts them
        (so the gateway's count of a prompt whose usage it never read is what the usage would have said)."""
        try:
            request = await _json_object(receive)
        except ClientGone:
            return
        if request is None or not ("messages" in request or isinstance(request.get("prompt"), str)):
            await _send(send, 400, _vllm_error(400, "Invalid tokenize request"))
            return
        count = prompt_tokens(request, chat="messages" in request)
        answer = {"count": count, "max_model_len": MAX_MODEL_LEN, "tokens": list(range(count)), "token_strs": None}
        await _send(send, 200, json.dumps(answer, separators=(",", ":")).encode())

    async def _generate(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        self._served += 1
        if self.settings.crash_after and self._served > self.settings.crash_after:
            os._exit(3)  # a crash, not a shutdown: what the supervisor must survive
        try:
            request = await _json_object(receive)
        except ClientGone:
            return
        if request is None:
            await _send(send, 400, _vllm_error(400, "Invalid JSON body"))
            return
        if self.settings.error_rate and self._random.random() < self.settings.error_rate:
            await _send(send, 500, _vllm_error(500, "Simulated engine failure"))
            return
        request_id = header(scope, b"x-request-id")
        job = _Job(self, request, chat=chat, request_id=request_id.decode("latin-1") if request_id else None)
        if job.invalid:
            await _send(send, 400, _vllm_error(400, job.invalid))
            return
        watch = DisconnectWatch(scope, receive, delay=0.0)  # like vLLM: stop generating the moment the client goes
        running = False
        try:
            if self.settings.admission_delay:  # vLLM's API server: parse, tokenize, hand to the engine core
                await asyncio.sleep(self.settings.admission_delay)
            if job.stream:  # like vLLM, the head goes out once admitted and the first token once scheduled
                await send({"type": "http.response.start", "status": 200, "headers": [_EVENT_STREAM]})
            waited = await self.scheduler.acquire(job.seqs, job.priority)
            running = True
            self.metrics.queue_time_m.observe(waited)
            if job.stream:
                await job.stream_to(send, watch)
            else:
                await job.respond(send, watch)
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
            self.metrics.reasons["abort"].inc()
            self.metrics.generation_m.inc(job.generated)
        finally:
            watch.finish()
            if running:
                self.scheduler.release(job.seqs)


class _Job:
    """One generation request: its parameters and the bytes it produces."""

    def __init__(self, sim: Simulator, request: dict[str, Any], *, chat: bool, request_id: str | None) -> None:
        self.sim = sim
        self.chat = chat
        self.invalid = ""
        self.stream = request.get("stream") is True
        options = request.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        n = request.get("n", 1)
        cap = request.get("max_completion_tokens", request.get("max_tokens"))
        if not isinstance(n, int) or not 1 <= n <= 16:
            self.invalid = "n must be an integer between 1 and 16"
            n = 1
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            self.invalid = "max_tokens must be a positive integer"
            cap = None
        priority = request.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            self.invalid = "priority must be an integer"
            priority = 0
        self.priority = priority
        self.n = n
        # vLLM runs each of the n choices as a sequence of its own; one that needs more than the batch
        # holds would never run, so it takes the whole batch instead.
        self.seqs = min(n, sim.settings.max_num_seqs)
        tokens = sim.settings.tokens
        self.length = min(tokens, cap) if cap is not None else tokens
        self.finish_reason = "length" if cap is not None and cap <= tokens else "stop"
        text = _prompt_text(request, chat)
        self.prompt_tokens = _count(text, chat)
        start = zlib.crc32(text.encode())
        self.words = [" " + WORDS[(start + i) % len(WORDS)] for i in range(self.length)]
        self.generated = 0
        # Like vLLM, the response id follows the caller's X-Request-Id when there is one.
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{request_id or os.urandom(12).hex()}"
        self.created = sim.settings.created or int(time.time())
        self.head = (
            f'{{"id":{json.dumps(rid)},"object":"{"chat.completion.chunk" if chat else "text_completion"}",'
            f'"created":{self.created},"model":{sim._model_json},'
        )
        self.rid = rid

    def _usage(self) -> dict[str, int]:
        completion = self.length * self.n
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens": completion,
        }

    def _account(self) -> None:
        metrics = self.sim.metrics
        metrics.prompt_m.inc(self.prompt_tokens)
        metrics.generation_m.inc(self.length * self.n)
        metrics.reasons[self.finish_reason].inc()

    def _chunk(self, index: int, piece: str, finish: str | None) -> bytes:
        reason = "null" if finish is None else f'"{finish}"'
        if self.chat:
            delta = f'{{"content":{json.dumps(piece)}}}'
            choice = f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{reason}}}'
        else:
            choice = f'{{"index":{index},"text":{json.dumps(piece)},"logprobs":null,"finish_reason":{reason}}}'
        return f'data: {self.head}"choices":[{choice}]}}\n\n'.encode()

    async def stream_to(self, send: Send, watch: DisconnectWatch) -> None:
        """The body of a stream whose head was sent, from the moment it was scheduled."""
        settings = self.sim.settings
        if settings.ttft:
            await asyncio.sleep(settings.ttft)
        if self.chat:
            role = '{"role":"assistant","content":""}'
            first = "".join(
                f'data: {self.head}"choices":[{{"index":{i},"delta":{role},"logprobs":null,'
                f'"finish_reason":null}}]}}\n\n'
                for i in range(self.n)
            )
            await send({"type": "http.response.body", "body": first.encode(), "more_body": True})
        last = self.length - 1
        itl, per_seq, scheduler = settings.itl, settings.itl_per_seq, self.sim.scheduler
        for step, word in enumerate(self.words):
            if step:
                interval = itl + per_seq * (scheduler.running - 1) if per_seq else itl
                if interval:
                    await asyncio.sleep(interval)
            finish = self.finish_reason if step == last else None
            body = b"".join(self._chunk(i, word, finish) for i in range(self.n))
            self.generated += self.n
            await send({"type": "http.response.body", "body": body, "more_body": True})
        tail = b""
        if self.include_usage:
            usage = json.dumps(self._usage(), separators=(",", ":"))
            tail = f'data: {self.head}"choices":[],"usage":{usage}}}\n\n'.encode()
        self._account()
        watch.finish()
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})

    async def respond(self, send: Send, watch: DisconnectWatch) -> None:
        settings = self.sim.settings
        if settings.itl_per_seq:  # the batch changes while it generates: one sleep per token
            await asyncio.sleep(settings.ttft)
            for _ in range(self.length - 1):
                await asyncio.sleep(settings.itl + settings.itl_per_seq * (self.sim.scheduler.running - 1))
        elif delay := settings.ttft + settings.itl * max(0, self.length - 1):
            await asyncio.sleep(delay)
        self.generated = self.length * self.n
        text = "".join(self.words)
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                    "stop_reason": None,
                }
                for i in range(self.n)
            ]
            kind = "chat.completion"
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": self.finish_reason, "stop_reason": None}
                for i in range(self.n)
            ]
            kind = "text_completion"
        body = {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.sim.settings.model,
            "choices": choices,
            "usage": self._usage(),
        }
        self._account()
        watch.finish()
        await _send(send, 200, json.dumps(body, separators=(",", ":")).encode())


def prompt_tokens(request: dict[str, Any], *, chat: bool) -> int:
    """A prompt's tokens as this server counts them: its words, and 4 for a chat's template."""
    return _count(_prompt_text(request, chat), chat)


def _count(text: str, chat: bool) -> int:
    return max(1, len(text.split())) + (4 if chat else 0)


def _prompt_text(request: dict[str, Any], chat: bool) -> str:
    if chat:
        parts = []
        for message in request.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
        return " ".join(parts)
    prompt = request.get("prompt", "")
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


async def _json_object(receive: Receive) -> dict[str, Any] | None:
    """The request body as a JSON object, or None if it is not one (`ClientGone` if the client left)."""
    try:
        request = json.loads(await read_body(receive, _MAX_BODY))
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


def _vllm_error(status: int, message: str) -> bytes:
    kinds = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
    error = {"object": "error", "message": message, "type": kinds.get(status, "Error"), "param": None, "code": status}
    return json.dumps(error).encode()


async def _send(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
