"""What the benchmark drivers share: processes on 127.0.0.1, their CPU and memory, bastion and nginx set up.

Used by run.py (`make bench`) and ceiling.py; not a benchmark itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable
MODEL = "qwen2.5-7b-instruct"


def stop_children_on_sigterm() -> None:
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: every `process` context stops what it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def series_sums(page: str, names: Sequence[str]) -> dict[str, float]:
    """From a Prometheus text page, each of `names` summed over its label sets (0 where the page has none)."""
    sums = dict.fromkeys(names, 0.0)
    for line in page.splitlines():
        name = line.partition("{")[0].partition(" ")[0]
        if name in sums:
            sums[name] += float(line.rpartition(" ")[2])
    return sums


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def evenly(values: Sequence[float], most: int) -> list[float]:
    """At most `most` of `values`, evenly spread over the sorted ones: percentiles kept, a reply kept small
    (8,000 requests/s for 5 s printed 40,000 samples, ~300 KB, and a parent got the reply cut at 64 KiB)."""
    ordered = sorted(values)
    if len(ordered) <= most:
        return ordered
    return [ordered[i * len(ordered) // most] for i in range(most)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def children(pid: int) -> list[int]:
    """Direct children of `pid` (nginx's workers under its master)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(limit: float, patience: float) -> float:
    """Wait (up to `patience` s) until the 1-minute load average is below `limit`; returns the last reading.

    The reference machine is shared: a measurement taken while something else runs measures that too.
    """
    deadline = time.monotonic() + patience
    load = load_average()
    noted = False
    while load >= limit and time.monotonic() < deadline:
        if not noted:
            say(f"load average {load:.2f} >= {limit}: waiting for the machine to quieten (up to {patience:.0f} s)")
            noted = True
        time.sleep(5)
        load = load_average()
    return load


@contextlib.contextmanager
def process(
    args: Sequence[str], env: dict[str, str], ready_url: str, log: Path, timeout: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """A process started, waited for until `ready_url` answers 200, and stopped (TERM, then KILL) by its PID."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(list(args), env=env, stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{list(args)[:4]} did not start; see {log}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "VLLM_"))}


def gateway_env(work: Path) -> dict[str, str]:
    """bastion as in production: a key file, an IP allowlist, every rate limit (set high), metrics, audit log."""
    return {
        **clean_env(),
        "BASTION_KEYS_FILE": str(work / "keys.json"),
        "BASTION_ALLOW_IPS": "127.0.0.0/8",
        "BASTION_RATE_LIMIT_RPM": "100000000",
        "BASTION_RATE_LIMIT_TPM": "100000000000",
        "BASTION_RATE_LIMIT_MAX_CONCURRENT": "100000",
        "BASTION_METRICS_TOKEN": "bench-metrics-token-0123456789",
        "BASTION_AUDIT_LOG": str(work / "audit.jsonl"),
        "BASTION_LOG_LEVEL": "warning",
    }


def create_key(env: dict[str, str]) -> str:
    return subprocess.run(
        [PYTHON, "-m", "bastion", "keys", "create", "--name", "bench"], env=env, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip


def upstream(port: int, work: Path, *flags: str, name: str = "upstream") -> contextlib.AbstractContextManager[
    subprocess.Popen[bytes]
]:  # fmt: skip
    """bench/fast_upstream.py on `port` (flags: --paced, --itl, --tokens)."""
    return process(
        [PYTHON, str(HERE / "fast_upstream.py"), "--port", str(port), *flags],
        clean_env(), f"http://127.0.0.1:{port}/health", work / f"{name}.log",
    )  # fmt: skip


def relay(port: int, upstream_port: int, work: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """bench/tcp_relay.py: bytes pumped between client and upstream in Python on uvloop, the floor of any such proxy."""
    return process(
        [PYTHON, str(HERE / "tcp_relay.py"), "--port", str(port), "--upstream-port", str(upstream_port)],
        clean_env(), f"http://127.0.0.1:{port}/health", work / "relay.log",
    )  # fmt: skip


def bastion(
    port: int, upstream_url: str, env: dict[str, str], work: Path, name: str = "gateway", workers: int = 1
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`bastion serve` on `port` in external mode; `workers` > 1 needs BASTION_REDIS_URL in `env`."""
    return process(
        [PYTHON, "-m", "bastion", "serve", "--port", str(port), "--upstream-url", upstream_url,
         *(["--workers", str(workers)] if workers > 1 else [])],
        env, f"http://127.0.0.1:{port}/ready", work / f"{name}.log",
    )  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), e.g. a bastion master's workers: their CPU is bastion's too."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
                found.append(int(child))
                pending.append(int(child))
    return found


@contextlib.contextmanager
def redis(port: int, work: Path, server: str = "redis-server") -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1:`port` (no persistence), stopped by its PID; yields its URL."""
    if shutil.which(server) is None:
        raise SystemExit(f"{server} not found: `--workers N` needs a Redis (apt-get install redis-server; on a "
                         "machine without it: `dpkg -x` the redis-server, liblzf1 and libjemalloc2 .debs and pass "
                         "--redis-server with LD_LIBRARY_PATH set)")  # fmt: skip
    with (work / "redis.log").open("wb") as sink:
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=sink, stderr=sink,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {work / 'redis.log'}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


NGINX_CONF = """daemon off;
{user}worker_processes 1;
worker_rlimit_nofile 65536;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log {work}/nginx-access.log;
    map_hash_bucket_size 128;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    # The API key check an nginx set-up does: the whole Authorization header against a list.
    map $http_authorization $bench_allowed {{
        default 0;
        "Bearer {key}" 1;
    }}
    upstream model {{
{servers}
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /health {{ return 200 '{{}}'; }}
        location / {{
            if ($bench_allowed = 0) {{ return 401 '{{"error":{{"message":"Invalid API key"}}}}'; }}
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(port: int, upstream_ports: Sequence[int], key: str, work: Path) -> Iterator[list[int]]:
    """nginx (one worker) checking the Bearer key with a map, proxying unbuffered: the PIDs of master and worker."""
    if not shutil.which("nginx"):
        raise RuntimeError("nginx is missing (apt-get install nginx; `make sysdeps` installs it)")
    home = work / "nginx"
    home.mkdir(exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstream_ports)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the private temp dirs
    conf = home / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, work=home, key=key, servers=servers, port=port))
    args = ["nginx", "-p", str(home), "-c", str(conf), "-e", str(home / "nginx-error.log")]
    with process(args, clean_env(), f"http://127.0.0.1:{port}/health", home / "nginx.out") as master:
        yield [master.pid, *children(master.pid)]
