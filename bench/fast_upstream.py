"""A minimal OpenAI-shaped upstream for the benchmark: as little CPU per request as Python allows.

    python bench/fast_upstream.py --port 8001 [--tokens 64] [--itl 0]

The simulator (`bastion simulate`) is a faithful stand-in for vLLM but spends ~85 µs
per request and ~450 µs per 64-token stream; on a 2-core box it, not the gateway, set
the streaming ceiling (measured directly: ~1,300-2,100 streams/s at c=16). This one is
asyncio protocols + httptools with canned answers: `POST /v1/chat/completions` (JSON
with usage, or an SSE stream of `--tokens` events, each its own write, then the usage
event if asked for and `[DONE]`), `GET /health`, `GET /v1/models`. Nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httptools
import uvloop

MODEL = "qwen2.5-7b-instruct"
_JSON = b"content-type: application/json\r\n"


def _response(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\n%scontent-length: %d\r\n\r\n%s" % (status, _JSON, len(body), body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Answers:
    """Every byte the server sends, built once."""

    def __init__(self, tokens: int) -> None:
        created = int(time.time())
        head = f'{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":{created},"model":"{MODEL}",'
        self.tokens = tokens
        self.health = _response(b"200 OK", b"{}")
        self.models = _response(b"200 OK", json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
        self.not_found = _response(b"404 Not Found", b'{"error":{"message":"not found"}}')
        self.stream_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        self.first = _chunk(
            f'data: {head}"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
            f'"logprobs":null,"finish_reason":null}}]}}\n\n'.encode()
        )
        self.token = _chunk(
            f'data: {head}"choices":[{{"index":0,"delta":{{"content":" token"}},'
            f'"logprobs":null,"finish_reason":null}}]}}\n\n'.encode()
        )
        self.head = head

    def usage(self, completion: int) -> bytes:
        return f'{{"prompt_tokens":5,"total_tokens":{5 + completion},"completion_tokens":{completion}}}'.encode()

    def completion(self, completion: int) -> bytes:
        body = (
            b'{"id":"chatcmpl-bench","object":"chat.completion","model":"%s","choices":[{"index":0,'
            b'"message":{"role":"assistant","content":"token"},"finish_reason":"length"}],"usage":%s}'
            % (MODEL.encode(), self.usage(completion))
        )
        return _response(b"200 OK", body)

    def tail(self, completion: int, include_usage: bool) -> bytes:
        usage = f'data: {self.head}"choices":[],"usage":'.encode() + self.usage(completion) + b"}\n\n"
        return (_chunk(usage) if include_usage else b"") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Server(asyncio.Protocol):
    def __init__(self, answers: Answers, itl: float) -> None:
        self.answers = answers
        self.itl = itl
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        url, body = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        answers = self.answers
        if url == b"/health":
            self.transport.write(answers.health)
        elif url == b"/v1/models":
            self.transport.write(answers.models)
        elif url.endswith(b"/completions") and body:
            request = json.loads(body)
            tokens = min(int(request.get("max_tokens") or answers.tokens), answers.tokens)
            if request.get("stream") is True:
                include_usage = (request.get("stream_options") or {}).get("include_usage") is True
                asyncio.get_running_loop().create_task(self.stream(tokens, include_usage))
            else:
                self.transport.write(answers.completion(tokens))
        else:
            self.transport.write(answers.not_found)

    async def stream(self, tokens: int, include_usage: bool) -> None:
        """Each event is its own write, with a loop turn (or `itl`) between them, as a token server sends."""
        transport, answers = self.transport, self.answers
        assert transport is not None
        transport.write(answers.stream_head + answers.first)
        for _ in range(tokens):
            await asyncio.sleep(self.itl)
            if transport.is_closing():
                return
            transport.write(answers.token)
        transport.write(answers.tail(tokens, include_usage))


async def serve(host: str, port: int, tokens: int, itl: float) -> None:
    answers = Answers(tokens)
    server = await asyncio.get_running_loop().create_server(lambda: Server(answers, itl), host, port, backlog=1024)
    print(f"fast upstream on http://{host}:{port} ({tokens} tokens per stream, itl {itl}s)", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--tokens", type=int, default=64, help="events per stream (max_tokens caps it)")
    parser.add_argument("--itl", type=float, default=0.0, help="seconds between two events")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.tokens, args.itl))


if __name__ == "__main__":
    main()
