"""Authentication and admission through the real gateway, with the openai SDK, httpx and curl.

One gateway (keys file + JWT secret, listening on `::` so IPv4 and IPv6 loopback
peers are distinct) serves most tests; keys are created, revoked and rotated with
the real CLI while it runs. A second gateway sits behind a "trusted proxy".
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jose import jwt as jose_jwt

from tests.support import PYTHON, TEST_KEY, Proc, gateway

MODEL = "qwen2.5-7b-instruct"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JWT_SECRET = "integration-jwt-secret-0123456789abcdef"
AUDIENCE = "bastion-tests"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) on this machine")


def bastion(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the real CLI; returns stdout (the secret, for create/rotate/mint)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    result = subprocess.run(
        [PYTHON, "-m", "bastion", *args], capture_output=True, text=True, env={**clean, **(env or {})}, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll (bounded) until the running gateway has picked a change up."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the gateway did not pick the change up in time"
        time.sleep(0.05)


def status(base: str, key: str | None, *, source: str | None = None, **headers: str) -> int:
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    transport = httpx.HTTPTransport(local_address=source) if source else None
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.post(base + "/v1/chat/completions", json=CHAT, headers=headers).status_code


def sdk(base: str, key: str, source: str | None = None) -> openai.OpenAI:
    http = httpx.Client(transport=httpx.HTTPTransport(local_address=source)) if source else None
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, http_client=http)


def error_message(base: str, key: str) -> str:
    response = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
    return str(response.json()["error"]["message"]) if response.status_code == 401 else ""


@dataclass
class Keyed:
    proc: Proc
    base: str
    v6: str
    path: Path
    keys: dict[str, str]
    secrets: list[str] = field(default_factory=list)

    def cli(self, *args: str) -> str:
        out = bastion("keys", *args, "--keys-file", str(self.path))
        if out.startswith("bst-"):
            self.secrets.append(out)
        return out

    def create(self, name: str, *policy: str) -> tuple[str, str]:
        key = self.cli("create", "--name", name, *policy)
        return key, key[4:].split("_", 1)[0]


@pytest.fixture(scope="module")
def keyed(sim: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {}
    for name, *policy in (
        ("alice",),
        ("only-qwen", "--models", MODEL),
        ("only-other", "--models", "other-model"),
        ("from-127.0.0.2", "--allow-ip", "127.0.0.2"),
        ("from-v6", "--allow-ip", "::1/128"),
    ):
        keys[name] = bastion("keys", "create", "--name", name, *policy, "--keys-file", str(path))
    env = {"BASTION_API_KEYS": "", "BASTION_JWT_SECRET": JWT_SECRET, "BASTION_JWT_AUDIENCE": AUDIENCE}
    env["BASTION_TOKEN_ENDPOINT"] = "true"
    env["BASTION_AUTH_FAILURE_LIMIT"] = (
        "0"  # these tests poll with keys not loaded yet; see test_key_guessing_is_slowed
    )
    # "::" = every interface: bastion binds an IPv6 and an IPv4 socket
    args = ("--upstream-url", sim, "--keys-file", str(path), "--host", "::" if HAS_IPV6 else "0.0.0.0")
    with gateway(*args, "--log-level", "debug", env=env) as (proc, base):
        port = base.rsplit(":", 1)[1]
        yield Keyed(proc, base, f"http://[::1]:{port}", path, keys, list(keys.values()))


def test_valid_and_wrong_keys(keyed: Keyed) -> None:
    reply = sdk(keyed.base, keyed.keys["alice"]).chat.completions.create(**CHAT)
    assert reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError) as wrong:
        sdk(keyed.base, "bst-00000000_" + "x" * 43).chat.completions.create(**CHAT)
    assert wrong.value.code == "invalid_api_key"
    curl = ["curl", "-s", "-i", "--max-time", "10", keyed.base + "/v1/models"]
    refused = subprocess.run(curl, capture_output=True, text=True, timeout=15, check=True).stdout
    assert refused.startswith("HTTP/1.1 401") and "www-authenticate: Bearer" in refused.lower().replace(
        "bearer", "Bearer"
    )
    auth = ["-H", f"authorization: Bearer {keyed.keys['alice']}"]
    admitted = subprocess.run(curl + auth, capture_output=True, text=True, timeout=15, check=True).stdout
    assert admitted.startswith("HTTP/1.1 200") and MODEL in admitted
    assert status(keyed.base, TEST_KEY) == 401, "bootstrap keys were switched off for this gateway"


def test_created_then_revoked_key_after_hot_reload(keyed: Keyed) -> None:
    key, key_id = keyed.create("temp")
    eventually(lambda: status(keyed.base, key) == 200)
    keyed.cli("revoke", key_id)
    eventually(lambda: status(keyed.base, key) == 401)
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(keyed.base, key).chat.completions.create(**CHAT)
    assert info.value.code == "invalid_api_key" and "revoked" in info.value.message
    assert status(keyed.base, keyed.keys["alice"]) == 200, "other keys are untouched"


def test_expired_key(keyed: Keyed) -> None:
    key, _ = keyed.create("short-lived", "--expires", "1s")
    time.sleep(1.05)
    eventually(lambda: "expired" in error_message(keyed.base, key))
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed.base, key).models.list()


def test_rotation_with_overlap(keyed: Keyed) -> None:
    old, key_id = keyed.create("rotating", "--models", MODEL)
    eventually(lambda: status(keyed.base, old) == 200)
    new = keyed.cli("rotate", key_id, "--overlap", "24h")
    assert new.startswith(f"bst-{key_id}_") and new != old
    eventually(lambda: status(keyed.base, new) == 200)
    assert status(keyed.base, old) == 200, "the old secret works during the overlap"
    assert [m.id for m in sdk(keyed.base, new).models.list()] == [MODEL], "same policy"
    newest = keyed.cli("rotate", key_id)  # no overlap: every older secret stops now
    eventually(lambda: status(keyed.base, newest) == 200)
    assert status(keyed.base, old) == 401 and status(keyed.base, new) == 401
    listing = keyed.cli("list")
    assert key_id in listing and "rotating" in listing
    assert not any(secret in listing for secret in keyed.secrets), "list never shows a secret"


def test_model_allowlist_on_chat_and_models(keyed: Keyed) -> None:
    allowed = sdk(keyed.base, keyed.keys["only-qwen"])
    assert allowed.chat.completions.create(**CHAT).choices
    assert [m.id for m in allowed.models.list()] == [MODEL]
    denied = sdk(keyed.base, keyed.keys["only-other"])
    with pytest.raises(openai.PermissionDeniedError) as info:
        denied.chat.completions.create(**CHAT)
    assert info.value.code == "model_not_allowed"
    assert [m.id for m in denied.models.list()] == []
    with pytest.raises(openai.PermissionDeniedError):
        denied.models.retrieve(MODEL)
    assert [m.id for m in sdk(keyed.base, keyed.keys["alice"]).models.list()] == [MODEL]


def test_per_key_ip_allowlist_from_distinct_peers(keyed: Keyed) -> None:
    key = keyed.keys["from-127.0.0.2"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(keyed.base, key).chat.completions.create(**CHAT)  # from 127.0.0.1
    assert info.value.code == "ip_not_allowed"
    assert sdk(keyed.base, key, source="127.0.0.2").chat.completions.create(**CHAT).choices
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.0.2"]
    curl += ["-H", f"authorization: Bearer {key}", keyed.base + "/v1/models"]
    assert subprocess.run(curl, capture_output=True, text=True, timeout=15, check=True).stdout == "200"
    if HAS_IPV6:
        assert status(keyed.v6, key) == 403


@needs_ipv6
def test_ipv6_peer_is_distinct(keyed: Keyed) -> None:
    key = keyed.keys["from-v6"]
    assert sdk(keyed.v6, key).chat.completions.create(**CHAT).choices
    assert status(keyed.base, key) == 403
    assert status(keyed.base, key, source="127.0.0.2") == 403


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_jwts(keyed: Keyed) -> None:
    env = {"BASTION_JWT_SECRET": JWT_SECRET, "BASTION_JWT_AUDIENCE": AUDIENCE}
    token = bastion("token", "mint", "--sub", "ci-pipeline", "--ttl", "1h", env=env)
    keyed.secrets.append(token)
    assert sdk(keyed.base, token).chat.completions.create(**CHAT).choices

    limited = bastion("token", "mint", "--sub", "ci", "--models", "other-model", env=env)
    keyed.secrets.append(limited)
    with pytest.raises(openai.PermissionDeniedError):
        sdk(keyed.base, limited).chat.completions.create(**CHAT)
    assert sdk(keyed.base, limited).models.list().data == []

    now = int(time.time())
    claims = {"sub": "ci", "aud": AUDIENCE, "iat": now, "exp": now + 600}
    bad = {
        "expired": jose_jwt.encode({**claims, "exp": now - 600}, JWT_SECRET, algorithm="HS256"),
        "wrong audience": jose_jwt.encode({**claims, "aud": "another-service"}, JWT_SECRET, algorithm="HS256"),
        "wrong algorithm": jose_jwt.encode(claims, JWT_SECRET, algorithm="HS512"),
        "alg none": _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(claims) + ".",
        "tampered": token.rsplit(".", 2)[0] + "." + _b64({**claims, "sub": "admin"}) + "." + token.rsplit(".", 1)[1],
        "wrong secret": jose_jwt.encode(claims, "not-the-secret-0123456789", algorithm="HS256"),
    }
    keyed.secrets.extend(bad.values())
    for what, forged in bad.items():
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(keyed.base, forged).chat.completions.create(**CHAT)
        assert info.value.code == "invalid_api_key", what


def test_token_endpoint_with_curl(keyed: Keyed) -> None:
    curl = ["curl", "-sS", "-X", "POST", keyed.base + "/v1/auth/token", "-d", '{"ttl": 60}']
    curl += ["-H", f"authorization: Bearer {keyed.keys['only-qwen']}", "-H", "content-type: application/json"]
    reply = json.loads(subprocess.run(curl, capture_output=True, text=True, timeout=15, check=True).stdout)
    token = reply["access_token"]
    keyed.secrets.append(token)
    assert reply["expires_in"] == 60
    client = sdk(keyed.base, token)
    assert client.chat.completions.create(**CHAT).choices
    assert [m.id for m in client.models.list()] == [MODEL]


def test_no_secret_in_gateway_output(keyed: Keyed) -> None:
    """Runs last in this module: every key and token used above, grepped for in the gateway's output."""
    status(keyed.base, "bst-deadbeef_" + "s" * 43)
    output = keyed.proc.output()
    assert "refused" in output, "debug logging is on, so refusals were logged"
    # a token counts as leaked if it, or its signature alone, appears anywhere
    leaked = [s[:12] + "…" for s in keyed.secrets if s in output or (s.split(".")[-1] or s) in output]
    assert not leaked and "s" * 43 not in output


def test_sighup_reload_and_broken_file(sim: str, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    env = {"BASTION_KEYS_RELOAD_INTERVAL": "600"}  # only SIGHUP can make it notice
    with gateway("--upstream-url", sim, "--keys-file", str(path), env=env) as (proc, base):
        key = bastion("keys", "create", "--name", "late", "--keys-file", str(path))
        time.sleep(0.3)
        assert status(base, key) == 401
        proc.signal(signal.SIGHUP)
        eventually(lambda: status(base, key) == 200, timeout=3)
        path.write_text('{"version": 1, "keys": [{"id": "oops", "colour": "red"}]}')
        proc.signal(signal.SIGHUP)
        eventually(lambda: "keeping the last good set" in proc.output(), timeout=3)
        assert status(base, key) == 200, "a broken file keeps the last good set"
        assert "colour: unknown field" in proc.output()
        assert key not in proc.output()


def test_key_guessing_is_slowed_per_address(sim: str) -> None:
    from tests.support import TEST_KEY

    with gateway("--upstream-url", sim, env={"BASTION_AUTH_FAILURE_LIMIT": "3"}) as (_, base):
        assert [status(base, f"bst-guess{i}_{'x' * 40}") for i in range(3)] == [401, 401, 401]
        with httpx.Client() as client:
            blocked = client.get(base + "/v1/models", headers={"authorization": "Bearer bst-guess_" + "y" * 40})
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
        assert status(base, TEST_KEY) == 200, "a valid key is never locked out by its neighbours' failures"
        assert status(base, "bst-guess_" + "z" * 40, source="127.0.0.2") == 401, "other addresses are not affected"


@pytest.fixture(scope="module")
def proxied(sim: str) -> Iterator[str]:
    """A gateway that believes X-Forwarded-For only from 127.0.0.1 and admits only 203.0.113.0/24."""
    env = {"BASTION_TRUSTED_PROXIES": "127.0.0.1", "BASTION_ALLOW_IPS": "203.0.113.0/24"}
    with gateway("--upstream-url", sim, env=env) as (_, base):
        yield base


@pytest.mark.parametrize(
    ("source", "xff", "expected"),
    [
        ("127.0.0.1", "203.0.113.5", 200),  # the proxy vouches for an allowed client
        ("127.0.0.1", None, 403),  # the proxy itself is not an allowed client
        ("127.0.0.1", "198.51.100.9, 203.0.113.5", 200),  # a client-written left part is ignored
        ("127.0.0.1", "203.0.113.5, 198.51.100.9", 403),  # right-most untrusted hop decides
        ("127.0.0.2", "203.0.113.5", 403),  # spoofed XFF from an untrusted peer: no effect
    ],
)
def test_trusted_proxy_forwarded_for(proxied: str, source: str, xff: str | None, expected: int) -> None:
    headers = {"x-forwarded-for": xff} if xff else {}
    assert status(proxied, TEST_KEY, source=source, **headers) == expected
    if expected == 403:
        assert status(proxied, None, source=source, **headers) == 403, "refused before the credential is read"


def test_spoofed_forwarded_for_with_curl(proxied: str) -> None:
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.0.2"]
    curl += ["-H", "x-forwarded-for: 203.0.113.5", "-H", f"authorization: Bearer {TEST_KEY}", proxied + "/v1/models"]
    assert subprocess.run(curl, capture_output=True, text=True, timeout=15, check=True).stdout == "403"
