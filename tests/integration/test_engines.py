"""Several engines behind one gateway (BASTION_ENGINES): real gateway, simulators as supervised children.

Routing by model name, load shared between replicas, kill -9 of a replica under load, a rolling
restart under load; counts come from the audit log's `engine` field (which replica answered).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import AUTH, TEST_KEY, gateway, wait_http

SIM = "{python} -m bastion simulate --host {host} --port {port}"
ADMIN = "adm-" + "a" * 40
UNLIMITED = {"BASTION_RATE_LIMIT_RPM": "0", "BASTION_RATE_LIMIT_TPM": "0", "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0"}


def engines_env(engines: list[dict[str, object]], audit: Path, **extra: str) -> dict[str, str]:
    return {
        **UNLIMITED,
        "BASTION_ENGINES": json.dumps(engines),
        "BASTION_AUDIT_LOG": str(audit),
        "BASTION_HEALTH_INTERVAL": "0.5",
        "BASTION_RESTART_BACKOFF": "0.2",
        "BASTION_ADMIN_TOKEN": ADMIN,
        **extra,
    }


def audit_lines(path: Path) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:  # the audit writer flushes in the background
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        time.sleep(0.3)
        if lines and len(lines) == len(path.read_text().splitlines()):
            break
    return lines


def wait_replicas(base: str, model: str, count: int, timeout: float = 20) -> None:
    """/ready is 200 once every model has one ready replica: wait until `count` of `model`'s are."""
    deadline = time.monotonic() + timeout
    while httpx.get(base + "/ready").json()["engines"][model]["ready"] < count:
        assert time.monotonic() < deadline, httpx.get(base + "/ready").text
        time.sleep(0.1)


@pytest.fixture
def audit() -> Path:
    fd, name = tempfile.mkstemp(prefix="bastion-engines-audit-", suffix=".jsonl")
    os.close(fd)
    return Path(name)


def test_two_models_routed_by_name_and_an_unknown_model_is_404(audit: Path) -> None:
    engines = [
        {"model": "chat", "command": SIM + " --model chat"},
        {"model": "code", "command": SIM + " --model code"},
    ]
    with gateway(env=engines_env(engines, audit)) as (_, base):
        client = openai.OpenAI(base_url=base + "/v1", api_key=TEST_KEY, max_retries=0)
        for model in ("chat", "code"):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            assert reply.model == model  # each simulator reports the model it serves
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert raised.value.code == "model_not_found"
        assert sorted(m.id for m in client.models.list()) == ["chat", "code"]
        ready = httpx.get(base + "/ready").json()
        assert ready["status"] == "ready" and set(ready["engines"]) == {"chat", "code"}
    routed = {line["model"]: line["engine"] for line in audit_lines(audit) if line["status"] == 200}
    assert routed["chat"] == "chat/0" and routed["code"] == "code/0"


async def _stream(client: httpx.AsyncClient, base: str, tokens: int = 20) -> tuple[int, str]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": tokens}
    async with client.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH) as response:
        text = "".join([chunk async for chunk in response.aiter_text()])
        return response.status_code, text


@pytest.mark.serial  # a share within 10 % of streams that end by the clock
def test_two_replicas_share_64_streams_within_10_percent(audit: Path) -> None:
    engines = [{"model": "chat", "command": SIM + " --model chat --itl 0.01", "replicas": 2}]
    with gateway(env=engines_env(engines, audit)) as (_, base):
        wait_replicas(base, "chat", 2)

        async def load() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
                results: list[tuple[int, str]] = []
                for _ in range(2):
                    results += await asyncio.gather(*(_stream(client, base) for _ in range(64)))
                return results

        results = asyncio.run(load())
        assert all(status == 200 and "[DONE]" in text for status, text in results)
    counts = collections.Counter(line["engine"] for line in audit_lines(audit) if line["status"] == 200)
    assert set(counts) == {"chat/0", "chat/1"}, counts
    assert abs(counts["chat/0"] - counts["chat/1"]) <= 0.1 * 128, counts


def test_kill_9_of_a_replica_under_load_loses_no_request_that_had_not_streamed(audit: Path) -> None:
    engines = [{"model": "chat", "command": SIM + " --model chat --itl 0.02", "replicas": 2}]
    with gateway(env=engines_env(engines, audit)) as (gw, base):
        wait_replicas(base, "chat", 2)
        pids = [int(line.split("pid=")[1].split()[0]) for line in gw.output().splitlines() if " started: " in line]
        assert len(pids) == 2
        victim = pids[0]

        async def load() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:

                async def one(delay: float) -> tuple[int, str]:
                    await asyncio.sleep(delay)
                    return await _stream(client, base)

                tasks = [asyncio.ensure_future(one(i * 0.01)) for i in range(150)]
                await asyncio.sleep(0.6)
                os.killpg(victim, signal.SIGKILL)  # the replica's whole process group, as an OOM kill would
                return list(await asyncio.gather(*tasks))

        results = asyncio.run(load())
        # Every request either completed, or had started streaming and ended with a clean error event.
        for status, text in results:
            assert status == 200, text
            assert "[DONE]" in text or '"error"' in text, text
        broken = [text for _, text in results if "[DONE]" not in text]
        assert len(broken) < 64  # only streams in flight on the victim
        wait_replicas(base, "chat", 2)  # the replica comes back
        ready = httpx.get(base + "/ready").json()["engines"]["chat"]
        assert ready["ready"] == 2 and ready["replicas"][0]["restarts"] >= 1


def test_rolling_restart_under_load_fails_no_request(audit: Path) -> None:
    engines = [{"model": "chat", "command": SIM + " --model chat --itl 0.01", "replicas": 2}]
    with gateway(env=engines_env(engines, audit, BASTION_DRAIN_TIMEOUT="20")) as (gw, base):
        wait_replicas(base, "chat", 2)
        before = [line for line in gw.output().splitlines() if " started: " in line]

        async def load() -> tuple[list[tuple[int, str]], httpx.Response]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
                stop = asyncio.Event()
                results: list[tuple[int, str]] = []

                async def worker() -> None:
                    while not stop.is_set():
                        results.append(await _stream(client, base))

                workers = [asyncio.ensure_future(worker()) for _ in range(32)]
                await asyncio.sleep(0.5)
                restart = await client.post(
                    base + "/admin/engines/restart", headers={"authorization": f"Bearer {ADMIN}"}, timeout=60
                )
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*workers)
                return results, restart

        results, restart = asyncio.run(load())
        assert restart.status_code == 200, restart.text
        outcomes = [r["outcome"] for r in restart.json()["restarted"]]
        assert outcomes == ["restarted", "restarted"]
        failed = [(status, text) for status, text in results if status != 200 or "[DONE]" not in text]
        assert not failed and len(results) > 100
        after = [line for line in gw.output().splitlines() if " started: " in line]
        assert len(after) == len(before) + 2  # a new child per replica
        assert httpx.get(base + "/ready").json()["engines"]["chat"]["ready"] == 2


def test_admin_route_is_denied_by_default_and_needs_the_token(audit: Path) -> None:
    engines = [{"model": "chat", "command": SIM + " --model chat"}]
    env = engines_env(engines, audit)
    del env["BASTION_ADMIN_TOKEN"]
    with gateway(env=env) as (_, base):
        refused = httpx.post(base + "/admin/engines/restart", headers={"authorization": f"Bearer {ADMIN}"})
        assert refused.status_code == 403 and "BASTION_ADMIN_TOKEN" in refused.text
    with gateway(env=engines_env(engines, audit)) as (_, base):
        assert httpx.post(base + "/admin/engines/restart", headers=AUTH).status_code == 401  # an API key is not it
        unknown = httpx.post(
            base + "/admin/engines/restart", params={"model": "nope"}, headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert unknown.status_code == 404


def test_sigusr1_restarts_a_single_replica_with_downtime_said_clearly(audit: Path) -> None:
    engines = [{"model": "chat", "command": SIM + " --model chat"}]
    with gateway(env=engines_env(engines, audit)) as (gw, base):
        gw.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while "restarted_with_downtime" not in gw.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "this restart has downtime" in gw.output()
        assert "restarted_with_downtime" in gw.output()
        wait_http(base + "/ready", timeout=20)
        reply = httpx.post(
            base + "/v1/chat/completions", headers=AUTH, json={"model": "chat", "messages": []}, timeout=10
        )
        assert reply.status_code == 200
