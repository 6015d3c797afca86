"""Slow and oversized clients do not pin the gateway: raw sockets against a real process.

uvicorn alone keeps a connection that sends its headers one byte at a time forever,
buffers a request head of any size, and waits forever on a client that stops reading;
bastion bounds all three (server.py) and the time a body upload may take
(asgi.read_body), and keeps serving everyone else.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import AUTH, TEST_KEY, gateway, read_until, simulator

# Connections closed within the configured timeouts (a few tenths of a second of slack): run alone.
pytestmark = pytest.mark.serial

UNLIMITED = {"BASTION_RATE_LIMIT_RPM": "0", "BASTION_RATE_LIMIT_TPM": "0"}
CHAT = b'{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


@pytest.fixture(scope="module")
def strict(sim: str) -> Iterator[str]:
    env = {
        **UNLIMITED,
        "BASTION_RATE_LIMIT_MAX_CONCURRENT": "1",  # a pinned request would hold the key's only slot
        "BASTION_CLIENT_HEADER_TIMEOUT": "1",
        "BASTION_CLIENT_BODY_TIMEOUT": "1",
        "BASTION_MAX_HEADER_BYTES": "8192",
    }
    with gateway("--upstream-url", sim, env=env) as (_, base):
        yield base


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the server closes the connection (bounded)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    started = time.monotonic()
    try:
        data = read_all(sock, seconds)
    except TimeoutError:
        return False, b""
    return time.monotonic() - started <= seconds, data


def served(base: str) -> int:
    return httpx.post(base + "/v1/chat/completions", content=CHAT, headers=AUTH, timeout=5).status_code


def test_idle_and_slowloris_connections_are_closed_while_others_are_served(strict: str) -> None:
    idle = [connect(strict) for _ in range(5)]
    slow = [connect(strict) for _ in range(20)]
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: "
    started = time.monotonic()
    try:
        for sock in slow:
            sock.sendall(head)
        closed: set[int] = set()
        while time.monotonic() - started < 4 and len(closed) < len(slow):
            for i, sock in enumerate(slow):  # one more byte each 0.2 s: never a complete head
                if i in closed:
                    continue
                try:
                    sock.sendall(b"a")
                except OSError:
                    closed.add(i)
            assert served(strict) == 200, "others are served meanwhile"
            time.sleep(0.2)
        assert len(closed) == len(slow), "every slowloris connection was closed"
        assert time.monotonic() - started < 3.5
        for sock in idle:
            ok, data = closed_within(sock, 2.0)
            assert ok and data == b"", "an idle connection is closed silently"
    finally:
        for sock in idle + slow:
            sock.close()


def test_slowloris_gets_408_after_a_keep_alive_response_too(strict: str) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        first = read_until(sock, b'{"status":"ok"}')
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # the next head, never finished
        ok, data = closed_within(sock, 3.0)
        assert ok and data.startswith(b"HTTP/1.1 408")


def test_the_rest_of_a_body_answered_early_is_not_the_next_head(strict: str) -> None:
    """A 401 goes out as soon as the head is read; the upload's rest then arrives on the idle connection. Counted
    as the next head's bytes it drew a 431 after the 401, which the client read as the answer to its next
    request."""
    body = b'{"model":"m","x":"' + b"a" * 50_000 + b'"}'  # past BASTION_MAX_HEADER_BYTES (8192)
    with connect(strict) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        first = read_until(sock, b"}}")
        assert first.startswith(b"HTTP/1.1 401"), first
        sock.sendall(body)
        time.sleep(0.3)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        sock.settimeout(5)
        second = read_until(sock, b'{"status":"ok"}')
        assert second.startswith(b"HTTP/1.1 200"), second


def test_the_rest_of_a_body_answered_early_is_still_bounded_in_time(strict: str) -> None:
    # Not counted as the next head, that rest still ends within the head timeout: a trickle holds nothing.
    with connect(strict) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\n"
            b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n{"
        )
        ok, data = closed_within(sock, 3.0)
        assert ok and data.startswith(b"HTTP/1.1 401") and b"HTTP/1.1 4" not in data[12:], data


@pytest.mark.parametrize("complete", [False, True])
def test_oversized_head_is_refused(strict: str, complete: bool) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        with contextlib.suppress(OSError):
            if complete:  # many headers, the whole head in one write
                sock.sendall(b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 500) for i in range(40)) + b"\r\n")
            else:  # one endless header value, a KiB at a time
                sock.sendall(b"x-big: ")
                for _ in range(64):
                    sock.sendall(b"b" * 1024)
        ok, data = closed_within(sock, 3.0)
    assert ok
    assert data.startswith(b"HTTP/1.1 431"), data[:80]
    assert served(strict) == 200


def test_slow_body_gets_408_and_holds_no_slot(strict: str) -> None:
    with connect(strict) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (TEST_KEY.encode(), len(CHAT), CHAT[:10])
        )
        time.sleep(0.3)
        # The body is read (and inspected) before the limits: an upload takes no concurrency slot.
        assert served(strict) == 200, "the upload holds the key's only concurrency slot"
        started = time.monotonic()
        data = read_all(sock, 5.0)
        assert time.monotonic() - started < 2.0
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in body and b'"type":"invalid_request_error"' in body
    assert served(strict) == 200, "the slot was given back"


def running(sim: str) -> float:
    """The simulator's `vllm:num_requests_running`: generations it is still producing."""
    for line in httpx.get(sim + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_requests_running in the simulator's metrics")


def test_a_client_that_stops_reading_a_stream_loses_it_and_frees_its_slot_and_the_generation() -> None:
    """A stream nobody reads: without a write timeout it held its slot and its vLLM sequence forever."""
    write_timeout = 1.0
    env = {
        **UNLIMITED,
        "BASTION_RATE_LIMIT_MAX_CONCURRENT": "1",
        "BASTION_CLIENT_WRITE_TIMEOUT": str(write_timeout),
        "BASTION_AUDIT_LOG": "stdout",
    }
    stream = b'{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true,"n":4}'
    with (
        simulator("--tokens", "1000000") as (_, sim),  # fast and practically endless: ~600 MB of events
        gateway("--upstream-url", sim, env=env) as (gw, base),
    ):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes nothing in
        sock.connect((host, int(port)))
        try:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
                b"x-request-id: never-reads\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (TEST_KEY.encode(), len(stream), stream)
            )
            deadline = time.monotonic() + 10
            while running(sim) < 1:
                assert time.monotonic() < deadline, "the generation started"
                time.sleep(0.05)
            assert served(base) == 429, "the unread stream holds the key's only slot"
            started = time.monotonic()
            while served(base) != 200:
                assert time.monotonic() - started < write_timeout + 8, "the slot was given back"
                time.sleep(0.2)
            while running(sim) > 0:
                assert time.monotonic() - started < write_timeout + 8, "the upstream generation was stopped"
                time.sleep(0.05)
        finally:
            sock.close()
        deadline = time.monotonic() + 5
        while '"request_id":"never-reads"' not in gw.output():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        output = gw.output()
    line = next(json.loads(ln) for ln in output.splitlines() if '"request_id":"never-reads"' in ln)
    assert line["outcome"] == "client_disconnect" and line["status"] == 200
    assert "read nothing for 1s (BASTION_CLIENT_WRITE_TIMEOUT)" in output
