"""Budgets through the real gateway: a key with a daily budget, a supervised simulator, the SQLite ledger
beside the key file. Spent → 429 `budget_exceeded` with the reset; `GET /v1/usage`, `bastion usage` and the
responses' own usage agree; the state survives a restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from bastion.auth.jwt import mint
from tests.support import PYTHON, free_port, gateway

SIM = "{python} -m bastion simulate --host {host} --port {port} --tokens 16"
CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
ENV = {"BASTION_AUDIT_LOG": "off", "BASTION_AUTH_FAILURE_LIMIT": "0"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    return subprocess.run(
        [PYTHON, "-m", "bastion", *args], env={**inherited, **(env or {})}, capture_output=True, text=True, timeout=60
    )


def wait_for_key(base: str, key: str) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(base + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code != 200:
        assert time.monotonic() < deadline, "the gateway loaded the new key"
        time.sleep(0.1)


def test_a_daily_budget_is_spent_refused_reported_and_kept_across_a_restart(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    created = cli("keys", "create", "--name", "team", "--budget", "day=600", "--keys-file", str(keys))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = key[4:].split("_", 1)[0]
    auth = {"authorization": f"Bearer {key}"}
    args = ("--upstream-command", SIM, "--keys-file", str(keys))
    used = 0
    with gateway(*args, env=ENV) as (_, base), httpx.Client(base_url=base, headers=auth, timeout=10) as http:
        wait_for_key(base, key)
        for _ in range(50):
            reply = http.post("/v1/chat/completions", json=CHAT)
            if reply.status_code != 200:
                break
            assert int(reply.headers["x-budget-remaining-tokens"]) >= 0 and reply.headers["x-budget-reset"]
            used += reply.json()["usage"]["total_tokens"]
        else:
            raise AssertionError("the budget never ran out")
        assert reply.status_code == 429, reply.text
        error = reply.json()["error"]
        assert error["code"] == "budget_exceeded" and "T00:00:00+00:00" in error["message"]
        assert 0 < int(reply.headers["retry-after"]) <= 86_400
        # the reservation (prompt estimate + max_tokens) is refused once it does not fit: never more than 600 spent
        assert 0 < used <= 600
        day = http.get("/v1/usage").json()["periods"][0]
        assert (day["period"], day["used"], day["limit"], day["reserved"]) == ("day", used, 600, 0)
        time.sleep(1.5)  # the ledger writes its hour roll-ups every second
        report = cli("usage", "--key", key_id, "--format", "json", "--db", str(tmp_path / "usage.sqlite3"))
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["total"] == used, report.stdout
    with gateway(*args, env=ENV) as (_, base), httpx.Client(base_url=base, headers=auth, timeout=10) as http:
        wait_for_key(base, key)
        assert http.get("/v1/usage").json()["periods"][0]["used"] == used, "usage survives a restart"
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 429


def test_a_second_gateway_on_the_same_usage_file_is_one_line(tmp_path: Path) -> None:
    """The SQLite usage file is one process's: a second gateway (no Redis) is refused before it starts
    (check-config beside it passes with a note: tests/integration/test_cli.py)."""
    keys = tmp_path / "keys.json"
    assert cli("keys", "create", "--name", "a", "--keys-file", str(keys)).returncode == 0
    with gateway("--upstream-command", SIM, "--keys-file", str(keys), env=ENV):
        env = {"BASTION_KEYS_FILE": str(keys), "BASTION_UPSTREAM_COMMAND": SIM}
        second = cli("serve", "--port", str(free_port()), env=env)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    [line] = [ln for ln in second.stderr.splitlines() if ln.startswith("bastion: invalid")]
    assert "BASTION_BUDGET_DB" in line and "in use by another gateway process" in line


def test_a_model_budget_holds_for_requests_that_name_no_model(tmp_path: Path) -> None:
    """vLLM serves its default model to a request without `model` (or with null or ""): that model's budget
    counts it. It did not: such requests were charged to a model named "" and spent past `day:MODEL`."""
    model = CHAT["model"]
    keys = tmp_path / "keys.json"
    created = cli("keys", "create", "--name", "m", "--budget", f"day:{model}=200", "--keys-file", str(keys))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    args = ("--upstream-command", SIM, "--keys-file", str(keys), "--served-model-name", str(model))
    unnamed = [{k: v for k, v in CHAT.items() if k != "model"}, {**CHAT, "model": None}, {**CHAT, "model": ""}]
    with gateway(*args, env=ENV) as (_, base), httpx.Client(base_url=base, timeout=10) as http:
        http.headers["authorization"] = f"Bearer {key}"
        wait_for_key(base, key)
        used = 0
        for attempt in range(30):
            reply = http.post("/v1/chat/completions", json=unnamed[attempt % 3])
            if reply.status_code != 200:
                break
            assert reply.json()["model"] == model  # the engine served the budgeted model
            used += reply.json()["usage"]["total_tokens"]
        else:
            raise AssertionError("requests naming no model were never refused by the model's budget")
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "budget_exceeded", reply.text
        assert 0 < used <= 200
        usage = http.get("/v1/usage").json()
        [scoped] = [p for p in usage["periods"] if p["model"] == model]
        assert scoped["used"] == used
        assert [entry["model"] for entry in usage["by_model"]] == [model]


@pytest.mark.parametrize("name", ["\ud800", "m" * 513])
def test_a_model_name_that_is_not_unicode_or_too_long_is_refused_and_breaks_no_one(tmp_path: Path, name: str) -> None:
    """`"model": "\\ud800"` is a lone surrogate once decoded. An upstream that ignores `model` (the simulator,
    many OpenAI-compatible servers) answered 200, and the name then stuck every usage write (everyone's
    roll-ups kept in memory, lost at shutdown) and made /metrics answer 500 until a restart. A 60 KB name was
    a metric label of 60 KB on every series of its own (32 such names: ~45 MB per scrape)."""
    keys = tmp_path / "keys.json"
    created = [cli("keys", "create", "--name", n, "--keys-file", str(keys)) for n in ("mallory", "bob")]
    mallory, bob = (c.stdout.strip() for c in created)
    hostile = json.dumps({**CHAT, "model": name})
    with gateway("--upstream-command", SIM, "--keys-file", str(keys), env=ENV) as (_, base):
        wait_for_key(base, bob)
        refused = httpx.post(
            base + "/v1/chat/completions", content=hostile, headers={"authorization": f"Bearer {mallory}"}
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text
        served = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {bob}"})
        assert served.status_code == 200
        used = served.json()["usage"]["total_tokens"]
        scrape = httpx.get(base + "/metrics", timeout=10)
        assert scrape.status_code == 200 and len(scrape.content) < 100_000
        time.sleep(1.5)  # the ledger writes its hour roll-ups every second
    report = cli("usage", "--format", "json", "--db", str(tmp_path / "usage.sqlite3"))
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["total"] == used, report.stdout


def test_a_usage_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    """BASTION_BUDGET_DB naming another file (here the key file) or a damaged one: `serve` printed a
    traceback from its lifespan, `bastion usage` one from sqlite3. Now one line that names the setting."""
    keys = tmp_path / "keys.json"
    assert cli("keys", "create", "--name", "a", "--keys-file", str(keys)).returncode == 0
    env = {"BASTION_KEYS_FILE": str(keys), "BASTION_BUDGET_DB": str(keys)}
    served = cli("serve", "--port", "0", "--upstream-command", SIM, env=env)
    assert served.returncode == 2 and "Traceback" not in served.stderr, served.stderr
    [line] = [ln for ln in served.stderr.splitlines() if ln.startswith("bastion:")]
    assert "BASTION_BUDGET_DB" in line and "not a database" in line and "name a new file" in line
    report = cli("usage", "--db", str(keys))
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr
    assert report.stderr.strip().splitlines() == [f"bastion: usage database {keys}: file is not a database"]


def test_the_audit_line_says_what_a_client_gone_mid_stream_was_charged(tmp_path: Path) -> None:
    """A client gone mid-stream leaves no usage: the ledger and tokens/min charge an estimate. The audit line
    said only `"prompt_tokens":null`, so it could not be reconciled with the ledger; `charged_tokens` can."""
    keys = tmp_path / "keys.json"
    audit = tmp_path / "audit.log"
    key = cli("keys", "create", "--name", "gone", "--budget", "day=100000", "--keys-file", str(keys)).stdout.strip()
    slow = SIM.replace("--tokens 16", "--tokens 400 --itl 0.02")
    args = ("--upstream-command", slow, "--keys-file", str(keys))
    body = json.dumps({**CHAT, "max_tokens": 300, "stream": True}).encode()
    with gateway(*args, env={**ENV, "BASTION_AUDIT_LOG": str(audit)}) as (_, base):
        wait_for_key(base, key)
        host, port = base.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            sock.sendall(head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while received.count(b"\n\n") < 6:  # the head and a few events, then gone
                received += sock.recv(65536)
        served = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
        assert served.status_code == 200
        time.sleep(0.5)
        used = httpx.get(base + "/v1/usage", headers={"authorization": f"Bearer {key}"}).json()["periods"][0]["used"]
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    gone, ok = [line for line in lines if line["path"] == "/v1/chat/completions"]
    assert gone["outcome"] == "client_disconnect" and gone["prompt_tokens"] is None
    assert gone["charged_tokens"] > 0
    assert ok["charged_tokens"] == ok["prompt_tokens"] + ok["completion_tokens"]
    assert gone["charged_tokens"] + ok["charged_tokens"] == used


def test_a_token_whose_subject_is_not_unicode_is_refused_and_breaks_no_one(tmp_path: Path) -> None:
    """`bastion token mint --sub $'caf\\xe9'` (a Latin-1 terminal) minted `"sub": "caf\\udce9"`; the gateway took it,
    and the principal `jwt:caf\\udce9` stopped every usage write. Now the CLI says so and the gateway refuses it."""
    secret = "subject-secret-0123456789abcdef0123456789"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    minted = subprocess.run(
        [PYTHON, "-m", "bastion", "token", "mint", "--sub", b"caf\xe9"],
        env={**inherited, "BASTION_JWT_SECRET": secret},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert minted.returncode == 2 and "Traceback" not in minted.stderr, minted.stderr
    assert (
        minted.stderr.strip()
        == "bastion: --sub must be valid UTF-8 text (the gateway refuses a token whose subject is not)"
    )
    keys = tmp_path / "keys.json"
    bob = cli("keys", "create", "--name", "bob", "--keys-file", str(keys)).stdout.strip()
    with gateway("--upstream-command", SIM, "--keys-file", str(keys), env={**ENV, "BASTION_JWT_SECRET": secret}) as (
        _,
        base,
    ):
        wait_for_key(base, bob)
        hostile = mint(secret, "caf\udce9", 600)
        refused = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {hostile}"})
        assert refused.status_code == 401, refused.text
        served = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {bob}"})
        used = served.json()["usage"]["total_tokens"]
        assert httpx.get(base + "/metrics", timeout=10).status_code == 200
        time.sleep(1.5)  # the ledger writes its hour roll-ups every second
    report = cli("usage", "--format", "json", "--db", str(tmp_path / "usage.sqlite3"))
    assert json.loads(report.stdout)["total"] == used, report.stdout + report.stderr


@pytest.mark.parametrize("field", ["name", "models", "budgets"])
def test_a_hand_edited_key_that_is_not_unicode_is_refused_in_one_line(tmp_path: Path, field: str) -> None:
    """A key file edited by hand can hold `"name": "\\ud800"` (a lone surrogate once decoded), which as the
    `principal` label makes every scrape of /metrics a 500. pydantic refused the name only by accident (its
    length check), in words no operator reads as "this key" ("unable to parse raw data as a unicode string"),
    and took a surrogate in `models` or a budget's model (`day:\\ud800`) without a word. Now `serve` refuses
    the file in one line naming it, the key's id and the fix; a running gateway keeps its last good set."""
    keys = tmp_path / "keys.json"
    created = cli("keys", "create", "--name", "alice", "--keys-file", str(keys))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    good = keys.read_text()
    data = json.loads(good)
    hostile = {"name": "caf\ud800", "models": ["qwen2.5-7b-instruct", "m\udce9"], "budgets": {"day:m\ud800": 50}}
    data["keys"][0][field] = hostile[field]
    bad = json.dumps(data)  # ensure_ascii: the surrogate is written as the escape "\ud800", as a hand would
    assert "\\ud" in bad
    keys.write_text(bad)
    key_id = data["keys"][0]["id"]
    served = cli("serve", "--port", "0", "--upstream-command", SIM, env={"BASTION_KEYS_FILE": str(keys)})
    assert served.returncode == 2 and "Traceback" not in served.stderr, served.stderr
    [line] = [ln for ln in served.stderr.splitlines() if ln.startswith("bastion:")]
    assert str(keys) in line and key_id in line and "not valid Unicode" in line and "bst-" not in line, line
    keys.write_text(good)
    auth = {"authorization": f"Bearer {key}"}
    env = {**ENV, "BASTION_KEYS_RELOAD_INTERVAL": "0.2"}
    with gateway("--upstream-command", SIM, "--keys-file", str(keys), env=env) as (proc, base):
        wait_for_key(base, key)
        keys.write_text(bad)
        deadline = time.monotonic() + 10
        while "not reloaded" not in proc.output():
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
        reply = httpx.post(base + "/v1/chat/completions", json=CHAT, headers=auth, timeout=10)
        assert reply.status_code == 200, reply.text
        scrape = httpx.get(base + "/metrics", timeout=10)
        assert scrape.status_code == 200 and 'principal="alice"' in scrape.text, scrape.text[:300]
