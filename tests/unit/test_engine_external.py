"""An external upstream explains itself: /ready says why it is not usable, the log says it once per change.

Real scripted sockets (tests.support.ScriptedUpstream) play the upstream; the gateway runs in-process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bastion import http
from bastion.app import create_app
from bastion.config import Settings
from bastion.engine.external import ExternalWatch, check_external
from bastion.engine.probe import ProbeChannel, Verdict, failure
from bastion.engine.state import Phase, Upstream
from tests.support import TEST_KEY, Script, ScriptedUpstream, by_path, free_port, hang, respond

MODELS = respond(200, b'{"object":"list","data":[]}')
HEALTHY = by_path({b"/health": respond(200, b""), b"/v1/models": MODELS})
KEY = "upstream-secret-3c9f"


def keyed(key: str) -> Script:
    """An upstream like vLLM with --api-key: /health is open, /v1/* needs the key."""

    async def script(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request.startswith(b"GET /health "):
            await respond(200, b"")(request, writer)
        elif f"authorization: bearer {key}".encode() in request.lower():
            await MODELS(request, writer)
        else:
            await respond(401, b'{"error":"Unauthorized"}')(request, writer)

    return script


async def ready(url: str, **settings: Any) -> tuple[int, dict[str, Any], str]:
    """/ready and /metrics of an in-process gateway in front of `url` (no lifespan: /ready checks on demand)."""
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_url=url,  # type: ignore[arg-type]
        api_keys=TEST_KEY,  # type: ignore[arg-type]
        audit_log="off",
        health_timeout=0.5,
        **settings,
    )
    transport = httpx.ASGITransport(app=create_app(config))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.get("/ready")
        metrics = (await client.get("/metrics")).text
    return response.status_code, response.json(), metrics


async def test_a_healthy_upstream_is_ready() -> None:
    async with ScriptedUpstream(HEALTHY) as upstream:
        status, body, metrics = await ready(f"http://127.0.0.1:{upstream.port}")
    assert (status, body) == (200, {"status": "ready", "detail": ""})
    assert "bastion_upstream_up 1.0" in metrics


async def test_a_key_the_upstream_refuses_is_named() -> None:
    async with ScriptedUpstream(keyed(KEY)) as upstream:
        url = f"http://127.0.0.1:{upstream.port}"
        missing = await ready(url)
        wrong = await ready(url, upstream_api_key="not-" + KEY)
        right = await ready(url, upstream_api_key=KEY)
    for status, body, metrics in (missing, wrong):
        assert status == 503 and body["status"] == "misconfigured"
        assert body["detail"] == "it refuses bastion's key (401): BASTION_UPSTREAM_API_KEY is missing or wrong"
        assert "bastion_upstream_up 0.0" in metrics
        assert KEY not in str(body)
    assert right[:2] == (200, {"status": "ready", "detail": ""})


async def test_a_url_ending_in_v1_is_named() -> None:
    async with ScriptedUpstream(HEALTHY) as upstream:
        status, body, _ = await ready(f"http://127.0.0.1:{upstream.port}/v1")
    assert (status, body["status"]) == (503, "misconfigured")
    assert body["detail"] == "BASTION_UPSTREAM_URL should be the server's root, without /v1"


async def test_a_server_without_health_is_judged_by_its_models() -> None:
    async with ScriptedUpstream(by_path({b"/v1/models": MODELS})) as upstream:
        status, body, _ = await ready(f"http://127.0.0.1:{upstream.port}")
    assert (status, body["status"]) == (200, "ready")


@pytest.mark.parametrize(
    ("script", "detail"),
    [
        (None, "connection refused (nothing listens there)"),
        (hang, "no answer within 0.5s"),
        (respond(500, b"{}"), "GET /health answered 500"),
        (by_path({b"/health": respond(200, b"")}), "GET /v1/models answered 404"),
    ],
    ids=["refused", "silent", "health-500", "no-models"],
)
async def test_an_unusable_upstream_says_why(script: Script | None, detail: str) -> None:
    if script is None:
        status, body, _ = await ready(f"http://127.0.0.1:{free_port()}")
    else:
        async with ScriptedUpstream(script) as upstream:
            status, body, _ = await ready(f"http://127.0.0.1:{upstream.port}")
    assert (status, body) == (503, {"status": "unreachable", "detail": detail})


def test_a_name_that_does_not_resolve_is_told_apart() -> None:
    """The pool raises its own ConnectError `from None`; the resolver's error is its context (as pool.py does)."""
    try:
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except OSError as exc:
            raise http.ConnectError(f"cannot connect to nowhere.invalid:80: {exc.strerror}") from None
    except http.ConnectError as exc:
        probe = failure(exc, 1.0)
    assert (probe.verdict, probe.detail) == (Verdict.NO_SUCH_HOST, "its host name does not resolve")
    assert failure(http.PoolTimeout("all busy"), 1.0).verdict is Verdict.BUSY, "load, never death"


async def wait_until(check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_the_background_check_logs_one_line_per_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bastion.upstream")
    key = {"value": KEY}

    async def script(request: bytes, writer: asyncio.StreamWriter) -> None:
        await keyed(key["value"])(request, writer)

    async with ScriptedUpstream(script) as server, ProbeChannel(0.5) as channel:
        shown = f"http://127.0.0.1:{server.port}"
        upstream = Upstream(f"http://operator:hunter2@127.0.0.1:{server.port}", KEY, Phase.EXTERNAL)
        async with ExternalWatch(upstream, channel, interval=0.05):
            for value in (KEY, "rotated-on-the-upstream", KEY):  # fine, then our key is refused, then fine again
                key["value"] = value
                wanted = len(server.requests) + 10  # five checks or more
                await wait_until(lambda wanted=wanted: len(server.requests) >= wanted, 10)  # type: ignore[misc]
    lines = [record.getMessage() for record in caplog.records if record.name == "bastion.upstream"]
    assert lines == [
        f"upstream {shown} reachable",
        f"upstream {shown} misconfigured: it refuses bastion's key (401): BASTION_UPSTREAM_API_KEY is missing or wrong",
        f"upstream {shown} reachable",
    ]
    assert upstream.phase is Phase.EXTERNAL and upstream.accepting, "requests are still forwarded (502s say why)"


async def test_a_flood_of_ready_checks_costs_the_upstream_one_check() -> None:
    async with ScriptedUpstream(HEALTHY) as server, ProbeChannel(0.5) as channel:
        upstream = Upstream(f"http://127.0.0.1:{server.port}", None, Phase.EXTERNAL)
        watch = ExternalWatch(upstream, channel, interval=5.0)
        probes = await asyncio.gather(*(watch.current() for _ in range(50)))
        assert all(probe.up for probe in probes)
        assert len(server.requests) == 2, "one check in flight, shared: GET /health and GET /v1/models"
        assert (await check_external(channel, upstream.base_url, None)).up
