"""Upstream faults in-process: each one gives the client a clean error or a terminated stream in bounded
time, is counted in bastion_upstream_errors_total and in the audit line, and gives its concurrency slot back.

The upstream is a real socket (ScriptedUpstream) that misbehaves on cue; the gateway is `create_app`
behind httpx.ASGITransport with BASTION_RATE_LIMIT_MAX_CONCURRENT=1, so a slot that leaked would turn
the next request into a 429.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from pathlib import Path

import httpx
import pytest

from bastion.app import create_app
from bastion.config import Settings
from tests.support import AUTH, TEST_KEY, Script, ScriptedUpstream, free_port, respond, sse

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
READ_TIMEOUT = 0.5


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def reset_at_once(request: bytes, writer: asyncio.StreamWriter) -> None:
    _reset(writer)


async def garbage(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"\x00\xffSSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n")
    await writer.drain()


async def headers_then_hang(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"id"')
    await writer.drain()
    await asyncio.sleep(30)


async def stream_then_hang(request: bytes, writer: asyncio.StreamWriter) -> None:
    await sse(EVENT, then_break=True)(request, writer)
    await asyncio.sleep(30)


async def stream_then_reset(request: bytes, writer: asyncio.StreamWriter) -> None:
    await sse(EVENT, EVENT, then_break=True)(request, writer)
    await asyncio.sleep(0.05)
    _reset(writer)


# name -> (script or None for "refused", stream?, expected status, audit reason, metric kind)
FAULTS: dict[str, tuple[Script | None, bool, int, str, str]] = {
    "refused": (None, False, 502, "upstream_unavailable", "upstream_unavailable"),
    "reset": (reset_at_once, False, 502, "upstream_unavailable", "upstream_unavailable"),
    "garbage": (garbage, False, 502, "upstream_unavailable", "upstream_unavailable"),
    "500": (respond(500, b'{"object":"error","message":"boom","code":500}'), False, 500, "", "upstream_5xx"),
    "hang-before-headers": (lambda r, w: asyncio.sleep(30), False, 504, "upstream_timeout", "upstream_timeout"),
    "stream-hangs-after-headers": (stream_then_hang, True, 200, "midstream", "midstream"),
    "stream-reset-mid-way": (stream_then_reset, True, 200, "midstream", "midstream"),
    "body-hangs-after-headers": (headers_then_hang, False, 200, "midstream", "midstream"),
}


async def _fault(name: str, port: int, audit: Path) -> tuple[list[httpx.Response | Exception], float, str]:
    _, stream, *_ = FAULTS[name]
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_url=f"http://127.0.0.1:{port}",
        upstream_read_timeout=READ_TIMEOUT,
        upstream_connect_timeout=1.0,
        # /metrics asks the upstream whether it is up: a hung one costs a whole probe (5 s by default), which
        # is not what this test measures.
        health_timeout=READ_TIMEOUT,
        api_keys=TEST_KEY,
        rate_limit_rpm=0,
        rate_limit_tpm=0,
        rate_limit_max_concurrent=1,
        audit_log=str(audit),
    )
    app = create_app(config)
    transport = httpx.ASGITransport(app=app)
    results: list[httpx.Response | Exception] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers=AUTH, timeout=10) as client:
        started = time.monotonic()
        for _ in range(2):  # the second one is admitted: the first gave its slot back
            try:
                results.append(await client.post("/v1/chat/completions", json={**CHAT, "stream": stream}))
            except Exception as exc:  # a response that broke after it started: the connection is aborted
                results.append(exc)
        elapsed = time.monotonic() - started
        metrics = (await client.get("/metrics")).text
    return results, elapsed, metrics


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_is_clean_bounded_counted_and_releases_its_slot(name: str, tmp_path: Path) -> None:
    script, stream, status, reason, kind = FAULTS[name]
    audit = tmp_path / "audit.jsonl"
    if script is None:
        results, elapsed, metrics = await _fault(name, free_port(), audit)
    else:
        async with ScriptedUpstream(script) as upstream:
            results, elapsed, metrics = await _fault(name, upstream.port, audit)
    assert elapsed < 2 * (READ_TIMEOUT + 1.5), f"bounded: {elapsed:.1f}s for two requests"
    for result in results:
        if name == "body-hangs-after-headers":
            # Status and headers were already sent: the only honest signal left is an aborted connection.
            assert isinstance(result, Exception), result
            continue
        assert isinstance(result, httpx.Response), result
        assert result.status_code == status, result.text
        if stream:
            events = result.text.split("\n\n")
            assert events[0] + "\n\n" == EVENT.decode()
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert error["code"] in ("upstream_unavailable", "upstream_timeout"), "a terminal error event"
        elif status == 500:
            assert result.json()["message"] == "boom", "the upstream's own error passes through"
        else:
            error = result.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == reason
    wanted = f'kind="{kind}"'  # beside the engine label
    assert any(
        line.startswith("bastion_upstream_errors_total{") and wanted in line and line.endswith("} 2.0")
        for line in metrics.splitlines()
    )
    assert "bastion_inflight_requests 0.0" in metrics
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["outcome"] == ("ok" if status == 500 else "upstream_error")
        assert line["reason"] == reason
        assert TEST_KEY not in json.dumps(line)
