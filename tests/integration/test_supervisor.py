"""`bastion serve` supervising the simulator: the real supervisor code path, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import AUTH, PYTHON, TEST_KEY, Proc, free_port, gateway

SIM = "{python} -m bastion simulate --host {host} --port {port}"
CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}]}
FAST_RESTARTS = {
    "BASTION_RESTART_BACKOFF": "0.2",
    "BASTION_HEALTH_INTERVAL": "0.3",
    "BASTION_HEALTH_TIMEOUT": "0.5",
    "BASTION_HEALTH_FAILURES": "2",
    "BASTION_STOP_TIMEOUT": "2",
}


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def child_pids(gw: Proc) -> list[int]:
    return [int(pid) for pid in re.findall(r"upstream pid=(\d+) started", gw.output())]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def ready_state(base: str) -> dict[str, object]:
    return httpx.get(base + "/ready", timeout=2).json()  # type: ignore[no-any-return]


def test_readiness_gates_requests_while_loading() -> None:
    with gateway("--upstream-command", SIM + " --startup-delay 2", ready=False) as (gw, base):
        early = httpx.post(base + "/v1/chat/completions", json=CHAT, headers=AUTH)
        assert early.status_code == 503
        assert early.headers["retry-after"].isdigit()
        assert early.json()["error"]["code"] == "model_loading"
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/ready").status_code == 503
        wait_for(lambda: httpx.get(base + "/ready").status_code == 200, 15, "readiness")
        assert httpx.post(base + "/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        assert "loading model weights" in gw.output(), "the child's own loading lines are relayed"


def test_crash_restart_and_recovery() -> None:
    with gateway("--upstream-command", SIM + " --crash-after 2", env=FAST_RESTARTS) as (gw, base):
        client = openai.OpenAI(base_url=base + "/v1", api_key=TEST_KEY, max_retries=0)
        for _ in range(2):
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        with pytest.raises(openai.InternalServerError) as crashed:  # the child dies on this one
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert crashed.value.status_code in (502, 503)
        wait_for(lambda: ready_state(base)["restarts"] == 1 and ready_state(base)["status"] == "ready", 15, "restart")
        assert client.chat.completions.create(**CHAT).choices  # type: ignore[call-overload]
        first, second = child_pids(gw)
        assert first != second and not pid_alive(first)
        assert f"upstream pid={first} exited (exit code 3)" in gw.output()


def test_crash_loop_gives_up_but_gateway_answers() -> None:
    env = {**FAST_RESTARTS, "BASTION_MAX_RESTARTS": "3"}
    crashing = "{python} -c 'raise SystemExit(7)' --port {port}"
    with gateway("--upstream-command", crashing, env=env, ready=False) as (gw, base):
        wait_for(lambda: ready_state(base)["status"] == "failed", 20, "giving up")
        response = httpx.post(base + "/v1/chat/completions", json=CHAT, headers=AUTH)
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "keeps crashing" in message and "operator" in message
        assert response.headers["retry-after"] == "300", "a person must act: not a retry in a second"
        assert httpx.get(base + "/health").status_code == 200
        assert "giving up" in gw.output()
        assert len(child_pids(gw)) == 3


def test_hung_child_is_restarted() -> None:
    with gateway("--upstream-command", SIM, env=FAST_RESTARTS) as (gw, base):
        (first,) = child_pids(gw)
        os.kill(first, signal.SIGSTOP)  # alive but answering nothing
        wait_for(lambda: len(child_pids(gw)) == 2 and ready_state(base)["status"] == "ready", 20, "restart")
        assert "stopped answering" in gw.output()
        wait_for(lambda: not pid_alive(first), 5, "the hung child to be gone")


def test_sigterm_drains_inflight_stream_then_stops_child() -> None:
    with gateway("--upstream-command", SIM + " --itl 0.1 --tokens 20") as (gw, base):
        (child,) = child_pids(gw)
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH, timeout=10
        ) as r:
            chunks = r.iter_raw()
            next(chunks)
            gw.signal(signal.SIGTERM)
            rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n"), "the in-flight stream must finish"
        gw.popen.wait(15)
        assert not pid_alive(child)
        assert f"upstream pid={child} stopped" in gw.output()


def test_sigkill_of_gateway_leaves_no_orphan() -> None:
    with gateway("--upstream-command", SIM) as (gw, _):
        (child,) = child_pids(gw)
        gw.signal(signal.SIGKILL)
        gw.popen.wait(5)
        wait_for(lambda: not pid_alive(child), 10, f"child {child} to die with the gateway")


def test_internal_key_is_in_no_argv_and_no_log() -> None:
    with gateway("--upstream-command", SIM) as (gw, base):
        (child,) = child_pids(gw)
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        key = next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"VLLM_API_KEY="))
        assert len(key) >= 32
        assert (
            httpx.post(base + "/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        )  # the gateway uses it
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert key not in cmdline.read_bytes(), f"key visible in argv of {cmdline.parent.name}"
            except (FileNotFoundError, ProcessLookupError):
                continue
        assert key.decode() not in gw.output()
        assert not any(v.startswith(b"BASTION_") for v in environ), "bastion's settings stay out of the child"


# --- supervision never shares fate with traffic ------------------------------------------------

UNLIMITED = {"BASTION_RATE_LIMIT_RPM": "0", "BASTION_RATE_LIMIT_TPM": "0", "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0"}
HELD_SECONDS = 6.0  # the old code SIGTERMed the child 2.1 s into this (see the test's docstring): 3x that


async def _hold_streams(base: str, count: int, seconds: float) -> list[int]:
    """Open `count` long streams, keep reading them for `seconds`, then drop them: events read per stream."""
    received = [0] * count

    async def one(index: int, client: httpx.AsyncClient) -> None:
        body = {**CHAT, "stream": True, "max_tokens": 1000}
        async with client.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH) as response:
            async for chunk in response.aiter_raw():
                received[index] += chunk.count(b"data: ")

    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(one(i, client)) for i in range(count)]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return received


@pytest.mark.serial  # probes answered within their timeout under load
def test_probes_never_queue_behind_client_traffic() -> None:
    """All upstream connections busy with streams: the health probes still get through.

    Before the probe channel, probes waited in the same 2-connection pool, timed out after
    BASTION_HEALTH_TIMEOUT and the healthy child was SIGTERMed ~2-3 s into the streams.
    """
    env = {
        **UNLIMITED,
        "BASTION_UPSTREAM_MAX_CONNECTIONS": "2",
        "BASTION_UPSTREAM_POOL_TIMEOUT": "60",  # the two streams without a connection wait, never 503
        "BASTION_HEALTH_INTERVAL": "0.2",
        "BASTION_HEALTH_TIMEOUT": "0.5",
        "BASTION_SHUTDOWN_GRACE": "1",
    }
    with gateway("--upstream-command", SIM + " --itl 0.2 --tokens 1000", env=env) as (gw, base):
        (child,) = child_pids(gw)
        received = asyncio.run(_hold_streams(base, 4, HELD_SECONDS))
        output = gw.output()
        assert child_pids(gw) == [child] and pid_alive(child), output[-3000:]
        assert "stopped answering" not in output and "restart" not in output
        assert ready_state(base)["status"] == "ready"
        # The simulator sends 5 events a second: the two streams that got a connection flowed all along.
        assert min(sorted(received)[-2:]) > HELD_SECONDS * 3, received


@pytest.mark.serial  # 503 within 50 ms of the kill
def test_dead_child_is_not_ready_at_once() -> None:
    """kill -9 the child while a grandchild lingers in its group (as vLLM's engine process can):
    requests get 503 + Retry-After at once, not 502 for the BASTION_STOP_TIMEOUT the group takes to go."""
    lingering = "sh -c 'sleep 60 & exec {python} -m bastion simulate --host {host} --port {port}'"
    env = {**FAST_RESTARTS, "BASTION_STOP_TIMEOUT": "20"}
    with gateway("--upstream-command", lingering, env=env) as (gw, base), httpx.Client(headers=AUTH) as http:
        (child,) = child_pids(gw)
        assert http.post(base + "/v1/chat/completions", json=CHAT).status_code == 200
        os.kill(child, signal.SIGKILL)
        time.sleep(0.05)
        statuses = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            response = http.post(base + "/v1/chat/completions", json=CHAT)
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["retry-after"].isdigit()
                assert response.json()["error"]["code"] == "upstream_not_ready"
            time.sleep(0.05)
        assert statuses[0] == 503 and 502 not in statuses, statuses
        wait_for(lambda: ready_state(base)["status"] == "ready", 15, "the restart")
        assert len(child_pids(gw)) == 2


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--upstream-command", SIM.replace("{port}", "{prot}")], {}, "BASTION_UPSTREAM_COMMAND): uses {prot}, "),
        (["--upstream-command", SIM.replace("{port}", "9000")], {}, "BASTION_UPSTREAM_COMMAND: has no {port}: "),
        (["--upstream-command", "no-such-server --port {port}"], {}, "BASTION_UPSTREAM_COMMAND: 'no-such-server' "),
        ([], {"BASTION_VLLM_PYTHON": "/nonexistent/bin/python"}, "BASTION_VLLM_PYTHON: /nonexistent/bin/python "),
    ],
    ids=["unknown-placeholder", "no-port", "no-binary", "no-vllm-python"],
)
def test_a_command_that_cannot_work_is_refused_at_start_up(args: list[str], env: dict[str, str], expected: str) -> None:
    """One line naming the setting and the fix, exit 2: not a KeyError traceback, a guard traceback on every
    restart, or 30 minutes of waiting for a child that listens elsewhere."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "VLLM_"))}
    result = subprocess.run(
        [PYTHON, "-m", "bastion", "serve", "--port", str(free_port()), *args],
        env={**clean, "BASTION_API_KEYS": TEST_KEY, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("bastion: ") and expected in line, line


def test_an_in_place_restart_is_followed_by_ready_and_both_metrics_pages() -> None:
    """SIGUSR1 with one supervised engine restarts it in place (a new child, port and key). /ready, /metrics'
    bastion_upstream_up and the /metrics/upstream relay read the engine as it is now, not as it was built:
    before the fix they kept the old child's Upstream ("stopping", 503, up 0, a relay to a dead port)."""
    env = {**FAST_RESTARTS, "BASTION_METRICS_TOKEN": "m" * 32}
    scrape = {"authorization": "Bearer " + "m" * 32}
    with gateway("--upstream-command", SIM, env=env) as (gw, base):
        (first,) = child_pids(gw)
        gw.signal(signal.SIGUSR1)
        wait_for(lambda: "restarted_with_downtime" in gw.output(), 20, "the in-place restart")
        (_, second) = child_pids(gw)
        assert second != first and not pid_alive(first)
        wait_for(lambda: ready_state(base)["status"] == "ready", 10, "/ready to follow the new child")
        assert httpx.get(base + "/ready").status_code == 200
        page = httpx.get(base + "/metrics", headers=scrape).text
        assert "bastion_upstream_up 1.0" in page and 'bastion_upstream_phase{phase="ready"} 1.0' in page
        relayed = httpx.get(base + "/metrics/upstream", headers=scrape)
        assert relayed.status_code == 200 and "vllm:num_requests_running" in relayed.text
        assert httpx.post(base + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200


def _engine_key(pid: int) -> str:
    """The internal key the gateway gave the child `pid` (its environment: the test runs as the same user)."""
    variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [key] = [v.split(b"=", 1)[1].decode() for v in variables if v.startswith(b"VLLM_API_KEY=")]
    return key


def test_the_audit_log_redacts_the_key_of_an_engine_restarted_in_place(tmp_path: Path) -> None:
    """An in-place restart mints a new internal key. The audit log's redactor had the keys of start-up only:
    a client echoing the new key (as its request id, its model) had it written in clear."""
    audit = tmp_path / "audit.jsonl"
    with gateway("--upstream-command", SIM, env={**FAST_RESTARTS, "BASTION_AUDIT_LOG": str(audit)}) as (gw, base):
        (first,) = child_pids(gw)
        old = _engine_key(first)
        gw.signal(signal.SIGUSR1)
        wait_for(lambda: "restarted_with_downtime" in gw.output(), 20, "the in-place restart")
        (_, second) = child_pids(gw)
        new = _engine_key(second)
        assert new != old
        wait_for(lambda: ready_state(base)["status"] == "ready", 10, "the new child ready")
        for key in (old, new):
            headers = {**AUTH, "x-request-id": key}  # a valid request id: recorded as sent
            reply = httpx.post(base + "/v1/chat/completions", json={**CHAT, "model": key}, headers=headers)
            assert reply.status_code in (200, 404), reply.text
        wait_for(lambda: audit.exists() and audit.read_text().count("\n") >= 2, 5, "two audit lines")
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["request_id"], line["model"]) for line in lines[-2:]] == [("[redacted]", "[redacted]")] * 2
    assert old not in audit.read_text() and new not in audit.read_text()  # before: the new key, twice
