"""deploy/nginx/bastion.conf for real: nginx terminating TLS in front of a test gateway.

A self-signed certificate is made here; the shipped file is rendered with this test's
ports and paths only (listen addresses, certificate, upstream), so what runs is what ships.
The client connects from 127.0.0.2 while nginx reaches bastion from 127.0.0.1, so the
audit log's client_ip proves bastion read nginx's X-Forwarded-For (and only the last hop).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import openai
import pytest

from tests.support import AUTH, TEST_KEY, Proc, free_port, gateway, make_cert, simulator

CONF = Path(__file__).parents[2] / "deploy" / "nginx" / "bastion.conf"
ENV_EXAMPLE = Path(__file__).parents[2] / "deploy" / "systemd" / "bastion.env.example"
CLIENT_IP = "127.0.0.2"  # a loopback address other than nginx's own
MODEL = "qwen2.5-7b-instruct"
TOKENS = 16
ITL = 0.05

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (Debian package nginx)")


def shipped_env() -> dict[str, str]:
    """What the shipped env example sets for a gateway behind this nginx: proxy trust and metrics access."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith(("BASTION_TRUSTED_PROXIES", "BASTION_METRICS_", "BASTION_ALLOW_IPS")):
            env[name] = value
    assert env["BASTION_TRUSTED_PROXIES"] == "127.0.0.1", "the env example trusts the nginx on its host"
    return env


def render(gateway_port: int, http_port: int, https_port: int, cert: Path, key: Path, text: str | None = None) -> str:
    """The shipped server blocks with this test's addresses, ports and certificate."""
    text = CONF.read_text() if text is None else text
    for old, new in (
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{gateway_port};"),
        ("    listen [::]:80;\n", ""),
        ("    listen [::]:443 ssl http2;\n", ""),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("/etc/letsencrypt/live/llm.example.com/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/llm.example.com/privkey.pem", str(key)),
    ):
        assert old in text, f"the shipped nginx config no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def main_conf(prefix: Path) -> str:
    """A minimal nginx.conf (what /etc/nginx/nginx.conf provides on a host) including the rendered file."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach this test's private temp dirs
    return (
        f"daemon off;\n{user}worker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log stderr warn;\n"
        f"events {{ worker_connections 128; }}\n"
        f"http {{\n    access_log {prefix / 'access.log'};\n{temp}\n    include {prefix / 'bastion.conf'};\n}}\n"
    )


@contextlib.contextmanager
def nginx_in_front(work: Path, gateway: str, conf: str | None = None) -> Iterator[tuple[str, Path, str]]:
    """nginx with the shipped config (or `conf`) in front of `gateway`: (https base URL, CA file, http base URL)."""
    cert, key = make_cert(work)
    http_port, https_port = free_port(), free_port()
    (work / "bastion.conf").write_text(render(int(gateway.rsplit(":", 1)[1]), http_port, https_port, cert, key, conf))
    (work / "nginx.conf").write_text(main_conf(work))
    check = subprocess.run(
        ["nginx", "-t", "-p", str(work), "-c", str(work / "nginx.conf"), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    nginx = Proc(["nginx", "-p", str(work), "-c", str(work / "nginx.conf"), "-e", "stderr"])
    base = f"https://127.0.0.1:{https_port}"
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(base + "/health", verify=context, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not nginx.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not come up:\n{nginx.output()}")
            time.sleep(0.05)
        yield base, cert, f"http://127.0.0.1:{http_port}"
    finally:
        nginx.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path, str]]:
    """(https base URL, CA file, audit log, plain http base URL) of nginx -> gateway -> simulator.

    The gateway runs with the shipped env example's proxy and metrics settings.
    """
    work = tmp_path_factory.mktemp("nginx")
    audit = work / "audit.jsonl"
    with (
        simulator("--itl", str(ITL), "--tokens", str(TOKENS), "--ttft", "0.05") as (_, sim),
        gateway("--upstream-url", sim, env={**shipped_env(), "BASTION_AUDIT_LOG": str(audit)}) as (_, gw),
        nginx_in_front(work, gw) as (base, cert, plain),
    ):
        yield base, cert, audit, plain


def audit_lines(audit: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in audit.read_text().splitlines()]


def last_audit(audit: Path, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in audit_lines(audit):
            if line["request_id"] == request_id:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no audit line for {request_id}: {audit.read_text()}")


def assert_spread(arrivals: list[float]) -> None:
    """Chunks arrived one by one over the generation, not in one buffered burst at the end."""
    assert len(arrivals) >= TOKENS, arrivals
    span = arrivals[-1] - arrivals[0]
    assert span >= 0.5 * ITL * (TOKENS - 1), f"chunks arrived within {span:.3f}s: buffered"
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(gap >= ITL / 2 for gap in gaps) >= (TOKENS - 1) // 2, gaps


BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.serial  # gaps between arrivals measured
def test_curl_streams_through_tls_and_bastion_sees_the_client_ip(stack: tuple[str, Path, Path, str]) -> None:
    base, cert, audit, _ = stack
    curl = subprocess.Popen(
        [
            "curl", "-sS", "-N", "--fail-with-body", "--max-time", "30",
            "--cacert", str(cert), "--interface", CLIENT_IP,
            "-H", f"authorization: Bearer {TEST_KEY}", "-H", "content-type: application/json",
            "-H", "x-request-id: nginx-curl-1", "-H", "x-forwarded-for: 6.6.6.6",  # a spoof attempt
            "-d", json.dumps(BODY), base + "/v1/chat/completions",
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    arrivals: list[float] = []
    events: list[bytes] = []
    assert curl.stdout is not None
    try:
        for line in curl.stdout:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
                events.append(line)
    finally:
        assert curl.wait(30) == 0
    assert events[-1].strip() == b"data: [DONE]"
    content = [e for e in events[:-1] if json.loads(e[6:])["choices"]]
    assert len(content) >= TOKENS
    assert_spread(arrivals[: len(content)])
    line = last_audit(audit, "nginx-curl-1")
    # nginx appended the real peer to the client's (spoofed) header; bastion took the right-most untrusted hop.
    assert (line["client_ip"], line["status"], line["completion_tokens"]) == (CLIENT_IP, 200, TOKENS)


@pytest.mark.serial  # gaps between arrivals measured
def test_openai_sdk_streams_through_tls(stack: tuple[str, Path, Path, str]) -> None:
    base, cert, audit, _ = stack
    http_client = httpx2.Client(
        transport=httpx2.HTTPTransport(verify=ssl.create_default_context(cafile=str(cert)), local_address=CLIENT_IP)
    )
    client = openai.OpenAI(base_url=base + "/v1", api_key=TEST_KEY, http_client=http_client, max_retries=0)
    arrivals: list[float] = []
    text = []
    with client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-request-id": "nginx-sdk-1"},
    ) as stream:
        for chunk in stream:
            arrivals.append(time.monotonic())
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text)
    assert_spread(arrivals)
    line = last_audit(audit, "nginx-sdk-1")
    assert (line["client_ip"], line["status"]) == (CLIENT_IP, 200)
    with pytest.raises(openai.AuthenticationError):  # the SDK sees bastion's 401 through nginx
        openai.OpenAI(base_url=base + "/v1", api_key="bst-wrong", http_client=http_client, max_retries=0).models.list()


def test_headers_limits_and_redirect(stack: tuple[str, Path, Path, str]) -> None:
    base, cert, _, plain = stack
    context = ssl.create_default_context(cafile=str(cert))
    reply = httpx.get(base + "/v1/models", headers=AUTH, verify=context, timeout=10)
    assert reply.status_code == 200 and reply.json()["data"][0]["id"] == MODEL
    assert reply.headers["strict-transport-security"].startswith("max-age=")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert "server" not in reply.headers or "/" not in reply.headers["server"]  # no version disclosed
    refused = httpx.get(base + "/v1/models", verify=context, timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert "strict-transport-security" in refused.headers
    # Bodies over BASTION_MAX_BODY_BYTES' default are refused by nginx already, in OpenAI's shape.
    huge = httpx.post(
        base + "/v1/chat/completions", content=b"x" * (16 * 1024 * 1024 + 1), headers=AUTH, verify=context, timeout=30
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert "strict-transport-security" in huge.headers
    redirect = httpx.get(plain + "/v1/models", timeout=10)
    assert redirect.status_code == 301 and redirect.headers["location"].startswith("https://")


METRICS_PATHS = ("/metrics", "/metrics/upstream", "/metrics/", "/metrics?x=1", "//metrics", "/%6Detrics/upstream")


def assert_no_metrics(base: str, cert: Path, expected: set[int]) -> None:
    context = ssl.create_default_context(cafile=str(cert))
    for path in METRICS_PATHS:
        for headers in ({}, {"x-forwarded-for": "127.0.0.1"}, {"authorization": "Bearer guess"}):
            reply = httpx.get(base + path, headers=headers, verify=context, timeout=10)
            assert reply.status_code in expected and "bastion_" not in reply.text and "vllm:" not in reply.text, path


def test_metrics_are_never_served_through_nginx(stack: tuple[str, Path, Path, str]) -> None:
    base, cert, _, _ = stack
    assert_no_metrics(base, cert, {404})  # the shipped config refuses them itself


def test_bastion_refuses_metrics_through_a_proxy_even_if_nginx_passed_them(sim: str, tmp_path: Path) -> None:
    """Defence in depth: the deny blocks removed, and bastion in its default settings (no token, no trusted
    proxies): nginx's X-Forwarded-For tells bastion its loopback peer is a proxy, not a local scraper."""
    without_deny = re.sub(r"    location (= /metrics|\^~ /metrics/) \{.*?\n    \}\n", "", CONF.read_text(), flags=re.S)
    assert "location = /metrics" not in without_deny and "location / {" in without_deny
    with gateway("--upstream-url", sim) as (_, gw), nginx_in_front(tmp_path, gw, without_deny) as (base, cert, _):
        assert httpx.get(gw + "/metrics", timeout=10).status_code == 200, "a direct local scrape still works"
        assert_no_metrics(base, cert, {401, 403})  # 403 from the scrape guard; 401 for paths it does not serve


def test_shipped_directives_match_the_gateway() -> None:
    """What the live test cannot tell apart: bastion also sends `X-Accel-Buffering: no`, so nginx would not
    buffer its streams even without `proxy_buffering off`; the file must still say it (other proxies, caches)."""
    from bastion.config import Settings

    text = CONF.read_text()
    for directive in (
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "gzip off;",
    ):
        assert directive in text, directive
    directives = [line.split("#")[0] for line in text.splitlines()]
    assert not any("Authorization" in line for line in directives), "the client's Authorization must reach bastion"
    read_timeout = int(text.split("proxy_read_timeout ")[1].split("s;")[0])
    assert read_timeout > Settings.model_fields["upstream_read_timeout"].default
    max_body = Settings.model_fields["max_body_bytes"].default
    assert f"client_max_body_size {max_body // (1024 * 1024)}m;" in text
    assert f"exceeds {max_body} bytes." in text
