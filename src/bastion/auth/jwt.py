"""JWT verification with python-jose, on the gateway's terms rather than the token's.

The accepted algorithms are pinned in settings; the token's `alg` header only
selects among them, and `none` is never one. HS* tokens are checked against the
HMAC secret only and RS/ES/PS tokens against public keys only, so a public key
can never be misused as an HMAC secret. `exp` and `sub` are required; `aud`/`iss`
when configured. Claims map onto a Principal that never exceeds the configured
ceiling (models intersected, limits capped).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
from jose import jwt as jose_jwt
from jose.exceptions import ExpiredSignatureError, JOSEError

from ..config import Settings
from .errors import AuthFailure
from .identity import Principal
from .ipfilter import IPNetwork, parse_networks

log = logging.getLogger("bastion.auth")
JWKS_MIN_REFRESH = 30.0  # seconds: unknown `kid`s cannot make us hammer the JWKS endpoint
# Verified tokens are remembered (same bytes, same verdict) so a client reusing its token
# costs a dict lookup, not a signature check; entries end with the token or after CACHE_TTL.
CACHE_TTL = 60.0
CACHE_SIZE = 4096
_LIMITS = ("rpm", "tpm", "max_concurrent")
ALLOW_IPS_CLAIM = "allow_ips"  # networks the token may be used from (keeps a key's allowlist in its tokens)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class JWKSet:
    """Public keys from a JWKS file or URL, cached; refetched (rate-limited) on an unknown kid."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._keys: dict[str | None, dict[str, Any]] = {}
        self._fetched = -JWKS_MIN_REFRESH
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> dict[str, Any] | None:
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched >= JWKS_MIN_REFRESH:
                self._fetched = time.monotonic()
                try:
                    self._keys = _index_jwks(await self._load())
                except (OSError, ValueError, httpx.HTTPError) as exc:
                    log.error("JWKS %s not loaded (keeping %d cached keys): %s", self._source, len(self._keys), exc)
        return self._keys.get(kid)

    async def _load(self) -> Any:
        if self._source.startswith(("http://", "https://")):
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                response = await client.get(self._source)
                response.raise_for_status()
                return response.json()
        return json.loads(await asyncio.to_thread(Path(self._source).read_text))


def _index_jwks(document: Any) -> dict[str | None, dict[str, Any]]:
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("not a JWKS document (no `keys` list)")
    index: dict[str | None, dict[str, Any]] = {k.get("kid"): k for k in keys if isinstance(k, dict)}
    if len(index) == 1:
        index[None] = next(iter(index.values()))  # a single key also serves tokens without kid
    return index


class JWTVerifier:
    def __init__(self, settings: Settings) -> None:
        self._algorithms = frozenset(settings.jwt_algorithms)
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._public_key = settings.jwt_public_key_file.read_text() if settings.jwt_public_key_file else None
        self._jwks = JWKSet(settings.jwt_jwks) if settings.jwt_jwks else None
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._options = {
            "leeway": settings.jwt_leeway,
            "require_exp": True,
            "require_sub": True,
            "verify_aud": settings.jwt_audience is not None,
            "require_aud": settings.jwt_audience is not None,
            "require_iss": settings.jwt_issuer is not None,
        }
        self._models_claim = settings.jwt_models_claim
        self._limits_claim = settings.jwt_limits_claim
        self._ceiling_models = frozenset(settings.jwt_allowed_models) if settings.jwt_allowed_models else None
        self._leeway = settings.jwt_leeway
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._ceiling_limits = {
            "rpm": settings.jwt_max_rpm,
            "tpm": settings.jwt_max_tpm,
            "max_concurrent": settings.jwt_max_concurrent,
        }

        self._warn_unusable()

    def _warn_unusable(self) -> None:
        """Say at start-up when a pinned algorithm has no key to check it with."""
        if not self.configured:
            return
        hmac = {a for a in self._algorithms if a.startswith("HS")}
        public = self._algorithms - hmac
        if hmac and self._secret is None:
            log.warning("JWT algorithms %s need BASTION_JWT_SECRET, which is not set", sorted(hmac))
        if public and self._public_key is None and self._jwks is None:
            log.warning("JWT algorithms %s need BASTION_JWT_PUBLIC_KEY_FILE or BASTION_JWT_JWKS", sorted(public))

    @property
    def configured(self) -> bool:
        return bool(self._secret or self._public_key or self._jwks)

    async def verify(self, token: str) -> Principal:
        """The principal a valid token stands for; AuthFailure("invalid_token" | "expired") otherwise."""
        cached = self._cache.get(token)
        if cached is not None:
            if time.time() < cached[1]:
                return cached[0]
            del self._cache[token]
        principal = await self._verify(token)
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # the oldest entry
        until = min(time.time() + CACHE_TTL, (principal.expires or 0.0) + self._leeway)
        self._cache[token] = (principal, until)
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            header = jose_jwt.get_unverified_header(token)
        except JOSEError:
            raise AuthFailure("invalid_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:  # also refuses "none"
            raise AuthFailure("invalid_token")
        key = await self._key_for(alg, header.get("kid"))
        if key is None:
            raise AuthFailure("invalid_token")
        try:
            claims = jose_jwt.decode(
                token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer, options=self._options
            )
        except ExpiredSignatureError:
            raise AuthFailure("expired") from None
        except (JOSEError, TypeError, ValueError, OverflowError):
            # python-jose checks claim types loosely: `"exp": null` in a correctly signed token raises
            # TypeError from int(None), which would otherwise escape as a 500.
            raise AuthFailure("invalid_token") from None
        return self._principal(claims)

    async def _key_for(self, alg: str, kid: Any) -> str | dict[str, Any] | None:
        if alg.startswith("HS"):
            return self._secret
        if self._jwks is not None:
            found = await self._jwks.key(kid if isinstance(kid, str) else None)
            if found is not None:
                return found
        return self._public_key

    def _principal(self, claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        exp = claims.get("exp")
        if not isinstance(subject, str) or not subject or not isinstance(exp, int | float):
            raise AuthFailure("invalid_token")
        granted = claims.get(self._models_claim)
        if granted is None:
            models = self._ceiling_models
        elif isinstance(granted, list) and all(isinstance(m, str) for m in granted):
            models = frozenset(granted) if self._ceiling_models is None else frozenset(granted) & self._ceiling_models
        else:
            raise AuthFailure("invalid_token")
        claimed = claims.get(self._limits_claim) or {}
        if not isinstance(claimed, dict):
            raise AuthFailure("invalid_token")
        networks = _networks(claims.get(ALLOW_IPS_CLAIM))
        rpm, tpm, concurrent = (_cap(claimed.get(name), self._ceiling_limits[name]) for name in _LIMITS)
        return Principal(
            id=f"jwt:{subject}",
            name=subject,
            kind="jwt",
            models=models,
            networks=networks,
            expires=float(exp),
            rpm=rpm,
            tpm=tpm,
            max_concurrent=concurrent,
        )


def _networks(claim: Any) -> tuple[IPNetwork, ...]:
    if claim is None:
        return ()
    if not isinstance(claim, list) or not all(isinstance(n, str) for n in claim):
        raise AuthFailure("invalid_token")
    try:
        return parse_networks(claim)
    except ValueError:
        raise AuthFailure("invalid_token") from None


def _cap(claimed: Any, ceiling: int | None) -> int | None:
    """The tighter of the token's limit and the configured ceiling (None = the gateway default, 0 = unlimited)."""
    value = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed >= 0 else None
    if value is None:
        return ceiling
    return value if ceiling is None else min(value or ceiling, ceiling)


def mint(
    secret: str,
    subject: str,
    ttl: float,
    *,
    models: list[str] | None = None,
    limits: dict[str, int] | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    models_claim: str = "models",
    limits_claim: str = "limits",
    allow_ips: list[str] | None = None,
) -> str:
    """A short-lived HS256 token, for `bastion token mint` and the token endpoint."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    if models is not None:
        claims[models_claim] = models
    if limits:
        claims[limits_claim] = limits
    if allow_ips:
        claims[ALLOW_IPS_CLAIM] = allow_ips
    token: str = jose_jwt.encode(claims, secret, algorithm="HS256")
    return token
