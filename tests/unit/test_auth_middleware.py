"""The admission gate in-process (httpx.ASGITransport): order, public paths, model policy, exchange fields."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.app import create_app
from bastion.asgi import Message, Receive, Scope, Send
from bastion.auth import middleware
from bastion.auth.ipfilter import IPPolicy, parse_networks
from bastion.auth.keys import KeyFile, KeyStore, create_key, revoke_key, write_key_file
from bastion.config import Settings
from bastion.context import Exchange
from tests.support import TEST_KEY, ScriptedUpstream, by_path, respond

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
MODELS = {"object": "list", "data": [{"id": "m1", "object": "model"}, {"id": "m2", "object": "model"}]}
MODELS_BYTES = json.dumps(MODELS, indent=1).encode()


class Keys:
    def __init__(self, tmp_path: Path) -> None:
        data = KeyFile()
        _, self.any = create_key(data, name="any")
        _, self.m1 = create_key(data, name="only-m1", models=["m1"])
        _, self.local = create_key(data, name="local", allow_ips=["127.0.0.0/8", "::1"])
        _, self.remote = create_key(data, name="remote", allow_ips=["203.0.113.0/24"])
        _, self.expired = create_key(data, name="old", expires=timedelta(seconds=-1))
        revoked, self.revoked = create_key(data, name="gone")
        revoke_key(data, revoked.id)
        self.path = tmp_path / "keys.json"
        write_key_file(self.path, data)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def _upstream() -> ScriptedUpstream:
    return ScriptedUpstream(
        by_path(
            {
                b"/v1/chat/completions": respond(200, b'{"ok":true}'),
                b"/v1/models": respond(200, MODELS_BYTES),
                b"/health": respond(200, b"{}"),
            }
        )
    )


@contextlib.asynccontextmanager
async def _client(
    keys: Keys, seen: list[Exchange], peer: str = "127.0.0.1", **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with _upstream() as upstream:
        config = Settings(
            _env_file=None,  # type: ignore[call-arg]
            upstream_url=f"http://127.0.0.1:{upstream.port}",
            keys_file=keys.path,
            **settings,
        )
        app = create_app(config, listeners=[seen.append])
        transport = httpx.ASGITransport(app=app, client=(peer, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_deny_by_default_except_probes(keys: Keys) -> None:
    seen: list[Exchange] = []
    async with _client(keys, seen) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        for path in ("/nowhere", "/docs", "/metrics/", "/v1/models", "/health/"):
            response = await client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/nowhere", headers=_bearer(keys.any))).status_code == 404
        # /metrics has its own protection (token or, without one, loopback only): see test_metrics_http.
        assert (await client.get("/metrics")).status_code == 200
    assert [e.reason for e in seen] == ["missing_credentials"]


@pytest.mark.parametrize(
    ("credential", "status", "reason"),
    [
        (None, 401, "missing_credentials"),
        ("Basic dXNlcjpwYXNz", 401, "invalid_api_key"),
        ("Bearer bst-nope_nothing", 401, "invalid_api_key"),
        ("expired", 401, "expired"),
        ("revoked", 401, "revoked"),
        ("remote", 403, "ip_denied"),
        ("m1-on-m2", 403, "model_not_allowed"),
    ],
)
async def test_refusal_reasons(keys: Keys, credential: str | None, status: int, reason: str) -> None:
    headers = {}
    body = CHAT
    if credential in ("expired", "revoked", "remote"):
        headers = _bearer(getattr(keys, credential))
    elif credential == "m1-on-m2":
        headers, body = _bearer(keys.m1), {**CHAT, "model": "m2"}
    elif credential is not None:
        headers = {"authorization": credential}
    seen: list[Exchange] = []
    async with _client(keys, seen) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == status
    assert response.headers["x-request-id"]
    exchange = seen[0]
    assert (exchange.status, exchange.outcome, exchange.reason) == (status, "rejected", reason)
    for key in (keys.expired, keys.revoked, keys.remote, keys.m1):
        assert key not in response.text


async def test_admitted_request_records_principal_and_ip(keys: Keys) -> None:
    seen: list[Exchange] = []
    async with _client(keys, seen, peer="::ffff:127.0.0.1") as client:
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(keys.local))).status_code == 200
    assert seen[0].principal_name == "local" and seen[0].client_ip == "127.0.0.1" and seen[0].outcome == "ok"


async def test_ip_is_checked_before_the_credential(keys: Keys) -> None:
    seen: list[Exchange] = []
    async with _client(keys, seen, peer="198.51.100.1", allow_ips="10.0.0.0/8") as client:
        nothing = await client.post("/v1/chat/completions", json=CHAT)
        valid = await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(keys.any))
    assert nothing.status_code == valid.status_code == 403, "a denied network learns nothing about keys"
    assert nothing.json()["error"]["code"] == "ip_not_allowed"
    assert [e.reason for e in seen] == ["ip_denied", "ip_denied"]


async def test_model_list_is_filtered_only_for_restricted_keys(keys: Keys) -> None:
    seen: list[Exchange] = []
    async with _client(keys, seen) as client:
        untouched = await client.get("/v1/models", headers=_bearer(keys.any))
        filtered = await client.get("/v1/models", headers=_bearer(keys.m1))
        one = await client.get("/v1/models/m2", headers=_bearer(keys.m1))
        upload = await client.post(
            "/v1/audio/transcriptions", headers=_bearer(keys.m1), files={"file": ("a.wav", b"RIFF")}
        )
        no_model = await client.post("/v1/chat/completions", json={"messages": []}, headers=_bearer(keys.m1))
    assert untouched.content == MODELS_BYTES
    assert [m["id"] for m in filtered.json()["data"]] == ["m1"]
    assert int(filtered.headers["content-length"]) == len(filtered.content)
    assert one.status_code == upload.status_code == no_model.status_code == 403
    assert one.json()["error"]["code"] == "model_not_allowed"


async def test_token_endpoint_exchanges_a_key_for_a_narrower_jwt(keys: Keys) -> None:
    secret = {"token_endpoint": True, "jwt_secret": "token-endpoint-secret-0123456789"}
    seen: list[Exchange] = []
    async with _client(keys, seen, **secret) as client:
        issued = await client.post("/v1/auth/token", headers=_bearer(keys.m1))
        assert issued.status_code == 200 and issued.headers["cache-control"] == "no-store"
        reply = issued.json()
        assert reply["token_type"] == "bearer" and reply["expires_in"] == 900
        token = reply["access_token"]
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(token))).status_code == 200
        m2 = await client.post("/v1/chat/completions", json={**CHAT, "model": "m2"}, headers=_bearer(token))
        assert m2.status_code == 403, "the token keeps the key's model allowlist"
        models = await client.get("/v1/models", headers=_bearer(token))
        assert [m["id"] for m in models.json()["data"]] == ["m1"]
        wider = await client.post("/v1/auth/token", json={"models": ["m2"], "ttl": 30}, headers=_bearer(keys.m1))
        assert wider.json()["expires_in"] == 30
        narrowed = wider.json()["access_token"]
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(narrowed))).status_code == 403
        again = await client.post("/v1/auth/token", headers=_bearer(token))
        assert again.status_code == 403, "a token cannot renew itself"
        assert (await client.get("/v1/auth/token", headers=_bearer(keys.any))).status_code == 405
        assert (await client.post("/v1/auth/token")).status_code == 401
        local = (await client.post("/v1/auth/token", headers=_bearer(keys.local))).json()["access_token"]
    async with _client(keys, seen, peer="198.51.100.1", **secret) as elsewhere:
        moved = await elsewhere.post("/v1/chat/completions", json=CHAT, headers=_bearer(local))
    assert moved.status_code == 403, "the token keeps the key's IP allowlist"
    assert seen[0].principal_name == "only-m1" and seen[0].status == 200


def test_token_endpoint_needs_a_secret(keys: Keys) -> None:
    config = Settings(_env_file=None, upstream_url="http://127.0.0.1:9", keys_file=keys.path, token_endpoint=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="BASTION_JWT_SECRET"):
        create_app(config)


async def test_each_peer_keeps_its_own_address_and_verdict_and_the_memo_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Peers' addresses are worked out once each (no trusted proxies): requests from many peers, interleaved,
    still get their own address and the global lists' verdict, and the memo is emptied when full."""
    monkeypatch.setattr(middleware, "_PEER_MEMO", 4)
    seen: list[tuple[str, str]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    policy = IPPolicy(allow=parse_networks(["10.0.0.0/8"]), deny=parse_networks(["10.0.0.66"]))
    guard = middleware.AuthMiddleware(inner, middleware.Authenticator(KeyStore(None, [TEST_KEY]), None), policy)
    peers = ["10.0.0.1", "10.0.0.66", "192.0.2.7", "::ffff:10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.66"]
    for peer in peers * 3:
        exchange = Exchange("r", "POST", "/v1/chat/completions")
        scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "client": (peer, 1),
                        "headers": [(b"authorization", b"Bearer " + TEST_KEY.encode())]}  # fmt: skip
        exchange.attach(scope)
        statuses: list[int] = []

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])  # noqa: B023 (used at once)

        await guard(scope, _no_body, send)
        seen.append((exchange.client_ip, "ok" if statuses == [200] else exchange.reason))
        assert len(guard._peers) <= 4
    expected = [
        ("10.0.0.1", "ok"),
        ("10.0.0.66", "ip_denied"),
        ("192.0.2.7", "ip_denied"),
        ("10.0.0.2", "ok"),
        ("10.0.0.3", "ok"),
        ("10.0.0.4", "ok"),
        ("10.0.0.66", "ip_denied"),
    ]
    assert seen == expected * 3


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
