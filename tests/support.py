"""Starting real processes for tests: free ports, readiness waits, cleanup by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

PYTHON = sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Proc:
    """A child process in its own session, with its output captured to a file."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="bastion-test-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        # A developer's own BASTION_* variables or .env must not change what a test runs.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "VLLM_"))}
        self.popen = subprocess.Popen(
            list(args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**inherited, **(env or {})},
            cwd=tempfile.gettempdir(),
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL the whole process group."""
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


def wait_http(url: str, timeout: float = 20.0, proc: Proc | None = None, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"process exited before {url} answered:\n{proc.output()}")
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == status:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not answering {status} after {timeout}s (last: {last})")


@contextlib.contextmanager
def simulator(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[Proc, str]]:
    port = free_port()
    proc = Proc([PYTHON, "-m", "bastion", "simulate", "--port", str(port), *args], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", proc=proc)
        yield proc, base
    finally:
        proc.stop()


@contextlib.contextmanager
def gateway(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> Iterator[tuple[Proc, str]]:
    port = free_port()
    proc = Proc([PYTHON, "-m", "bastion", "serve", "--port", str(port), *args], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + ("/ready" if ready else "/health"), proc=proc, timeout=30)
        yield proc, base
    finally:
        proc.stop()


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[Proc, str]]:
    """A throwaway redis-server on a free port (no persistence); yields (proc, redis:// URL)."""
    port = free_port()
    proc = Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    try:
        deadline = time.monotonic() + 10
        while True:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited:\n{proc.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not answering on {port}:\n{proc.output()}")
            time.sleep(0.05)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()
