"""JWT attacks beyond test_jwt.py: `none` in every spelling, the real HS/RS key confusion (HMAC keyed
with the public PEM), header tricks (jku/x5u/jwk/crit/kid injection), malformed segments, odd claim
types, and oversized tokens. Every one is refused as `invalid_token`/`expired` (never a crash)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt as jose_jwt

from bastion.app import jwt_config
from bastion.auth.errors import AuthFailure
from bastion.auth.jwt import JWTVerifier
from bastion.config import Settings

SECRET = "unit-test-hmac-secret-0123456789"


def b64(data: bytes | dict[str, Any] | list[Any] | str) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "ci", "iat": now, "exp": now + 300, **kw}


def hs256(header: dict[str, Any] | list[Any] | str, payload: Any, key: bytes = SECRET.encode()) -> str:
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def refused(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(token)
    return info.value.reason


@pytest.fixture
def hs() -> JWTVerifier:
    return JWTVerifier(jwt_config(Settings(_env_file=None, jwt_secret=SECRET, jwt_leeway=0)))  # type: ignore[call-arg]


async def test_a_well_formed_token_passes(hs: JWTVerifier) -> None:
    assert (await hs.verify(hs256({"alg": "HS256", "typ": "JWT"}, claims()))).name == "ci"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", None, "HS256 ", "hs256"])
@pytest.mark.parametrize("signature", ["", "AAAA"])
async def test_alg_none_in_every_spelling(hs: JWTVerifier, alg: str | None, signature: str) -> None:
    token = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims())}.{signature}"
    assert await refused(hs, token) == "invalid_token"


async def test_hmac_keyed_with_the_public_key_is_refused(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    # Both families accepted, and an HMAC secret configured: the attacker signs HS256 with the public PEM.
    verifier = JWTVerifier(
        jwt_config(
            Settings(  # type: ignore[call-arg]
                _env_file=None,
                jwt_public_key_file=tmp_path / "pub.pem",
                jwt_algorithms="RS256,HS256",
                jwt_secret=SECRET,
            )
        )
    )
    for key in (pem, pem.strip(), pem.decode().replace("\n", "").encode()):
        assert await refused(verifier, hs256({"alg": "HS256"}, claims(), key)) == "invalid_token"
    # and with no HMAC secret at all, HS256 has no key: refused before any verification
    rs_only = JWTVerifier(
        jwt_config(Settings(_env_file=None, jwt_public_key_file=tmp_path / "pub.pem", jwt_algorithms="RS256"))  # type: ignore[call-arg]
    )
    assert await refused(rs_only, hs256({"alg": "HS256"}, claims(), pem)) == "invalid_token"
    genuine = jose_jwt.encode(
        claims(),
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        algorithm="RS256",
    )
    assert (await verifier.verify(genuine)).name == "ci"


@pytest.mark.parametrize(
    "extra",
    [
        {"jku": "http://127.0.0.1:9/jwks.json"},
        {"x5u": "http://127.0.0.1:9/cert.pem"},
        {"jwk": {"kty": "oct", "k": b64(b"attacker")}},
        {"kid": "../../../../dev/null"},
        {"kid": "' OR 1=1 --"},
        {"kid": {"nested": True}},
        {"kid": ["a"]},
        {"crit": ["exp"], "exp": 1},
    ],
)
async def test_header_tricks_do_not_choose_the_key(hs: JWTVerifier, extra: dict[str, Any]) -> None:
    attacker = hs256({"alg": "HS256", **extra}, claims(sub="admin"), b"attacker")
    assert await refused(hs, attacker) == "invalid_token"


@pytest.mark.parametrize(
    "token",
    [
        "eyJ",
        "eyJ.",
        "eyJ..",
        "eyJhbGciOiJIUzI1NiJ9..",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "eyJhbGciOiJIUzI1NiJ9.!!!.???",
        f"{b64([1, 2])}.{b64(claims())}.AAAA",
        f"{b64('just a string')}.{b64(claims())}.AAAA",
        f"{b64(b'not json')}.{b64(claims())}.AAAA",
        f"{b64({'alg': ['HS256']})}.{b64(claims())}.AAAA",
        "eyJ" + "A" * 9000 + ".e30.AAAA",
    ],
    # Named, not shown: four of them hold claims() with the time in them, and pytest-xdist refuses a run
    # whose workers collected different test ids (a second ticked between their collections).
    ids=[
        "eyJ",
        "eyJ.",
        "eyJ..",
        "header-only",
        "no-signature",
        "not-base64",
        "header-a-list",
        "header-a-string",
        "header-not-json",
        "alg-a-list",
        "oversized-header",
    ],
)
async def test_malformed_tokens(hs: JWTVerifier, token: str) -> None:
    assert await refused(hs, token) == "invalid_token"


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2, 3],
        "a string",
        claims(exp="tomorrow"),
        claims(exp=None),
        claims(exp=1e308),
        claims(nbf="later"),
        claims(nbf=int(time.time()) + 3600),
        claims(iat="x"),
        claims(sub=None),
        claims(sub=12345),
        claims(sub=""),
        claims(sub={"id": 1}),
        claims(sub="caf\udce9"),  # a lone surrogate: a usage row or metric label of it broke every write
        claims(models="not-a-list"),
        claims(models=[1, None, {}]),
        claims(limits="fast"),
        claims(limits={"rpm": "many", "tpm": -5, "max_concurrent": 1e9}),
    ],
)
async def test_odd_claims_are_refused_or_sanitised(hs: JWTVerifier, payload: Any) -> None:
    token = hs256({"alg": "HS256", "typ": "JWT"}, payload)
    try:
        principal = await hs.verify(token)
    except AuthFailure as failure:
        assert failure.reason in ("invalid_token", "expired")
        return
    # Accepted only with a usable identity and sane policy types.
    assert isinstance(principal.name, str) and principal.name
    principal.name.encode()  # valid Unicode
    assert principal.models is None or all(isinstance(m, str) for m in principal.models)
    for value in (principal.rpm, principal.tpm, principal.max_concurrent):
        assert value is None or (isinstance(value, int) and value > 0)


async def test_expired_by_one_second_with_no_leeway(hs: JWTVerifier) -> None:
    assert await refused(hs, hs256({"alg": "HS256"}, claims(exp=int(time.time()) - 1))) == "expired"
