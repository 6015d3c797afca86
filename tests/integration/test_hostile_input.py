"""Hostile bytes on the wire, through a real gateway process: what httpx refuses to send.

CR/LF/NUL inside header values, non-ASCII header bytes and paths, traversal that a client library
would normalise away, request-smuggling shapes (Content-Length with Transfer-Encoding, two
different Content-Lengths). Each gets a 4xx (uvicorn's own 400 for what is not HTTP; the
gateway's OpenAI-shaped error for the rest), nothing reaches the upstream that should not, the
process stays up, and the key appears in no answer and no log line.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.support import AUTH, TEST_KEY, Proc, gateway

KEY = TEST_KEY.encode()
BODY = b'{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


@pytest.fixture(scope="module")
def gw_proc(sim: str) -> Iterator[tuple[Proc, str]]:
    with gateway("--upstream-url", sim, "--log-level", "debug", env={"BASTION_AUTH_FAILURE_LIMIT": "0"}) as pair:
        yield pair


def exchange(base: str, raw: bytes) -> bytes:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(raw)  # no half-close: uvicorn (like nginx) takes a client's EOF as an abort
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return data


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def post(path: bytes, headers: bytes, body: bytes = BODY) -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n"
        + headers
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


AUTH_LINE = b"authorization: Bearer " + KEY + b"\r\n"
CASES = {
    # header values uvicorn/httptools refuse outright
    "cr-in-value": (post(b"/v1/chat/completions", AUTH_LINE + b"x-a: one\rtwo\r\n"), {400}),
    "nul-in-value": (post(b"/v1/chat/completions", AUTH_LINE + b"x-a: one\x00two\r\n"), {400}),
    "lf-only-injection": (post(b"/v1/chat/completions", b"x-a: one\nauthorization: Bearer " + KEY + b"\r\n"), {400}),
    "space-before-colon": (post(b"/v1/chat/completions", AUTH_LINE + b"x-a : b\r\n"), {400}),
    # credentials with odd bytes: refused as credentials
    "utf8-credential": (post(b"/v1/chat/completions", "authorization: Bearer clé-ünïcode\r\n".encode()), {401}),
    "latin1-credential": (post(b"/v1/chat/completions", b"authorization: Bearer \xe9\xe8\xff\r\n"), {401}),
    "key-with-trailing-junk": (post(b"/v1/chat/completions", b"authorization: Bearer " + KEY + b"\xff\r\n"), {401}),
    "two-authorizations": (post(b"/v1/chat/completions", AUTH_LINE + b"authorization: Bearer nope\r\n"), {401}),
    # paths
    "dot-dot-to-metrics": (post(b"/v1/../metrics", AUTH_LINE), {404}),
    "encoded-dot-dot": (post(b"/v1/%2e%2e/metrics", AUTH_LINE), {404}),
    "encoded-slash": (post(b"/v1/models%2f..%2f..%2fhealth", AUTH_LINE), {404}),
    "backslash": (post(b"/v1\\..\\metrics", AUTH_LINE), {400, 404}),
    "non-ascii-path": (post("/v1/chat/complétions".encode(), AUTH_LINE), {400, 404}),
    "absolute-form-elsewhere": (post(b"http://169.254.169.254/v1/chat/completions", AUTH_LINE), {200, 400, 404}),
    # smuggling shapes
    "cl-and-te": (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        + AUTH_LINE
        + b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nhost: x\r\n\r\n",
        {400},
    ),
    "two-content-lengths": (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        + AUTH_LINE
        + b"content-length: 5\r\ncontent-length: 50\r\n\r\n"
        + BODY,
        {400},
    ),
    "huge-content-length": (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + AUTH_LINE + b"content-length: 99999999999999\r\n\r\n{}",
        {413},
    ),
    "bad-method-token": (b"G\x01T /health HTTP/1.1\r\nhost: x\r\n\r\n", {400}),
    "not-http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, {400, 0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_bytes(gw_proc: tuple[Proc, str], name: str) -> None:
    proc, base = gw_proc
    raw, expected = CASES[name]
    answer = exchange(base, raw)
    status = status_of(answer)
    assert status in expected, answer[:300]
    _, _, body = answer.partition(b"\r\n\r\n")
    assert KEY not in answer
    if status in (401, 404, 405, 413):
        assert body.startswith(b'{"error":{"message":'), body[:200]
    if name == "absolute-form-elsewhere" and status == 200:
        assert b"chat.completion" in body, "served by our own upstream, not fetched from elsewhere"
    assert proc.alive()
    assert httpx.get(base + "/health", timeout=5).status_code == 200
    assert httpx.post(base + "/v1/chat/completions", content=BODY, headers=AUTH, timeout=5).status_code == 200


def test_nothing_leaked_into_the_log(gw_proc: tuple[Proc, str]) -> None:
    proc, _ = gw_proc
    output = proc.output()
    assert TEST_KEY not in output
    assert "Traceback" not in output
