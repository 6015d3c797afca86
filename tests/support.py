"""Starting real processes for tests: free ports, readiness waits, cleanup by PID."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.redisio.client import Redis

PYTHON = sys.executable
# The bootstrap key every test gateway accepts (BASTION_API_KEYS), unless a test passes its own.
TEST_KEY = "bst-test_" + "k" * 43
AUTH = {"authorization": f"Bearer {TEST_KEY}"}
# What one audit log line holds: the contract with log pipelines, checked by unit and integration tests.
AUDIT_FIELDS = {
    "time",
    "request_id",
    "principal",
    "client_ip",
    "method",
    "path",
    "model",
    "engine",
    "stream",
    "status",
    "outcome",
    "reason",
    "latency_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "charged_tokens",
}


class _PortRange:
    """Ports for servers a test starts, below the kernel's ephemeral range, one slice per pytest-xdist worker.

    A port is chosen here and bound later by another process (the gateway, the simulator, redis-server...).
    Taken from the ephemeral range (`bind(("", 0))`), it could meanwhile be handed to any socket of the
    machine (another worker's server, any client's connect()); the kernel never hands out ports below that
    range, and each worker walks its own slice in turn (from a random start: other checkouts' suites may run
    on the machine too), so a port comes back to a worker only after its whole slice has been used.
    """

    SPAN = 12_000

    def __init__(self) -> None:
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768
        first = max(1024, low - self.SPAN)
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
        size = (low - first) // max(1, workers)
        self.start = first + worker * size
        self.size = size
        self.next = random.randrange(size)

    def take(self, host: str) -> int:
        for _ in range(self.size):
            port = self.start + self.next
            self.next = (self.next + 1) % self.size
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                try:
                    sock.bind((host, port))
                except OSError:  # in use (another checkout's test, or a service of the machine): the next one
                    continue
            return port
        raise OSError(f"no free port in {self.start}-{self.start + self.size - 1}")


_PORTS = _PortRange()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and that no other socket of this machine will be given meanwhile."""
    return _PORTS.take(host)


def _interruptible() -> None:
    """SIGINT as a terminal's Ctrl-C finds it: a suite started in the background (`make test &`, a CI runner
    without job control) inherits it ignored, and an ignored SIGINT stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
            preexec_fn=_interruptible,
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
    """Poll `url` until it answers `status`. One client for every attempt: `httpx.get` builds a client (and
    its TLS context) per call, ~30 ms of CPU, which a start-up poll paid a dozen times per process started."""
    deadline = time.monotonic() + timeout
    last: object = None
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"process exited before {url} answered:\n{proc.output()}")
            try:
                response = client.get(url)
                if response.status_code == status:
                    return
                last = response.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.02)
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
    env = {"BASTION_API_KEYS": TEST_KEY, **(env or {})}
    proc = Proc([PYTHON, "-m", "bastion", "serve", "--port", str(port), *args], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + ("/ready" if ready else "/health"), proc=proc, timeout=30)
        yield proc, base
    finally:
        proc.stop()


Script = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class LoopbackServer:
    """A real listening socket on 127.0.0.1 (a port the kernel picks) for in-process tests: each connection
    goes to `_serve`; `async with` starts and closes it."""

    tls: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ScriptedUpstream(LoopbackServer):
    """A real upstream socket that misbehaves on cue: `script(request, writer)` writes the answer.

    For in-process tests of failure paths (refused, hung, broken mid-stream, odd statuses);
    it records every request it received.
    """

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request = head + await reader.readexactly(content_length(head))
            self.requests.append(request)
            await self.script(request, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def content_length(head: bytes) -> int:
    """The Content-Length of an HTTP message head (request or response), 0 if it has none."""
    lines = head.split(b"\r\n")
    return next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)


def respond(status: int, body: bytes, content_type: bytes = b"application/json") -> Script:
    async def script(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (status, content_type, len(body), body)
        )
        await writer.drain()

    return script


def sse(*events: bytes, then_break: bool = False) -> Script:
    async def script(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        if not then_break:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return script


def by_path(routes: dict[bytes, Script]) -> Script:
    """Dispatch on the request line's path."""

    async def script(request: bytes, writer: asyncio.StreamWriter) -> None:
        path = request.split(b" ", 2)[1].split(b"?")[0]
        await routes.get(path, respond(404, b'{"error":"not found"}'))(request, writer)

    return script


async def hang(request: bytes, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


@contextlib.contextmanager
def prometheus(config: str, files: dict[str, str] | None = None) -> Iterator[tuple[Proc, str]]:
    """A real Prometheus server on a free loopback port, with its own config and storage.

    `config` is the prometheus.yml text; `files` are written beside it (rule files
    named in it are resolved relative to it). Everything is removed afterwards.
    """
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bastion-prometheus-"))
    (workdir / "prometheus.yml").write_text(config)
    for name, text in (files or {}).items():
        (workdir / name).write_text(text)
    proc = Proc(
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/-/ready", proc=proc, timeout=30)
        yield proc, base
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def read_until(sock: socket.socket, end: bytes, why: str = "the connection was closed") -> bytes:
    """What a raw socket reads up to a read that ends with `end` (a response's last bytes); closed before: fails."""
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, f"{why}: {data[-300:]!r}"
        data += chunk
    return data


@contextlib.contextmanager
def redis_server(*args: str, port: int = 0) -> Iterator[tuple[Proc, str]]:
    """A throwaway redis-server on a free port (or `port`; no persistence; `args` added to its command line);
    yields (proc, redis:// URL)."""
    port = port or free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = Proc([*command, *args])
    try:
        deadline = time.monotonic() + 10
        while True:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited:\n{proc.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (NOAUTH: up, with a password)
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not answering on {port}:\n{proc.output()}")
            time.sleep(0.05)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


async def budget_hashes(url: str) -> list[dict[bytes, bytes]]:
    """Every budget period hash of every principal on the Redis at `url` (not the hourly usage rows):
    `t` counted (reserved and settled) and `s` settled tokens, among others."""
    probe = Redis.from_url(url, 5.0)
    try:
        reply = await probe.execute("SCAN", 0, "MATCH", "bastion:budget:p:*", "COUNT", 1000)
        assert isinstance(reply, list)
        found = []
        for key in reply[1]:
            if b":h:" not in key:
                flat = await probe.execute("HGETALL", key)
                assert isinstance(flat, list)
                found.append(dict(zip(flat[::2], flat[1::2], strict=True)))
        return found
    finally:
        await probe.aclose()


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (its own CA), and its key: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path
