"""A minimal OpenAI-shaped upstream for the benchmark: as little CPU per request as Python allows.

    python bench/fast_upstream.py --port 8001 [--tokens 64] [--itl 0] [--paced]

The simulator (`bastion simulate`) is a faithful stand-in for vLLM but spends ~85 µs
per request and ~450 µs per 64-token stream; on a 2-core box it, not the gateway, set
the streaming ceiling (measured directly: ~1,300-2,100 streams/s at c=16). This one is
asyncio protocols + httptools with canned answers: `POST /v1/chat/completions` (JSON
with usage, or an SSE stream of `--tokens` events, each its own write, then the usage
event if asked for and `[DONE]`), `GET /health`, `GET /v1/models`. Nothing else.

Two ways to pace a stream. By default its events go back to back, a loop turn (or `--itl`)
apart, each stream on its own: a client then often reads many events at once, so a
gateway's cost per event looks far lower than behind a GPU. `--paced` sends them as vLLM
does: the role event and the first token at once, each its own write, then one token per
stream at every step of one engine clock (`--itl` apart, default 10 ms), every running
stream's token written in the same burst, as vLLM's output handler wakes every request's
generator after each engine step; a non-streaming answer goes out whole at the next step.
`--reuse-port` lets several of these share one port (bench/ceiling.py: one upstream process
would be the bottleneck before a gateway is).
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


class Stream:
    """A paced stream in progress: where it writes and how many tokens it still owes."""

    __slots__ = ("answers", "due", "include_usage", "left", "timer", "tokens", "transport")

    def __init__(self, answers: Answers, transport: asyncio.Transport, tokens: int, include_usage: bool) -> None:
        self.answers, self.transport, self.include_usage = answers, transport, include_usage
        self.tokens = self.left = tokens
        self.due = 0.0  # per-stream pacing: when the next token is due (loop time)
        self.timer: asyncio.TimerHandle | None = None

    def begin(self) -> bool:
        """The head, the role event and the first token, each its own write; True if that was all."""
        answers, transport = self.answers, self.transport
        transport.write(answers.stream_head + answers.first)
        return self.tokens == 0 or self.next()

    def next(self) -> bool:
        """Write the next token (and the end after the last); True once the stream is over."""
        transport = self.transport
        if transport.is_closing():
            return True
        transport.write(self.answers.token)
        self.left -= 1
        if self.left > 0:
            return False
        transport.write(self.answers.tail(self.tokens, self.include_usage))
        return True


class EngineClock:
    """One engine step every `itl` seconds: each running stream gets its next token, all in one burst.

    Steps are scheduled on absolute deadlines (start + k * itl), so a slow burst delays one step,
    not every later one; the clock stops when no stream runs and starts again with the next.
    """

    def __init__(self, itl: float) -> None:
        self.itl = itl
        self.streams: dict[Stream, None] = {}
        self.pending: list[tuple[asyncio.Transport, bytes]] = []  # non-streaming answers due at the next step
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self, stream: Stream) -> None:
        """A new request: answered at once (prefill costs nothing here), then it joins the next step."""
        if stream.begin():
            return
        self.streams[stream] = None
        self._run()

    def later(self, transport: asyncio.Transport, answer: bytes) -> None:
        """A non-streaming answer: whole, at the next step (a short generation ends with one)."""
        self.pending.append((transport, answer))
        self._run()

    def _run(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._next = loop.time() + self.itl
            self._timer = loop.call_at(self._next, self._step)

    def _step(self) -> None:
        pending, self.pending = self.pending, []
        for transport, answer in pending:
            if not transport.is_closing():
                transport.write(answer)
        done = [stream for stream in self.streams if stream.next()]
        for stream in done:
            del self.streams[stream]
        if not self.streams and not self.pending:
            self._timer = None
            return
        loop = asyncio.get_running_loop()
        self._next = max(self._next + self.itl, loop.time())
        self._timer = loop.call_at(self._next, self._step)


class OwnClocks:
    """`--paced stream`: every stream on its own clock (its start + k * itl), so no two streams' tokens
    need fall in one burst. Not how one engine behaves; a contrast that shows what the bursts cost."""

    def __init__(self, itl: float) -> None:
        self.itl = itl

    def start(self, stream: Stream) -> None:
        if stream.begin():
            return
        loop = asyncio.get_running_loop()
        stream.due = loop.time() + self.itl
        stream.timer = loop.call_at(stream.due, self._tick, stream)

    def later(self, transport: asyncio.Transport, answer: bytes) -> None:
        asyncio.get_running_loop().call_later(self.itl, transport.write, answer)

    def _tick(self, stream: Stream) -> None:
        if stream.next():
            return
        loop = asyncio.get_running_loop()
        stream.due = max(stream.due + self.itl, loop.time())
        stream.timer = loop.call_at(stream.due, self._tick, stream)


class Server(asyncio.Protocol):
    def __init__(self, answers: Answers, itl: float, clock: EngineClock | OwnClocks | None) -> None:
        self.answers = answers
        self.itl = itl
        self.clock = clock
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
                if self.clock is not None:
                    self.clock.start(Stream(answers, self.transport, tokens, include_usage))
                else:
                    asyncio.get_running_loop().create_task(self.stream(tokens, include_usage))
            elif self.clock is not None:
                self.clock.later(self.transport, answers.completion(tokens))
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


async def serve(host: str, port: int, tokens: int, itl: float, paced: str | None, reuse_port: bool) -> None:
    answers = Answers(tokens)
    clock = EngineClock(itl) if paced == "engine" else OwnClocks(itl) if paced == "stream" else None
    server = await asyncio.get_running_loop().create_server(
        lambda: Server(answers, itl, clock), host, port, backlog=4096, reuse_port=reuse_port
    )
    mode = {"engine": "paced by one engine clock", "stream": "each stream paced on its own"}.get(paced or "", "bursty")
    print(f"fast upstream on http://{host}:{port} ({tokens} tokens per stream, itl {itl}s, {mode})", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--tokens", type=int, default=64, help="events per stream (max_tokens caps it)")
    parser.add_argument("--itl", type=float, default=None, help="seconds between two events (paced: 0.01)")
    parser.add_argument(
        "--paced", nargs="?", const="engine", choices=("engine", "stream"),
        help="first token at once, then one per engine step (or, `stream`, on each stream's own clock)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse-port", action="store_true",
        help="share the port with other upstreams started so (the kernel spreads connections among them)",
    )  # fmt: skip
    args = parser.parse_args()
    itl = args.itl if args.itl is not None else (0.01 if args.paced else 0.0)
    if args.paced and itl <= 0:
        parser.error("--paced needs --itl > 0")
    uvloop.run(serve(args.host, args.port, args.tokens, itl, args.paced, args.reuse_port))


if __name__ == "__main__":
    main()
