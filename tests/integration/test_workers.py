"""`bastion serve --workers N`: real master, real workers on one port, the simulator as the supervised engine.

Which worker answered is read from the merged /metrics page (`worker` label); pids come from
the master's log lines ("worker 0 started (pid N)", "upstream pid=N started").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import AUTH, PYTHON, TEST_KEY, Proc, free_port, gateway, redis_server, wait_http

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="worker processes share a socket the POSIX way")

SIM = "{python} -m bastion simulate --host {host} --port {port}"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
_ENGINE = re.compile(r"upstream pid=(\d+) started")


def chat(base: str, **kw: object) -> httpx.Response:
    """One request on a connection of its own, so the kernel hands each to whichever worker accepts first."""
    return httpx.post(base + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10, **kw)  # type: ignore[arg-type]


def worker_requests(base: str, status: str = "") -> dict[str, float]:
    """bastion_requests_total (of `status`, if given) summed per worker label, from one scrape (on one worker)."""
    page = httpx.get(base + "/metrics", timeout=10)
    assert page.status_code == 200, page.text
    totals: dict[str, float] = {}
    for line in page.text.splitlines():
        if line.startswith("bastion_requests_total{") and (not status or f'status="{status}"' in line):
            worker = re.search(r'worker="(\d+)"', line)
            assert worker is not None, line
            totals[worker.group(1)] = totals.get(worker.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def started_workers(proc: Proc) -> dict[int, int]:
    """index -> pid of the latest start of each worker, from the master's log."""
    return {int(index): int(pid) for index, pid in _STARTED.findall(proc.output())}


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_for(condition: object, timeout: float, what: str, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout}s:\n{proc.output()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (_, url):
        yield url


def workers_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {"BASTION_UPSTREAM_COMMAND": SIM, "BASTION_REDIS_URL": redis_url, "BASTION_AUDIT_LOG": "off", **extra}


def test_without_redis_several_workers_are_refused_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env.update({"BASTION_UPSTREAM_COMMAND": SIM, "BASTION_API_KEYS": TEST_KEY, "BASTION_AUDIT_LOG": "off"})
    port = str(free_port())
    result = subprocess.run(
        [PYTHON, "-m", "bastion", "serve", "--workers", "2", "--port", port],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "BASTION_WORKERS=2" in lines[0] and "BASTION_REDIS_URL" in lines[0] and "BASTION_WORKERS=1" in lines[0]
    assert "Traceback" not in result.stderr and "upstream" not in result.stderr  # nothing was started


def test_requests_spread_over_workers_and_a_rate_limit_is_exact_across_them(redis_url: str) -> None:
    limit = 12
    env = workers_env(redis_url, BASTION_RATE_LIMIT_RPM=str(limit))
    with gateway("--workers", "2", env=env) as (proc, base):
        # The port answers as soon as one worker serves; the other may still be importing (2 busy cores).
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        results: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            for _ in range(5):
                status = chat(base).status_code
                with lock:
                    results.append(status)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 20
        assert results.count(200) == limit and results.count(429) == 20 - limit, results
        per_worker = worker_requests(base)
        assert set(per_worker) == {"0", "1"}, per_worker  # both workers answered, and counted against one limit
        assert sum(per_worker.values()) == 20


def test_a_killed_worker_is_restarted_and_the_engine_is_untouched(redis_url: str) -> None:
    with gateway("--workers", "2", env=workers_env(redis_url)) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        before = started_workers(proc)
        [engine_pid] = [int(pid) for pid in _ENGINE.findall(proc.output())]
        os.kill(before[0], signal.SIGKILL)
        wait_for(
            lambda: started_workers(proc).get(0, before[0]) != before[0],
            60,
            "worker 0 restarted",
            proc,
        )
        assert f"worker 0 (pid {before[0]}) exited with signal SIGKILL; starting a new one" in proc.output()
        statuses = [chat(base).status_code for _ in range(20)]
        assert statuses == [200] * 20
        after = started_workers(proc)
        assert after[1] == before[1] and after[0] != before[0]
        os.kill(engine_pid, 0)  # the engine child still runs: spawned once, by the master only
        assert _ENGINE.findall(proc.output()) == [str(engine_pid)]
        wait_for(lambda: set(worker_requests(base)) >= {"1"}, 10, "metrics from the workers", proc)


def test_sigterm_lets_a_stream_finish_then_stops_every_process(redis_url: str) -> None:
    slow = SIM + " --itl 0.05 --tokens 40"
    env = workers_env(redis_url, BASTION_UPSTREAM_COMMAND=slow, BASTION_SHUTDOWN_GRACE="20")
    with gateway("--workers", "2", env=env) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        pids = list(started_workers(proc).values())
        [engine_pid] = [int(pid) for pid in _ENGINE.findall(proc.output())]
        body = {**CHAT, "stream": True, "max_tokens": 40}
        events: list[str] = []
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    break
            proc.signal(signal.SIGTERM)  # mid-stream: ~2 s of tokens still to come
            port = int(base.rsplit(":", 1)[1])
            wait_for(lambda: refused(port), 1.5, "the port closed to new connections while draining", proc)
            events.extend(line for line in lines if line.startswith("data: "))
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == 40
        assert proc.popen.wait(30) == 0
        for pid in [*pids, engine_pid]:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert "stopping the workers (in-flight requests finish), then the engines" in proc.output()


def test_a_rolling_restart_asked_of_any_worker_waits_for_streams_on_every_worker(redis_url: str) -> None:
    engines = [{"model": "m", "command": SIM + " --model m --itl 0.1 --tokens 40", "replicas": 2}]
    # An old child gets 0.2 s after SIGTERM: one stopped before its streams end would cut them.
    env = workers_env(
        redis_url,
        BASTION_ENGINES=json.dumps(engines),
        BASTION_ADMIN_TOKEN="admin-" + "t" * 30,
        BASTION_STOP_TIMEOUT="0.2",
    )
    del env["BASTION_UPSTREAM_COMMAND"]
    with gateway("--workers", "2", env=env) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        body = {**CHAT, "stream": True, "max_tokens": 40}
        done: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
                done.extend(line for line in r.iter_lines() if line.startswith("data: "))

        streams = [threading.Thread(target=stream) for _ in range(4)]
        for thread in streams:
            thread.start()
        time.sleep(0.5)  # every stream is running on some worker, on one of the two replicas
        answer = httpx.post(
            base + "/admin/engines/restart",
            headers={"authorization": "Bearer admin-" + "t" * 30},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        outcomes = [r["outcome"] for r in answer.json()["restarted"]]
        assert outcomes == ["restarted", "restarted"], answer.text
        for thread in streams:
            thread.join(30)
        assert done.count("data: [DONE]") == 4  # no stream was cut: the drain counted every worker's requests
        assert "cut after the drain timeout" not in proc.output()
        wait_http(base + "/ready", proc=proc)
        assert chat(base).status_code == 200


def test_when_the_master_is_killed_its_workers_and_engine_stop_too(redis_url: str) -> None:
    with gateway("--workers", "2", env=workers_env(redis_url)) as (proc, _):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        [engine_pid] = [int(pid) for pid in _ENGINE.findall(proc.output())]
        pids = [*started_workers(proc).values(), engine_pid]
        proc.popen.send_signal(signal.SIGKILL)  # the master only, not its process group
        proc.popen.wait(5)

        def gone() -> bool:
            for pid in pids:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    return False
            return True

        wait_for(gone, 15, "workers and engine gone after the master's SIGKILL", proc)
        assert "the master (pid" in proc.output() and "is gone; stopping" in proc.output()


def test_sighup_to_the_master_reloads_the_key_file_in_every_worker(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    env = workers_env(redis_url, BASTION_KEYS_FILE=str(path), BASTION_KEYS_RELOAD_INTERVAL="600")
    with gateway("--workers", "2", env=env) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        create = subprocess.run(
            [PYTHON, "-m", "bastion", "keys", "create", "--name", "late", "--keys-file", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in os.environ.items() if not k.startswith("BASTION_")},
        )
        key = create.stdout.strip()
        assert key.startswith("bst-"), create.stderr
        late = {"authorization": f"Bearer {key}"}
        assert httpx.get(base + "/v1/models", headers=late, timeout=10).status_code == 401
        proc.signal(signal.SIGHUP)
        time.sleep(1.0)
        statuses: list[int] = []
        while set(worker_requests(base, "200")) != {"0", "1"} and len(statuses) < 200:  # both workers answered
            statuses += [httpx.get(base + "/v1/models", headers=late, timeout=10).status_code for _ in range(10)]
        assert set(worker_requests(base, "200")) == {"0", "1"}
        assert statuses == [200] * len(statuses)  # whichever worker answered had reloaded
        assert key not in proc.output()


def test_sigusr1_to_the_master_restarts_the_engine_and_every_worker_follows(redis_url: str) -> None:
    with gateway("--workers", "2", env=workers_env(redis_url)) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        [first] = _ENGINE.findall(proc.output())
        proc.signal(signal.SIGUSR1)
        wait_for(lambda: "restarted_with_downtime" in proc.output(), 30, "the engine restarted", proc)
        [old, new] = _ENGINE.findall(proc.output())
        assert old == first and new != first
        wait_http(base + "/ready", proc=proc)
        for _ in range(10):  # on fresh connections: both workers forward to the new child, and say it is ready
            assert chat(base).status_code == 200
            assert httpx.get(base + "/ready", timeout=5).json()["status"] == "ready"
        with pytest.raises(ProcessLookupError):
            os.kill(int(old), 0)


def test_a_restart_asked_of_a_worker_whose_master_dies_answers_at_once_and_the_worker_stops(redis_url: str) -> None:
    """The master killed while a worker waits on its answer to a restart: the worker's ask must fail at once
    (503), not hold the orphaned worker up for the whole BASTION_SHUTDOWN_GRACE."""
    env = workers_env(
        redis_url,
        BASTION_UPSTREAM_COMMAND=SIM + " --startup-delay 4",
        BASTION_ADMIN_TOKEN="admin-" + "t" * 30,
        BASTION_SHUTDOWN_GRACE="40",
    )
    with gateway("--workers", "2", env=env) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        workers = list(started_workers(proc).values())
        answers: list[int] = []

        def ask() -> None:
            with contextlib.suppress(httpx.HTTPError):
                headers = {"authorization": "Bearer admin-" + "t" * 30}
                answers.append(httpx.post(base + "/admin/engines/restart", headers=headers, timeout=60).status_code)

        asker = threading.Thread(target=ask)
        asker.start()
        wait_for(lambda: len(_ENGINE.findall(proc.output())) == 2, 20, "the new engine child started", proc)
        engines = [int(pid) for pid in _ENGINE.findall(proc.output())]
        proc.popen.send_signal(signal.SIGKILL)  # mid-restart: the new child is still loading
        proc.popen.wait(5)
        # Before: the worker with the ask waited out the grace (40 s) for an answer that could not come.
        wait_for(lambda: all(_gone(pid) for pid in [*workers, *engines]), 15, "workers and engines gone", proc)
        asker.join(10)
        assert answers == [503], answers


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_a_signal_for_the_master_never_kills_a_worker_running_or_still_starting(
    redis_url: str, signum: signal.Signals
) -> None:
    """SIGHUP (`systemctl reload`, passed on by the master) with keys from the environment: nothing in a worker
    handles it. SIGUSR1 (`systemctl kill -s USR1` signals every process of the unit) to the workers themselves:
    only the master restarts engines. Neither may kill a worker, running or still importing, and no worker may
    claim a rolling restart."""

    def deliver(master: Proc) -> None:
        if signum == signal.SIGHUP:
            master.signal(signum)
            return
        for pid in _children(master.popen.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    with gateway("--workers", "2", env=workers_env(redis_url)) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        before = started_workers(proc)
        deliver(proc)
        time.sleep(1.0)
        assert f"exited with signal {signum.name}" not in proc.output(), proc.output()
        assert started_workers(proc) == before
        assert "SIGUSR1: rolling restart" not in proc.output(), "a worker claimed a restart"
        assert chat(base).status_code == 200
    port = free_port()
    env = {"BASTION_API_KEYS": TEST_KEY, **workers_env(redis_url)}
    starting = Proc([PYTHON, "-m", "bastion", "serve", "--port", str(port), "--workers", "2"], env=env)
    try:
        wait_for(lambda: "starting 2 workers" in starting.output(), 30, "the master spawned its workers", starting)
        wait_for(lambda: len(_children(starting.popen.pid)) >= 2, 30, "worker processes", starting)
        deliver(starting)  # the workers are still importing: no handler of theirs yet
        wait_for(lambda: len(started_workers(starting)) == 2, 30, "two workers started", starting)
        time.sleep(0.5)
        assert f"exited with signal {signum.name}" not in starting.output(), starting.output()
    finally:
        starting.stop()


def _children(pid: int) -> list[int]:
    """The spawned worker processes of the master `pid` (multiprocessing's spawn_main in their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_rolling_restart_names_a_worker_that_never_answered_and_counts_no_request_for_it(redis_url: str) -> None:
    """A worker restarting while the engines roll (alive, never acknowledging: here stopped while it imports).
    Before, it counted as 1 request on every old child: each drain waited out its timeout and the line said
    "1 request(s) still running were cut" though nothing ran. Now no request is claimed: the line names the worker."""
    engines = [{"model": "m", "command": SIM + " --model m", "replicas": 2}]
    env = workers_env(redis_url, BASTION_ENGINES=json.dumps(engines), BASTION_DRAIN_TIMEOUT="2")
    del env["BASTION_UPSTREAM_COMMAND"]
    with gateway("--workers", "2", env=env) as (proc, base):
        wait_for(lambda: len(started_workers(proc)) == 2, 30, "two workers started", proc)
        before = started_workers(proc)
        os.kill(before[0], signal.SIGKILL)
        fresh: list[int] = []

        def replaced() -> bool:
            fresh[:] = [pid for pid in _children(proc.popen.pid) if pid not in before.values()]
            return bool(fresh)

        wait_for(replaced, 30, "worker 0's replacement spawned", proc)
        [stuck] = fresh
        os.kill(stuck, signal.SIGSTOP)  # still importing: it has acknowledged nothing, and can carry nothing
        try:
            proc.signal(signal.SIGUSR1)
            wait_for(lambda: len(re.findall(r"engine m/\d: restarted \(", proc.output())) == 2, 60, "both rolled", proc)
        finally:
            os.kill(stuck, signal.SIGCONT)
        output = proc.output()
        assert "still running were cut" not in output, output  # before: "1 request(s) still running were cut"
        assert output.count(f"worker 0 (pid {stuck}) did not answer before the drain timeout") == 2, output
        wait_for(lambda: started_workers(proc).get(0) == stuck, 30, "the stopped worker went on", proc)
        wait_http(base + "/ready", proc=proc)
        assert chat(base).status_code == 200
