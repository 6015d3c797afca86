"""Admission a hostile key holder cannot get around, through the real gateway (issue 15).

One gateway (keys file, token endpoint, a few routes beyond the default, a failed-login
budget of 3, 127.0.0.1 as its trusted proxy so each test can speak from its own client
address with X-Forwarded-For) in front of the simulator. Keys are made and revoked with
the real CLI; clients are httpx, curl and the openai SDK.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import PYTHON, Proc, gateway

MODEL = "qwen2.5-7b-instruct"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JWT_SECRET = "admission-jwt-secret-0123456789abcdef"
FAILURE_LIMIT = 3


def cli(*args: str) -> str:
    result = subprocess.run([PYTHON, "-m", "bastion", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the gateway did not pick the change up in time"
        time.sleep(0.05)


@dataclass
class Gate:
    proc: Proc
    base: str
    path: Path
    keys: dict[str, str]
    created: int = 0

    def create(self, name: str, *policy: str) -> tuple[str, str]:
        """A new key, once the gateway has loaded it (the one poll that succeeds is one request of its budget)."""
        key = cli("keys", "create", "--name", name, *policy, "--keys-file", str(self.path))
        key_id = key[4:].split("_", 1)[0]
        self.created += 1
        poller = f"192.0.2.{self.created}"  # its 401s until the reload count against an address of its own
        eventually(lambda: self.call("GET", "/v1/models", key, client=poller).status_code == 200)
        return key, key_id

    def sdk(self, credential: str, client: str) -> openai.OpenAI:
        headers = {"x-forwarded-for": client}
        return openai.OpenAI(base_url=self.base + "/v1", api_key=credential, max_retries=0, default_headers=headers)

    def call(
        self, method: str, path: str, credential: str | None = None, *, client: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if credential is not None:
            headers["authorization"] = f"Bearer {credential}"
        if client is not None:
            headers["x-forwarded-for"] = client  # from the trusted proxy (127.0.0.1): the client's address
        return httpx.request(method, self.base + path, headers=headers, timeout=10, **kw)

    def chat(self, credential: str, client: str | None = None) -> int:
        return self.call("POST", "/v1/chat/completions", credential, client=client, json=CHAT).status_code

    def mint(self, key: str, **request: Any) -> httpx.Response:
        return self.call("POST", "/v1/auth/token", key, json=request)


@pytest.fixture(scope="module")
def gate(sim: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {
        name: cli("keys", "create", "--name", name, *policy, "--keys-file", str(path))
        for name, *policy in (("open",), ("only-qwen", "--models", MODEL))
    }
    env = {
        "BASTION_API_KEYS": "",
        "BASTION_JWT_SECRET": JWT_SECRET,
        "BASTION_TOKEN_ENDPOINT": "true",
        "BASTION_ROUTES": "default,/v1/responses/{id},/v1/files",
        "BASTION_AUTH_FAILURE_LIMIT": str(FAILURE_LIMIT),
        "BASTION_TRUSTED_PROXIES": "127.0.0.1",
        "BASTION_RATE_LIMIT_TPM": "0",
        "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0",
        "BASTION_KEYS_RELOAD_INTERVAL": "0.2",
    }
    with gateway("--upstream-url", sim, "--keys-file", str(path), env=env) as (proc, base):
        yield Gate(proc, base, path, keys)


def audit_line(proc: Proc, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in proc.output().splitlines():
            if line.startswith('{"time"') and f'"request_id":"{request_id}"' in line:
                return dict(json.loads(line))
        time.sleep(0.05)
    raise AssertionError(f"no audit line for {request_id}")


# --- 1. one principal, one budget ---------------------------------------------------------------


def test_a_minted_token_spends_its_keys_budget_and_minting_is_limited(gate: Gate) -> None:
    key, _ = gate.create("budget", "--rpm", "4")  # the creation poll spent one request
    token = gate.mint(key).json()["access_token"]  # 2
    assert gate.chat(token) == 200  # 3
    assert gate.chat(key) == 200  # 4
    refused = gate.call("POST", "/v1/chat/completions", token, json=CHAT)
    assert refused.status_code == 429, "the token has no budget of its own"
    assert refused.headers["x-ratelimit-limit-requests"] == "4"
    assert gate.chat(key) == 429
    assert gate.mint(key).status_code == 429, "a key at its limit cannot mint tokens"
    gate.call("POST", "/v1/chat/completions", token, json=CHAT, headers={"x-request-id": "minted-1"})
    line = audit_line(gate.proc, "minted-1")
    assert (line["principal"], line["status"]) == ("budget", 429), "the token is the key: same name, same budget"


def test_keys_that_share_a_name_keep_their_own_budgets(gate: Gate) -> None:
    first, _ = gate.create("twin", "--rpm", "5")  # each: 1 poll + 1 mint + 3 requests = 5
    second, _ = gate.create("twin", "--rpm", "5", "--allow-duplicate-name")
    one, two = gate.mint(first).json()["access_token"], gate.mint(second).json()["access_token"]
    assert [gate.chat(one) for _ in range(3)] == [200] * 3
    assert [gate.chat(two) for _ in range(3)] == [200] * 3, "the other key's spending is not this one's"
    assert gate.chat(two) == 429 and gate.chat(one) == 429


def test_a_revoked_keys_tokens_stop_at_the_next_reload(gate: Gate) -> None:
    key, key_id = gate.create("doomed")
    token = gate.mint(key).json()["access_token"]
    client = gate.sdk(token, "192.0.2.200")
    assert client.chat.completions.create(**CHAT).choices
    cli("keys", "revoke", key_id, "--keys-file", str(gate.path))
    eventually(lambda: gate.chat(token, "192.0.2.201") == 401)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(**CHAT)
    assert "revoked" in info.value.message


def test_a_token_keeps_its_keys_models_and_expiry(gate: Gate) -> None:
    key, _ = gate.create("short-qwen", "--models", MODEL, "--expires", "1h")
    reply = gate.mint(key, models=[MODEL, "other-model"], ttl=600).json()
    token = reply["access_token"]
    assert reply["expires_in"] == 600
    client = gate.sdk(token, "192.0.2.202")
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(**{**CHAT, "model": "other-model"})
    assert gate.mint(token).status_code == 403, "a token cannot renew itself"


@pytest.mark.parametrize(
    "body",
    [b'{"ttl": NaN}', b'{"ttl": Infinity}', b'{"ttl": -Infinity}', b'{"ttl": -1}', b'{"ttl": 0}',
     b'{"ttl": 1e308}', b'{"ttl": 1' + b"0" * 400 + b"}", b'{"ttl": "60"}', b'{"ttl": true}', b'{"ttl": null}'],
)  # fmt: skip
def test_a_nonsense_ttl_is_a_400_never_a_500(gate: Gate, body: bytes) -> None:
    request_id = f"ttl-{abs(hash(body))}"
    reply = gate.call(
        "POST",
        "/v1/auth/token",
        gate.keys["open"],
        content=body,
        headers={"content-type": "application/json", "x-request-id": request_id},
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_ttl", "ttl") and "ttl" in error["message"]
    line = audit_line(gate.proc, request_id)
    assert (line["status"], line["outcome"]) == (400, "rejected")
    assert "Traceback" not in gate.proc.output()


# --- 2. the endpoint allowlist ------------------------------------------------------------------


def test_only_enabled_routes_are_forwarded(gate: Gate) -> None:
    restricted, unrestricted = gate.keys["only-qwen"], gate.keys["open"]

    def code(reply: httpx.Response) -> str:
        body = reply.json()
        return str(body["error"]["code"] if "error" in body else body["code"])  # bastion's, or vLLM's shape

    # vLLM's admin routes never reach vLLM with an inference key; unknown and disabled routes neither.
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/batches", "/v1/nothing", "/v1/"):
        reply = gate.call("POST", path, unrestricted, json={"lora_name": "x", "lora_path": "/tmp/x"})
        assert (reply.status_code, code(reply)) == (404, "unknown_route"), path
    nobody = gate.call("POST", "/v1/load_lora_adapter", client="192.0.2.203")
    assert nobody.status_code == 401, "routes are only told to the authenticated"
    # A wrong method is a 405 that says which one is right; GET never slips past the model check.
    wrong = gate.call("GET", "/v1/chat/completions", restricted)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    # Unscoped routes (nothing there names a model) are closed to model-restricted keys...
    for method, path in (("GET", "/v1/responses/resp_123"), ("GET", "/v1/files"), ("POST", "/v1/files")):
        reply = gate.call(method, path, restricted)
        assert (reply.status_code, code(reply)) == (403, "route_not_allowed"), path
    with pytest.raises(openai.PermissionDeniedError):
        gate.sdk(restricted, "192.0.2.204").files.list()
    # ... and forwarded for the others (the simulator itself answers 404: it has no such route).
    for method, path in (("GET", "/v1/responses/resp_123"), ("GET", "/v1/files")):
        reply = gate.call(method, path, unrestricted)
        assert reply.status_code == 404 and code(reply) != "unknown_route", path
    # Model in the path: held to the key's models before anything is forwarded.
    other = gate.call("GET", "/v1/models/other-model", restricted)
    assert (other.status_code, code(other)) == (403, "model_not_allowed")
    assert gate.call("GET", "/v1/models/../load_lora_adapter", unrestricted).status_code == 404
    assert gate.chat(restricted) == 200


# --- 6. the failed-login budget -----------------------------------------------------------------


def test_requests_without_credentials_never_lock_anyone_out(gate: Gate) -> None:
    office = "198.51.100.7"
    for path in ("/favicon.ico", "/v1/models", "/robots.txt") * 10:
        assert gate.call("GET", path, client=office).status_code == 401
    assert gate.call("GET", "/v1/models", gate.keys["open"], client=office).status_code == 200


def test_wrong_credentials_are_slowed_but_a_valid_key_behind_the_same_address_is_not(gate: Gate) -> None:
    office = "198.51.100.8"
    wrong = ["bst-guess0000_" + "x" * 43, "bst-guess0001_" + "y" * 43, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.AAAA"]
    assert [gate.call("GET", "/v1/models", w, client=office).status_code for w in wrong] == [401] * FAILURE_LIMIT
    blocked = gate.call("GET", "/v1/models", "bst-guess0002_" + "z" * 43, client=office)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    assert blocked.json()["error"]["code"] == "rate_limit_exceeded"
    assert gate.call("GET", "/v1/models", gate.keys["open"], client=office).status_code == 200, "never a valid key"
    assert gate.call("GET", "/v1/models", wrong[0], client=office).status_code == 429, "still blocked for guesses"
    assert gate.call("GET", "/v1/models", wrong[0], client="198.51.100.9").status_code == 401, "per address"


def test_ipv6_clients_are_counted_by_their_64(gate: Gate) -> None:
    guess = "bst-guess0003_" + "w" * 43
    same_64 = [f"2001:db8:1:2::{n}" for n in range(1, FAILURE_LIMIT + 1)]
    assert [gate.call("GET", "/v1/models", guess, client=ip).status_code for ip in same_64] == [401] * FAILURE_LIMIT
    assert gate.call("GET", "/v1/models", guess, client="2001:db8:1:2:ffff::9").status_code == 429
    assert gate.call("GET", "/v1/models", guess, client="2001:db8:1:3::1").status_code == 401, "another /64"
    assert gate.call("GET", "/v1/models", gate.keys["open"], client="2001:db8:1:2::5").status_code == 200
