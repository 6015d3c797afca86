"""JWT verification: pinned algorithms, required claims, key separation, ceilings."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk
from jose import jwt as jose_jwt

from bastion.app import jwt_config
from bastion.auth.errors import AuthFailure
from bastion.auth.jwt import JWTVerifier, mint
from bastion.auth.keys import KeyFile, KeyStore, create_key, revoke_key, write_key_file
from bastion.config import Settings

SECRET = "unit-test-hmac-secret-0123456789"


def _settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


def _verifier(**kw: Any) -> JWTVerifier:
    return JWTVerifier(jwt_config(_settings(**kw)))


def _claims(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "ci", "iat": now, "exp": now + 300, **kw}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def _reason(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(token)
    return info.value.reason


async def test_valid_hs256_token_and_claim_mapping() -> None:
    verifier = _verifier(jwt_secret=SECRET, jwt_audience="bastion", jwt_issuer="ops")
    token = mint(SECRET, "ci", 60, models=["m"], limits={"rpm": 5}, audience="bastion", issuer="ops")
    principal = await verifier.verify(token)
    assert (principal.id, principal.name, principal.kind) == ("jwt:ci", "ci", "jwt")
    assert principal.models == frozenset({"m"}) and principal.rpm == 5 and principal.tpm is None
    assert principal.expires is not None and principal.expires > time.time()


async def test_refusals() -> None:
    verifier = _verifier(jwt_secret=SECRET, jwt_audience="bastion", jwt_leeway=5)
    good = jose_jwt.encode(_claims(aud="bastion"), SECRET, algorithm="HS256")
    assert (await verifier.verify(good)).name == "ci"
    expired = jose_jwt.encode(_claims(aud="bastion", exp=int(time.time()) - 60), SECRET, algorithm="HS256")
    assert await _reason(verifier, expired) == "expired"
    wrong_aud = jose_jwt.encode(_claims(aud="someone-else"), SECRET, algorithm="HS256")
    assert await _reason(verifier, wrong_aud) == "invalid_token"
    no_aud = jose_jwt.encode(_claims(), SECRET, algorithm="HS256")
    assert await _reason(verifier, no_aud) == "invalid_token", "aud is required once configured"
    no_exp = jose_jwt.encode({"sub": "ci", "aud": "bastion"}, SECRET, algorithm="HS256")
    assert await _reason(verifier, no_exp) == "invalid_token"
    wrong_alg = jose_jwt.encode(_claims(aud="bastion"), SECRET, algorithm="HS512")
    assert await _reason(verifier, wrong_alg) == "invalid_token", "HS512 is not pinned"
    unsigned = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims(aud="bastion")) + "."
    assert await _reason(verifier, unsigned) == "invalid_token"
    head, body, signature = good.split(".")
    tampered_body = _b64(_claims(aud="bastion", sub="admin"))
    assert await _reason(verifier, f"{head}.{tampered_body}.{signature}") == "invalid_token"
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert await _reason(verifier, f"{head}.{body}.{flipped}") == "invalid_token"
    assert await _reason(verifier, "eyJnot.a.jwt") == "invalid_token"


async def test_not_before_is_checked() -> None:
    verifier = _verifier(jwt_secret=SECRET, jwt_leeway=0)
    early = jose_jwt.encode(_claims(nbf=int(time.time()) + 120), SECRET, algorithm="HS256")
    assert await _reason(verifier, early) == "invalid_token"


async def test_ceiling_caps_what_a_token_claims() -> None:
    verifier = _verifier(jwt_secret=SECRET, jwt_allowed_models="m1,m2", jwt_max_rpm=10, jwt_max_concurrent=2)
    greedy = mint(SECRET, "ci", 60, models=["m1", "m3"], limits={"rpm": 1000})
    principal = await verifier.verify(greedy)
    assert principal.models == frozenset({"m1"}) and principal.rpm == 10 and principal.max_concurrent == 2
    modest = await verifier.verify(mint(SECRET, "ci", 60, limits={"rpm": 3}))
    assert modest.models == frozenset({"m1", "m2"}) and modest.rpm == 3


def _rsa() -> tuple[Any, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public_pem


def _private_pem(private: Any) -> bytes:
    return bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


async def test_rs256_with_a_pem_public_key_and_no_key_confusion(tmp_path: Path) -> None:
    private, public_pem = _rsa()
    (tmp_path / "pub.pem").write_bytes(public_pem)
    verifier = _verifier(jwt_public_key_file=tmp_path / "pub.pem", jwt_algorithms="RS256,HS256")
    token = jose_jwt.encode(_claims(), _private_pem(private).decode(), algorithm="RS256")
    assert (await verifier.verify(token)).name == "ci"
    # the classic confusion: HS256 "signed" with the public key as the HMAC secret
    forged = jose_jwt.encode(_claims(), "irrelevant", algorithm="HS256")
    assert await _reason(verifier, forged) == "invalid_token"


async def test_jwks_file_selects_key_by_kid(tmp_path: Path) -> None:
    private, public_pem = _rsa()
    public_jwk = jwk.construct(public_pem.decode(), "RS256").to_dict()
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**public_jwk, "kid": "k1", "use": "sig"}]}))
    verifier = _verifier(jwt_jwks=str(tmp_path / "jwks.json"), jwt_algorithms="RS256")
    pem = _private_pem(private).decode()
    token = jose_jwt.encode(_claims(), pem, algorithm="RS256", headers={"kid": "k1"})
    assert (await verifier.verify(token)).name == "ci"
    unknown = jose_jwt.encode(_claims(), pem, algorithm="RS256", headers={"kid": "k2"})
    assert await _reason(verifier, unknown) == "invalid_token"


def test_none_is_never_a_setting() -> None:
    with pytest.raises(ValueError, match="none"):
        _settings(jwt_algorithms="none")


async def test_cached_token_still_expires() -> None:
    verifier = _verifier(jwt_secret=SECRET, jwt_leeway=5)
    exp = int(time.time()) + 300
    token = jose_jwt.encode(_claims(exp=exp), SECRET, algorithm="HS256")
    principal = await verifier.verify(token)
    assert await verifier.verify(token) is principal, "served from the cache"
    assert verifier._cache[token][1] <= exp + 5, "a cache entry never outlives the token"
    old = jose_jwt.encode(_claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256")
    verifier._cache[old] = (principal, time.time() - 1)  # a stale entry is checked again, not trusted
    assert await _reason(verifier, old) == "expired"


class _Keys:
    """A key set with two keys of the same name, one restricted, as the store's `by_id` would give them."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = KeyFile()
        self.first, _ = create_key(self.data, name="ci", models=["m1", "m2"], rpm=7, allow_ips=["10.0.0.0/8"])
        self.second, _ = create_key(self.data, name="ci")
        self.path = tmp_path / "keys.json"
        write_key_file(self.path, self.data)
        self.store = KeyStore(self.path)

    def save(self) -> None:
        write_key_file(self.path, self.data)
        self.store.reload(force=True)


async def test_a_token_minted_from_a_key_is_that_key(tmp_path: Path) -> None:
    keys = _Keys(tmp_path)
    verifier = JWTVerifier(jwt_config(_settings(jwt_secret=SECRET, jwt_max_rpm=1)), keys.store.by_id)
    principal = await verifier.verify(mint(SECRET, "ci", 60, key_id=keys.first.id))
    key = keys.first.principal()
    assert (principal.id, principal.name, principal.kind) == (key.id, "ci", "jwt"), "the key's id: its limit buckets"
    assert (principal.rpm, principal.networks, principal.models) == (7, key.networks, frozenset({"m1", "m2"}))
    other = await verifier.verify(mint(SECRET, "ci", 60, key_id=keys.second.id))
    assert other.id == keys.second.id != principal.id, "two keys with one name are two principals"
    narrowed = await verifier.verify(mint(SECRET, "ci", 60, key_id=keys.first.id, models=["m2", "m3"]))
    assert narrowed.models == frozenset({"m2"}), "a token may narrow its key's models, never widen them"


async def test_a_key_bound_token_follows_its_key_at_every_reload(tmp_path: Path) -> None:
    keys = _Keys(tmp_path)
    verifier = JWTVerifier(jwt_config(_settings(jwt_secret=SECRET)), keys.store.by_id)
    token = mint(SECRET, "ci", 600, key_id=keys.first.id)
    assert (await verifier.verify(token)).rpm == 7
    keys.data.find(keys.first.id).rpm = 3
    keys.save()
    assert (await verifier.verify(token)).rpm == 3, "the key's current policy, although the token is cached"
    keys.data.find(keys.first.id).expires = datetime.now(UTC) - timedelta(seconds=1)
    keys.save()
    assert await _reason(verifier, token) == "expired"
    keys.data.find(keys.first.id).expires = None
    revoke_key(keys.data, keys.first.id)
    keys.save()
    assert await _reason(verifier, token) == "revoked"
    keys.data.keys.remove(keys.data.find(keys.first.id))
    keys.save()
    assert await _reason(verifier, token) == "invalid_token", "a deleted key's tokens die with it"


async def test_only_bastions_own_secret_can_bind_a_token_to_a_key(tmp_path: Path) -> None:
    keys = _Keys(tmp_path)
    private, public_pem = _rsa()
    (tmp_path / "pub.pem").write_bytes(public_pem)
    settings = _settings(jwt_secret=SECRET, jwt_public_key_file=tmp_path / "pub.pem", jwt_algorithms="HS256,RS256")
    verifier = JWTVerifier(jwt_config(settings), keys.store.by_id)
    now = int(time.time())
    claims = {"sub": "ci", "iat": now, "exp": now + 60, "bastion_key": keys.second.id}
    outsider = jose_jwt.encode(claims, _private_pem(private).decode(), algorithm="RS256")
    assert await _reason(verifier, outsider) == "invalid_token", "an outside issuer cannot speak for a key"
    unbound = JWTVerifier(jwt_config(_settings(jwt_secret=SECRET)))
    assert await _reason(unbound, mint(SECRET, "ci", 60, key_id=keys.second.id)) == "invalid_token"
