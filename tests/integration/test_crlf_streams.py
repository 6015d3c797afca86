"""An upstream whose event streams end lines with CRLF (SSE allows it; an external OpenAI-compatible server may
send `data: {...}\\r\\n\\r\\n`), through a real gateway process: streamed event by event, its usage read and
charged, the usage event the gateway asked for hidden, its events counted, exactly as an LF stream.

The upstream is a real socket that sends each content event only once the client has received the previous one
through the gateway (a lockstep): a gateway that held the stream back would leave it waiting.
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
from pathlib import Path

import httpx
import pytest

from tests.support import AUTH, Proc, content_length, gateway

ACK_TIMEOUT = 3.0  # seconds the upstream waits for the client to have an event before it sends the next
CONTENT = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"w%d"}}]}' % n for n in range(4)]
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":20,"total_tokens":27}}'
DONE = b"data: [DONE]"


@dataclass
class Lockstep:
    """What the next streamed request gets, and what happened to it."""

    ending: bytes = b"\n\n"
    stop_after: int | None = None  # send this many content events, then wait for the gateway to close
    received: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    late: list[int] = field(default_factory=list)  # content events the client did not have in time
    closed: threading.Event = field(default_factory=threading.Event)


class _Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.plan = Lockstep()


class _Handler(socketserver.BaseRequestHandler):
    server: _Upstream

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(15)
        with contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                if not (more := sock.recv(65536)):
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            while len(body) < content_length(head):
                body += sock.recv(65536)
            if not head.startswith(b"POST /v1/chat/completions "):  # the gateway's probes
                answer = b'{"object":"list","data":[]}'
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(answer), answer)
                )
                return
            self._stream(sock, self.server.plan)

    @staticmethod
    def _stream(sock: socket.socket, plan: Lockstep) -> None:
        def chunk(event: bytes) -> bytes:
            event += plan.ending
            return b"%x\r\n%s\r\n" % (len(event), event)

        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for n, event in enumerate(CONTENT[: plan.stop_after]):
            sock.sendall(chunk(event))
            if not plan.late and not plan.received.acquire(timeout=ACK_TIMEOUT):
                plan.late.append(n)
        if plan.stop_after is not None:
            try:
                while sock.recv(65536):  # until the gateway closes the connection
                    pass
            finally:
                plan.closed.set()
            return
        sock.sendall(chunk(USAGE) + chunk(DONE) + b"0\r\n\r\n")


@pytest.fixture(scope="module")
def upstream() -> Iterator[_Upstream]:
    server = _Upstream()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def gw(upstream: _Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, str, Path]]:
    audit = tmp_path_factory.mktemp("crlf") / "audit.log"
    url = f"http://127.0.0.1:{upstream.server_address[1]}"
    env = {"BASTION_AUDIT_LOG": str(audit), "BASTION_RATE_LIMIT_RPM": "0"}
    with gateway("--upstream-url", url, env=env) as (proc, base):
        yield proc, base, audit


def audit_line(audit: Path, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
        if found := [line for line in lines if line["request_id"] == request_id]:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit line for {request_id}")


def stream_chat(base: str, plan: Lockstep, request_id: str, *, asked: bool, leave_after: int | None = None) -> bytes:
    """POST a streamed chat; tell the upstream as each event arrives; the body received (to its end, or up to
    `leave_after` events, when the client then closes the connection)."""
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    received = b""
    seen = 0
    timeout = httpx.Timeout(15.0)
    headers = {**AUTH, "x-request-id": request_id}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=timeout) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for piece in reply.iter_raw():
            received += piece
            for _ in range(received.count(plan.ending) - seen):
                plan.received.release()
            seen = received.count(plan.ending)
            if leave_after is not None and seen >= leave_after:
                break
    return received


@pytest.mark.parametrize("asked", [False, True], ids=["usage-added", "usage-asked"])
@pytest.mark.parametrize("ending", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_a_stream_is_relayed_event_by_event_and_charged_its_usage(
    upstream: _Upstream, gw: tuple[Proc, str, Path], ending: bytes, asked: bool
) -> None:
    """Before: a CRLF stream reached the client only at its end (held up to 1 MiB), the usage the gateway asked
    for was shown to a client that had not, and the request was charged an estimate instead of its usage."""
    _, base, audit = gw
    upstream.plan = plan = Lockstep(ending=ending)
    request_id = f"crlf-{ending.hex()}-{asked}"
    body = stream_chat(base, plan, request_id, asked=asked)
    assert plan.late == [], "the client did not have these events before the next was sent: the stream was held"
    events = [*CONTENT, *([USAGE] if asked else []), DONE]
    assert body == b"".join(event + ending for event in events)
    line = audit_line(audit, request_id)
    assert (line["outcome"], line["prompt_tokens"], line["completion_tokens"]) == ("ok", 7, 20)
    assert line["charged_tokens"] == 27


def test_a_client_that_leaves_a_crlf_stream_is_charged_its_events_as_for_an_lf_one(
    upstream: _Upstream, gw: tuple[Proc, str, Path]
) -> None:
    """A stream cut short is charged the prompt estimate plus the events forwarded: those of a CRLF stream are
    counted (they were not: `exchange.events` counted b"\\n\\n" only)."""
    _, base, audit = gw
    charged = {}
    for ending in (b"\n\n", b"\r\n\r\n"):
        upstream.plan = plan = Lockstep(ending=ending, stop_after=3)
        request_id = f"crlf-gone-{ending.hex()}"
        stream_chat(base, plan, request_id, asked=False, leave_after=3)
        assert plan.closed.wait(10), "the gateway did not close the upstream connection"
        line = audit_line(audit, request_id)
        assert line["outcome"] == "client_disconnect" and line["prompt_tokens"] is None
        charged[ending] = line["charged_tokens"]
    assert charged[b"\r\n\r\n"] == charged[b"\n\n"], charged
