"""A real-socket upstream that reads requests the way vLLM does, and answers as a test plans it.

vLLM parses a body with `json.loads` and validates it with pydantic models in lax mode:
`"stream": "yes"` streams, `stream_options.include_usage: "1"` asks for usage, and
`stream_options` on a request that does not stream is refused. This upstream does the
same (with pydantic itself), so the gateway is tested against what a hostile key holder
would really get from vLLM, not against a stricter stand-in.

What it answers is planned per request by the `x-plan` header (JSON): the usage to report
and whether to report it at all, where the usage sits in a body (before large trailing
fields, as vLLM writes `prompt_logprobs`), how many events a stream has, how the bytes
are cut into writes, and a delay before answering. It records every request it received.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

LAX_BOOL = TypeAdapter(bool | None)


@dataclass
class Plan:
    prompt: int = 7
    completion: int = 5
    report: bool = True  # include usage at all (a stream also needs include_usage)
    position: str = "end"  # in a body: "end", "first", or "before_trailing" (50 KB of fields after it)
    events: int = 3  # content events of a stream
    chunks: list[int] = field(default_factory=lambda: [1 << 20])  # sizes of the writes, cycled
    delay: float = 0.0  # seconds before the response starts
    terminal: str = "response.completed"  # a responses stream's last event (OpenAI's API: or .incomplete, .failed)

    @classmethod
    def of(cls, head: dict[str, str]) -> Plan:
        return cls(**json.loads(head["x-plan"])) if "x-plan" in head else cls()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Refused(Exception):
    """What vLLM answers 400 to."""


def lax(value: object) -> bool:
    try:
        return bool(LAX_BOOL.validate_python(value))
    except ValidationError:
        raise Refused(f"not a valid boolean: {value!r}") from None


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small pieces leave as they are written
        buffer = b""
        with contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                received = Received(path, headers, body)
                self.server.received.append(received)
                self.server.answer(sock, method, received)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the gateway opens many connections at once

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[Received] = []

    def answer(self, sock: socket.socket, method: str, request: Received) -> None:
        plan = Plan.of(request.headers)
        if request.path in ("/health", "/v1/models"):
            body = b'{"object":"list","data":[{"id":"m","object":"model"}]}' if request.path != "/health" else b""
            _send(sock, 200, "application/json", body, plan)
            return
        if request.path == "/tokenize":  # an OpenAI-compatible upstream that is not vLLM: no tokenizer route
            _send(sock, 404, "application/json", b'{"detail":"Not Found"}', plan)
            return
        if request.path.startswith("/v1/responses/"):  # a stored response: fetched, replayed or cancelled
            _stored(sock, method, request, plan)
            return
        if request.headers.get("content-type", "").startswith("multipart/"):  # an audio upload
            usage = {"usage": _usage("audio", plan)} if plan.report else {}
            _send(sock, 200, "application/json", json.dumps({"text": "hi", **usage}).encode(), plan)
            return
        try:
            payload = json.loads(request.body)
            if not isinstance(payload, dict):
                raise Refused("not an object")
            kind, stream, include_usage, continuous = _read(request.path, payload)
        except (ValueError, Refused) as exc:
            error = json.dumps({"object": "error", "message": str(exc), "type": "BadRequestError", "code": 400})
            _send(sock, 400, "application/json", error.encode(), Plan())
            return
        time.sleep(plan.delay)
        if kind == "responses" and lax(payload.get("background", False)) and not stream:
            # vLLM (with VLLM_ENABLE_RESPONSES_API_STORE=1): stored as queued, answered at once without usage,
            # generated afterwards; the usage is in the stored response a GET /v1/responses/{id} returns.
            queued = {"id": "resp_bg", "object": "response", "status": "queued", "output": [], "usage": None}
            _send(sock, 200, "application/json", json.dumps(queued).encode(), plan)
            return
        if stream:
            _send_stream(sock, _events(kind, plan, include_usage, continuous), plan)
        else:
            _send(sock, 200, "application/json", _body(kind, plan), plan)


def _stored(sock: socket.socket, method: str, request: Received, plan: Plan) -> None:
    """vLLM's GET /v1/responses/{id} (`?stream=true` replays its events) and POST .../cancel: the stored
    response, usage and all, as often as it is asked for."""
    path, _, query = request.path.partition("?")
    if method == "GET" and "stream=true" in query:
        _send_stream(sock, _events("responses", plan, True, False), plan)
        return
    status = "cancelled" if path.endswith("/cancel") else "completed"
    stored = {"id": path.split("/")[3], "object": "response", "status": status, "output": [{"type": "message"}]}
    stored["usage"] = _usage("responses", plan) if plan.report else None
    _send(sock, 200, "application/json", json.dumps(stored).encode(), plan)


def _read(path: str, payload: dict[str, Any]) -> tuple[str, bool, bool, bool]:
    """(route kind, streams, include_usage, continuous_usage_stats) as vLLM's request models read them."""
    kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/responses": "responses"}.get(
        path, "embeddings" if path == "/v1/embeddings" else "other"
    )
    stream = lax(payload.get("stream", False)) if kind != "embeddings" else False
    options = payload.get("stream_options")
    include_usage = continuous = False
    if kind in ("chat", "completion") and options is not None:
        if not isinstance(options, dict):
            raise Refused("stream_options must be an object")
        if options and not payload.get("stream"):  # vLLM's check, on the raw value
            raise Refused("Stream options can only be defined when `stream=True`.")
        include_usage = lax(options.get("include_usage", True))  # vLLM's StreamOptions default
        continuous = include_usage and lax(options.get("continuous_usage_stats", False))
    return kind, stream, include_usage, continuous


def _usage(kind: str, plan: Plan) -> dict[str, int]:
    if kind == "responses":
        return {
            "input_tokens": plan.prompt,
            "output_tokens": plan.completion,
            "total_tokens": plan.prompt + plan.completion,
        }
    if kind == "embeddings":
        return {"prompt_tokens": plan.prompt, "total_tokens": plan.prompt}
    return {
        "prompt_tokens": plan.prompt,
        "total_tokens": plan.prompt + plan.completion,
        "completion_tokens": plan.completion,
    }


def _body(kind: str, plan: Plan) -> bytes:
    # Generated text that mentions usage, as a hostile prompt can make a model write.
    text = 'the "usage": {"prompt_tokens": 1000000} is a lie'
    if kind == "embeddings":
        fields: dict[str, Any] = {"object": "list", "data": [{"object": "embedding", "embedding": [0.1] * 16}]}
    elif kind == "responses":
        fields = {"id": "resp-1", "object": "response", "output": [{"type": "message", "content": [{"text": text}]}]}
    else:
        fields = {"id": "cmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": text}}]}
    usage = _usage(kind, plan) if plan.report else None
    trailing: dict[str, Any] = {}
    if plan.position == "before_trailing":
        logprobs = [{str(i): {"logprob": -0.5, "decoded_token": '"usage":{'}} for i in range(600)]
        trailing = {
            "prompt_logprobs": [None, *logprobs],
            "prompt_token_ids": list(range(600)),
            "kv_transfer_params": None,
        }
    if usage is None:
        ordered = {**fields, **trailing}
    elif plan.position == "first":
        ordered = {"usage": usage, **fields}
    else:
        ordered = {**fields, "usage": usage, **trailing}
    return json.dumps(ordered).encode()


def _events(kind: str, plan: Plan, include_usage: bool, continuous: bool) -> list[bytes]:
    def event(data: dict[str, Any], name: str | None = None) -> bytes:
        prefix = f"event: {name}\n" if name else ""
        return f"{prefix}data: {json.dumps(data)}\n\n".encode()

    if kind == "responses":
        events = [event({"response": {"id": "r", "usage": None}, "type": "response.created"}, "response.created")]
        events += [event({"delta": '"usage":{', "type": "response.output_text.delta"}) for _ in range(plan.events)]
        done: dict[str, Any] = {"id": "r", "output": [{"type": "message"}]}
        if plan.report:
            done["usage"] = _usage(kind, plan)
        events.append(event({"response": done, "sequence_number": 9, "type": plan.terminal}, plan.terminal))
        return events
    events = []
    for i in range(plan.events):
        chunk: dict[str, Any] = {"id": "c", "choices": [{"index": 0, "delta": {"content": '"usage":{'}}]}
        if continuous and plan.report:  # vLLM's continuous_usage_stats: the running count in every chunk
            running = {"prompt_tokens": plan.prompt, "completion_tokens": i + 1, "total_tokens": plan.prompt + i + 1}
            chunk["usage"] = running
        events.append(event(chunk))
    if include_usage and plan.report:
        events.append(event({"id": "c", "choices": [], "usage": _usage(kind, plan)}))
    return [*events, b"data: [DONE]\n\n"]


def _pieces(data: bytes, plan: Plan) -> Iterator[bytes]:
    position, index = 0, 0
    while position < len(data):
        size = max(1, plan.chunks[index % len(plan.chunks)])
        yield data[position : position + size]
        position += size
        index += 1


PAUSED_PIECES = 200  # the first pieces leave 1 ms apart (separate reads on the other side); the rest at once


def _send(sock: socket.socket, status: int, content_type: str, body: bytes, plan: Plan) -> None:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
    sock.sendall(head)
    for index, piece in enumerate(_pieces(body, plan)):
        sock.sendall(piece)
        if index < PAUSED_PIECES and len(piece) < len(body):
            time.sleep(0.001)


def _send_stream(sock: socket.socket, events: list[bytes], plan: Plan) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for index, piece in enumerate(_pieces(b"".join(events), plan)):
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        if index < PAUSED_PIECES:
            time.sleep(0.001)
    sock.sendall(b"0\r\n\r\n")


@contextlib.contextmanager
def vllm_like() -> Iterator[tuple[str, list[Received]]]:
    """(base URL, the requests it received) of a lax upstream running in a thread."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
