"""The supervisor in-process with a real child (the simulator): failures inside supervision itself.

A handler or a watcher that raises must never end supervision silently: it is logged
in one line and the engine turns not-ready (the loop) or is restarted (a watcher).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import bastion
from bastion.app import create_app
from bastion.config import Settings
from bastion.engine.probe import ProbeChannel
from bastion.engine.spec import EngineSpec, free_port
from bastion.engine.state import OPERATOR_RETRY_AFTER, Phase
from bastion.engine.supervisor import Event, Supervisor, supervise
from tests.integration.test_supervisor import pid_alive
from tests.support import AUTH, TEST_KEY, gateway, simulator

CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}]}
SOURCE = str(Path(bastion.__file__).parents[1])  # the child imports this bastion, whatever the cwd


def simulator_spec(**timing: float) -> EngineSpec:
    port = free_port("127.0.0.1")
    env = {name: value for name, value in os.environ.items() if not name.startswith("BASTION_")}
    env["PYTHONPATH"] = SOURCE
    command = (sys.executable, "-m", "bastion", "simulate", "--host", "127.0.0.1", "--port", str(port))
    values: dict[str, float] = {
        "health_interval": 0.2,
        "health_timeout": 0.5,
        "stop_timeout": 2.0,
        "backoff": 0.2,
        **timing,
    }
    return EngineSpec(name="sim", command=command, host="127.0.0.1", port=port, env=env, **values)  # type: ignore[arg-type]


async def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
        await asyncio.sleep(0.05)


def started_pids(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [
        int(record.getMessage().split()[1].removeprefix("pid="))
        for record in caplog.records
        if record.name == "bastion.upstream" and " started: " in record.getMessage()
    ]


def running_in_group(group: int) -> list[int]:
    """Pids of the group's processes that still run (a zombie never reaped by PID 1 does not)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_bytes().rsplit(b")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(pgrp) == group and state != b"Z":
            running.append(int(stat.parent.name))
    return running


class HealthyCrashes(Supervisor):
    """A bug in a handler: the loop dies the moment the child becomes healthy."""

    async def _on_healthy(self, event: Event) -> bool:
        raise RuntimeError("injected handler failure")


async def test_a_crashed_supervision_loop_is_logged_and_turns_the_gateway_not_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bastion.upstream")
    spec = simulator_spec()
    async with ProbeChannel(spec.health_timeout) as channel:
        upstream, _ = supervise(spec, channel)
        async with HealthyCrashes(spec, upstream, channel):
            await wait_until(lambda: upstream.phase is Phase.FAILED, 20, "supervision to report its crash")
            (pid,) = started_pids(caplog)
            [line] = [r.getMessage() for r in caplog.records if "supervision crashed" in r.getMessage()]
            assert f"pid={pid} " in line and "RuntimeError('injected handler failure')" in line
            assert "_on_healthy" in line and "\n" not in line, "one line: the error and where it was raised"
            # The gateway in front of this engine says so: 503 with a Retry-After a person needs, /ready too.
            app = create_app(Settings(_env_file=None, api_keys=TEST_KEY, audit_log="off"), upstream=upstream)  # type: ignore[call-arg,arg-type]
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers=AUTH) as client:
                refused = await client.post("/v1/chat/completions", json=CHAT)
                ready = await client.get("/ready")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == str(OPERATOR_RETRY_AFTER)
            assert "operator" in refused.json()["error"]["message"]
            assert ready.status_code == 503 and ready.json()["status"] == "failed"
            assert "supervision" in ready.json()["detail"]
        assert not pid_alive(pid), "leaving the supervisor still stops a child it no longer watched"


class WatcherCrashesOnce(Supervisor):
    """A bug in the health watcher of the first child only."""

    crashed = False

    async def _watch_health(self, pid: int) -> None:
        if not self.crashed:
            self.crashed = True
            raise ValueError("injected watcher failure")
        await super()._watch_health(pid)


async def test_a_crashed_watcher_is_logged_and_its_child_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bastion.upstream")
    spec = simulator_spec()
    async with ProbeChannel(spec.health_timeout) as channel:
        upstream, _ = supervise(spec, channel)
        async with WatcherCrashesOnce(spec, upstream, channel):
            await wait_until(lambda: upstream.phase is Phase.READY, 20, "the restarted child to be ready")
            first, second = started_pids(caplog)
            [line] = [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]
            assert f"pid={first} health watcher crashed: ValueError('injected watcher failure')" in line
            assert not pid_alive(first) and pid_alive(second)
            assert upstream.restarts == 1
        assert not pid_alive(second)


async def test_a_dead_child_turns_not_ready_before_its_group_is_cleared() -> None:
    """kill -9 with a grandchild that ignores SIGTERM: the state flips at once, the group goes within stop_timeout."""
    spec = simulator_spec(stop_timeout=1.5)
    port = str(spec.port)
    shell = f"trap '' TERM; sleep 30 & exec {sys.executable} -m bastion simulate --host 127.0.0.1 --port {port}"
    spec = dataclasses.replace(spec, command=("sh", "-c", shell))
    async with ProbeChannel(spec.health_timeout) as channel:
        upstream, supervisor = supervise(spec, channel)
        async with supervisor:
            await wait_until(lambda: upstream.phase is Phase.READY, 20, "ready")
            child = supervisor._child
            assert child is not None
            os.kill(child.pid, 9)
            await wait_until(lambda: upstream.phase is not Phase.READY, 0.5, "not ready")
            assert upstream.phase is Phase.RESTARTING and not upstream.accepting
            await wait_until(lambda: upstream.phase is Phase.READY, 20, "the restart")
            assert upstream.restarts == 1
            assert running_in_group(child.pid) == [], "the grandchild ignored SIGTERM: SIGKILLed after stop_timeout"


def test_an_external_upstream_explains_itself_once_per_change() -> None:
    """A real gateway in front of a real keyed simulator: /ready and ONE log line say what to fix."""
    key = "simulator-key-6d1e0b"
    quick = {"BASTION_HEALTH_INTERVAL": "0.1"}
    with simulator(env={"VLLM_API_KEY": key}) as (_, sim):
        with gateway("--upstream-url", sim, env=quick, ready=False) as (gw, base):
            state = httpx.get(base + "/ready").json()
            assert state == {
                "status": "misconfigured",
                "detail": "it refuses bastion's key (401): BASTION_UPSTREAM_API_KEY is missing or wrong",
            }
            time.sleep(1.0)  # ten more background checks
            said = [line for line in gw.output().splitlines() if "BASTION_UPSTREAM_API_KEY is missing" in line]
            assert len(said) == 1 and f"upstream {sim} misconfigured" in said[0], said
        env = {**quick, "BASTION_UPSTREAM_API_KEY": key}
        with gateway("--upstream-url", sim + "/v1", env=env, ready=False) as (gw, base):
            state = httpx.get(base + "/ready").json()
            assert state["detail"] == "BASTION_UPSTREAM_URL should be the server's root, without /v1"
            assert key not in gw.output()
