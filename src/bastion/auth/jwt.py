"""JWT verification with python-jose, on the gateway's terms rather than the token's.

The accepted algorithms are pinned in settings; the token's `alg` header only
selects among them, and `none` is never one. HS* tokens are checked against the
HMAC secret only and RS/ES/PS tokens against public keys only, so a public key
can never be misused as an HMAC secret. `exp` and `sub` are required; `aud`/`iss`
when configured. Claims map onto a Principal that never exceeds the configured
ceiling (models intersected, limits capped).

A token minted from an API key (POST /v1/auth/token) names that key in `KEY_CLAIM`
and *is* that key: the same `Principal.id` (so the same limit buckets), the key's
current policy (IP allowlist, limits, expiry; models narrowed by the token's own
claim), looked up in the live key set on every request, so a revoked or deleted key's
tokens stop at the next reload. Only HMAC-signed tokens may carry the claim: the
secret is bastion's own, while an outside issuer (RS/ES/PS, JWKS) must not be able
to speak for a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from jose import jwt as jose_jwt
from jose.exceptions import ExpiredSignatureError, JOSEError

from ..budget.policy import Budgets, capped, from_mapping
from ..fairness.classes import capped as capped_class
from ..jsonscan import valid_unicode
from .errors import AuthFailure
from .identity import Principal
from .ipfilter import IPNetwork, parse_networks
from .keys import KeyEntry

log = logging.getLogger("bastion.auth")
JWKS_MIN_REFRESH = 30.0  # seconds: unknown `kid`s cannot make us hammer the JWKS endpoint
# Verified tokens are remembered (same bytes, same verdict) so a client reusing its token
# costs a dict lookup, not a signature check; entries end with the token or after CACHE_TTL.
CACHE_TTL = 60.0
CACHE_SIZE = 4096
_LIMITS = ("rpm", "tpm", "max_concurrent")
ALLOW_IPS_CLAIM = "allow_ips"  # networks the token may be used from
KEY_CLAIM = "bastion_key"  # the id of the API key a token was minted from (the token is that key's principal)

KeyLookup = Callable[[str], KeyEntry | None]


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


@dataclass(frozen=True, slots=True)
class JWTConfig:
    """What the verifier needs from the settings (BASTION_JWT_*), as plain values."""

    algorithms: frozenset[str] = frozenset({"HS256"})
    secret: str | None = None
    public_key_file: Path | None = None
    jwks: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 30.0
    models_claim: str = "models"
    limits_claim: str = "limits"
    # Ceilings for tokens from an issuer (None = none). A key-bound token has its key's limits instead.
    allowed_models: frozenset[str] | None = None
    max_rpm: int | None = None
    max_tpm: int | None = None
    max_concurrent: int | None = None
    budgets_claim: str = "budgets"
    max_budgets: Budgets = ()  # ceilings on an issuer's budget claims
    priority_class_claim: str = "priority_class"
    class_orders: Mapping[str, int] = field(default_factory=dict)  # the configured classes (name -> order)
    max_priority_class: str | None = None  # the highest class an issuer's token may claim


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """A verified token minted from an API key: which key, the models it was narrowed to, until when."""

    key_id: str
    models: frozenset[str] | None
    expires: float


class JWTVerifier:
    def __init__(self, config: JWTConfig, keys: KeyLookup | None = None) -> None:
        self._algorithms = config.algorithms
        self._secret = config.secret
        self._public_key = config.public_key_file.read_text() if config.public_key_file else None
        self._jwks = JWKSet(config.jwks) if config.jwks else None
        self._audience = config.audience
        self._issuer = config.issuer
        self._options = {
            "leeway": config.leeway,
            "require_exp": True,
            "require_sub": True,
            "verify_aud": config.audience is not None,
            "require_aud": config.audience is not None,
            "require_iss": config.issuer is not None,
        }
        self._models_claim = config.models_claim
        self._limits_claim = config.limits_claim
        self._ceiling_models = config.allowed_models
        self._leeway = config.leeway
        self._keys = keys
        # token -> (what it grants, until when the verdict may be reused)
        self._cache: dict[str, tuple[Principal | KeyGrant, float]] = {}
        # A key-bound token's principal, rebuilt only when the key set changed (its entry is a new object).
        self._bound: dict[KeyGrant, tuple[KeyEntry, Principal]] = {}
        self._ceiling_limits = {"rpm": config.max_rpm, "tpm": config.max_tpm, "max_concurrent": config.max_concurrent}
        self._budgets_claim = config.budgets_claim
        self._budget_ceiling = config.max_budgets
        self._class_claim = config.priority_class_claim
        self._class_orders = dict(config.class_orders)
        self._class_ceiling = config.max_priority_class

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
        """The principal a valid token stands for; AuthFailure("invalid_token" | "expired" | "revoked") otherwise."""
        cached = self._cache.get(token)
        if cached is not None and time.time() < cached[1]:
            grant = cached[0]
        else:
            if cached is not None:
                del self._cache[token]
            grant = await self._verify(token)
            if len(self._cache) >= CACHE_SIZE:
                del self._cache[next(iter(self._cache))]  # the oldest entry
            until = min(time.time() + CACHE_TTL, (grant.expires or 0.0) + self._leeway)
            self._cache[token] = (grant, until)
        if isinstance(grant, KeyGrant):
            return self._bind(grant)
        return grant

    def _bind(self, grant: KeyGrant) -> Principal:
        """A key-bound token's principal from the live key set (checked on every request, a dict lookup)."""
        entry = self._keys(grant.key_id) if self._keys is not None else None
        if entry is None:
            raise AuthFailure("invalid_token")  # the key was deleted (or never existed here)
        if entry.revoked:
            raise AuthFailure("revoked")
        if entry.not_after is not None and time.time() >= entry.not_after:
            raise AuthFailure("expired")
        bound = self._bound.get(grant)
        if bound is not None and bound[0] is entry:
            return bound[1]
        key = entry.principal
        models = key.models
        for narrower in (grant.models, self._ceiling_models):
            if narrower is not None:
                models = narrower if models is None else models & narrower
        principal = Principal(
            id=key.id,  # the key's own id: the same limit buckets as the key
            name=key.name,
            kind="jwt",  # a token, so it cannot be exchanged for another one
            models=models,
            networks=key.networks,
            expires=grant.expires if key.expires is None else min(grant.expires, key.expires),
            rpm=key.rpm,
            tpm=key.tpm,
            max_concurrent=key.max_concurrent,
            budgets=key.budgets,
            priority_class=key.priority_class,
        )
        if len(self._bound) >= CACHE_SIZE:
            del self._bound[next(iter(self._bound))]
        self._bound[grant] = (entry, principal)
        return principal

    async def _verify(self, token: str) -> Principal | KeyGrant:
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
        if KEY_CLAIM in claims:
            if not alg.startswith("HS"):
                raise AuthFailure("invalid_token")  # only bastion's own secret speaks for a key
            return self._grant(claims)
        return self._principal(claims)

    def _grant(self, claims: dict[str, Any]) -> KeyGrant:
        key_id = claims.get(KEY_CLAIM)
        exp = claims.get("exp")
        if not isinstance(key_id, str) or not key_id or not isinstance(exp, int | float):
            raise AuthFailure("invalid_token")
        return KeyGrant(key_id, self._models(claims.get(self._models_claim), None), float(exp))

    def _models(self, granted: Any, ceiling: frozenset[str] | None) -> frozenset[str] | None:
        if granted is None:
            return ceiling
        if isinstance(granted, list) and all(isinstance(m, str) for m in granted):
            return frozenset(granted) if ceiling is None else frozenset(granted) & ceiling
        raise AuthFailure("invalid_token")

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
        if not valid_unicode(subject):
            # `"sub": "caf\udce9"` (what `token mint --sub $'caf\xe9'` wrote): as a usage row's principal or a
            # metric label it stopped every usage write and made /metrics answer 500.
            raise AuthFailure("invalid_token")
        models = self._models(claims.get(self._models_claim), self._ceiling_models)
        claimed = claims.get(self._limits_claim) or {}
        if not isinstance(claimed, dict):
            raise AuthFailure("invalid_token")
        networks = _networks(claims.get(ALLOW_IPS_CLAIM))
        rpm, tpm, concurrent = (_cap(claimed.get(name), self._ceiling_limits[name]) for name in _LIMITS)
        budgets = capped(_budgets(claims.get(self._budgets_claim)), self._budget_ceiling)
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
            budgets=budgets,
            priority_class=capped_class(claims.get(self._class_claim), self._class_ceiling, self._class_orders),
        )


def _budgets(claim: Any) -> Budgets:
    """The token's budgets claim, e.g. {"day": 100000, "day:qwen": 5000}; absent = none of its own."""
    if claim is None:
        return ()
    if not isinstance(claim, dict):
        raise AuthFailure("invalid_token")
    try:
        return from_mapping(claim)
    except ValueError:
        raise AuthFailure("invalid_token") from None


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
    budgets: dict[str, int] | None = None,
    budgets_claim: str = "budgets",
    key_id: str | None = None,
    priority_class: str | None = None,
    priority_class_claim: str = "priority_class",
) -> str:
    """A short-lived HS256 token, for `bastion token mint` and the token endpoint (`key_id`: bound to that key)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl)}
    if key_id is not None:
        claims[KEY_CLAIM] = key_id
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
    if budgets:
        claims[budgets_claim] = budgets
    if priority_class:
        claims[priority_class_claim] = priority_class
    token: str = jose_jwt.encode(claims, secret, algorithm="HS256")
    return token
