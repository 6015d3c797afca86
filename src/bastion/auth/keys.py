"""The API key store: a JSON file of hashed keys, its parsing, atomic writes and hot reload.

Keys look like `bst-<id>_<secret>`, with 32 random bytes of secret
(`secrets.token_urlsafe(32)`). Only `sha256(key)` is stored. A fast hash is the
right tool here: the secret is uniformly random with 256 bits of entropy, so
there is nothing for a slow password hash (bcrypt, argon2) to protect against
and a lot of per-request CPU it would cost. Lookup is one dict access by hash:
no loop comparing candidate keys, so response time does not depend on how much
of a guess matched.

The file is the operator's: readable JSON, written atomically (temp file in the
same directory, then `os.replace`) with mode 0600, and only read by the gateway,
so it can be mounted read-only. Unknown fields are an error, not ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..budget.policy import Budget, from_mapping, to_mapping
from ..jsonscan import valid_unicode
from .identity import Principal
from .ipfilter import parse_network, parse_networks

log = logging.getLogger("bastion.auth")

KEY_PREFIX = "bst-"
_KEY_ID = re.compile(r"[a-z0-9][a-z0-9-]{2,39}")
Limit = Annotated[int, Field(ge=0)]  # per-key limit; 0 = unlimited, absent = the gateway default


_NOT_UNICODE = "not valid Unicode (a lone surrogate, such as the JSON escape \\ud800): write it as UTF-8 text"


class KeyStoreError(ValueError):
    """The key file cannot be used; the message says where and why (never a secret)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecretHash(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the whole key")
    created: AwareDatetime
    # Set on the old secret when a key is rotated: it keeps working until then.
    expires: AwareDatetime | None = None


class KeyRecord(_Strict):
    id: str = Field(pattern=_KEY_ID.pattern)
    name: str = Field(min_length=1, max_length=200)
    created: AwareDatetime
    expires: AwareDatetime | None = None
    revoked: bool = False
    models: list[str] | None = None
    allow_ips: list[str] = Field(default_factory=list)
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_concurrent: Limit | None = None
    # Token budgets, e.g. {"day": 2000000, "day:qwen": 100000}; 0 lifts a default (bastion.budget.policy).
    budgets: dict[str, int] | None = None
    # Its priority class (BASTION_PRIORITY_CLASSES); None = BASTION_DEFAULT_PRIORITY_CLASS.
    priority_class: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    secrets: list[SecretHash] = Field(min_length=1)

    @field_validator("name", "models", "budgets", mode="before")
    @classmethod
    def _unicode(cls, value: object) -> object:
        # JSON's "\ud800" decodes to a lone surrogate, which pydantic's `str` takes: as the `principal` label
        # (the name) or a budget gauge's `model` label (`day:MODEL`), it made every scrape of /metrics a 500.
        texts = [value] if isinstance(value, str) else list(value) if isinstance(value, list | dict) else []
        if not all(valid_unicode(text) for text in texts if isinstance(text, str)):
            raise ValueError(_NOT_UNICODE)
        return value

    @field_validator("allow_ips")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            parse_network(value)
        return values

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, values: dict[str, int] | None) -> dict[str, int] | None:
        return None if values is None else to_mapping(from_mapping(values))

    def principal(self) -> Principal:
        return Principal(
            id=self.id,
            name=self.name,
            kind="key",
            models=frozenset(self.models) if self.models is not None else None,
            networks=parse_networks(self.allow_ips),
            expires=self.expires.timestamp() if self.expires else None,
            rpm=self.rpm,
            tpm=self.tpm,
            max_concurrent=self.max_concurrent,
            budgets=from_mapping(self.budgets) if self.budgets else (),
            priority_class=self.priority_class,
        )


class KeyFile(_Strict):
    version: Literal[1] = 1
    keys: list[KeyRecord] = Field(default_factory=list)

    def find(self, key_id: str) -> KeyRecord:
        for record in self.keys:
            if record.id == key_id:
                return record
        raise KeyStoreError(f"no key with id {key_id!r}")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """What a hash lookup finds: the principal, and whether this secret may be used now."""

    principal: Principal
    not_after: float | None = None
    revoked: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def display_prefix(key_id: str) -> str:
    """What `keys list` shows instead of the secret."""
    return f"{KEY_PREFIX}{key_id}_…"


# --- reading and writing the file ---------------------------------------------------


def parse_key_file(text: str, source: str = "keys file") -> KeyFile:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyStoreError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    try:
        parsed = KeyFile.model_validate(raw)
    except ValidationError as exc:
        raise KeyStoreError(f"{source}: {_describe(exc, raw)}") from None
    seen: set[str] = set()
    for record in parsed.keys:
        if record.id in seen:
            raise KeyStoreError(f"{source}: duplicate key id {record.id!r}")
        seen.add(record.id)
    return parsed


def _describe(error: ValidationError, raw: object = None) -> str:
    """One line for the operator: where in the file (with the key's id, to find it), and what is wrong."""
    problems = []
    for item in error.errors(include_input=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        where = _with_key_id(where, item["loc"], raw)
        message = "unknown field (not allowed)" if item["type"] == "extra_forbidden" else item["msg"]
        message = message.removeprefix("Value error, ")
        problems.append(f"{where or 'top level'}: {message}")
    return "; ".join(problems)


def _with_key_id(where: str, loc: tuple[int | str, ...], raw: object) -> str:
    """`keys[3].name` as `keys[3] (id 1a2b3c4d).name`: the id is what `bastion keys list` shows."""
    if len(loc) < 2 or loc[0] != "keys" or not isinstance(loc[1], int) or not isinstance(raw, dict):
        return where
    records = raw.get("keys")
    record = records[loc[1]] if isinstance(records, list) and 0 <= loc[1] < len(records) else None
    key_id = record.get("id") if isinstance(record, dict) else None
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        return where
    head = f"keys[{loc[1]}]"
    return f"{head} (id {key_id}){where[len(head) :]}"


def read_key_file(path: Path) -> KeyFile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return KeyFile()
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_key_file(text, str(path))


def write_key_file(path: Path, data: KeyFile) -> None:
    """Atomic replace with mode 0600: a reader sees the old file or the new one, never half."""
    text = data.model_dump_json(indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def loose_permissions(mode: int) -> bool:
    return bool(stat.S_IMODE(mode) & 0o077)


# --- the key set the gateway checks against ---------------------------------------------


@dataclass(frozen=True, slots=True)
class KeySet:
    """One version of the key set: secrets by hash (what a request presents) and keys by id.

    `by_id` serves tokens minted from a key (they name the key, not a secret): such a token
    is that key's principal, with the key's current policy, and dies with it.
    """

    by_hash: dict[str, KeyEntry]
    by_id: dict[str, KeyEntry]


def index(data: KeyFile, bootstrap: Iterable[str] = ()) -> KeySet:
    """Hash -> entry for every secret in the file and every bootstrap key, and id -> entry for every key."""
    by_hash: dict[str, KeyEntry] = {}
    by_id: dict[str, KeyEntry] = {}
    for number, key in enumerate(bootstrap, 1):
        entry = KeyEntry(Principal(id=f"bootstrap-{number}", name=f"bootstrap-{number}", kind="key"))
        by_hash[hash_key(key)] = by_id[entry.principal.id] = entry
    for record in data.keys:
        principal = record.principal()
        for secret in record.secrets:
            ends = [t.timestamp() for t in (record.expires, secret.expires) if t is not None]
            by_hash[secret.sha256] = KeyEntry(principal, min(ends) if ends else None, record.revoked)
        # The key itself (whatever its secrets): its own expiry only, so rotating a secret keeps its tokens.
        by_id[record.id] = KeyEntry(principal, principal.expires, record.revoked)
    return KeySet(by_hash, by_id)


class KeyStore:
    """The live key set: swapped whole on reload, so a request sees one consistent version."""

    def __init__(self, path: Path | None, bootstrap: Iterable[str] = ()) -> None:
        self.path = path
        self._bootstrap = tuple(bootstrap)
        self._set = index(KeyFile(), self._bootstrap)
        self._stamp: tuple[int, int, int] | None = None
        self.reload(initial=True)

    def lookup(self, key: str) -> KeyEntry | None:
        return self._set.by_hash.get(hash_key(key))

    def by_id(self, key_id: str) -> KeyEntry | None:
        """The key with this id in the current set (revoked ones included, marked), or None."""
        return self._set.by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._set.by_hash)

    def reload(self, *, force: bool = False, initial: bool = False) -> bool:
        """Re-read the file if it changed. On error: raise at start-up, else keep the last good set."""
        if self.path is None:
            return False
        try:
            info = self.path.stat()
        except FileNotFoundError:
            if initial:
                log.warning("keys file %s does not exist yet: only other credentials work until it does", self.path)
            elif self._stamp is not None:
                log.warning("keys file %s disappeared: keeping the last good set", self.path)
                self._stamp = None
            return False
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        try:
            data = read_key_file(self.path)
        except KeyStoreError as exc:
            if initial:
                raise
            log.error("keys file not reloaded, keeping the last good set: %s", exc)
            return False
        if loose_permissions(info.st_mode):
            log.warning(
                "keys file %s is readable by group or others (mode %o): run chmod 600 on it",
                self.path,
                stat.S_IMODE(info.st_mode),
            )
        self._set = index(data, self._bootstrap)
        log.info("keys file %s loaded: %d keys", self.path, len(data.keys))
        return True

    @contextlib.asynccontextmanager
    async def watching(self, interval: float = 1.0) -> AsyncIterator[KeyStore]:
        """Lifespan service: poll the file's mtime every `interval` seconds; SIGHUP reloads at once."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        hooked = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, wake.set)
            hooked = True
        task = loop.create_task(self._poll(wake, interval))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if hooked:
                loop.remove_signal_handler(signal.SIGHUP)

    async def _poll(self, wake: asyncio.Event, interval: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
            forced = wake.is_set()
            wake.clear()
            try:
                self.reload(force=forced)
            except Exception:
                log.exception("keys file reload failed; keeping the last good set")


# --- operations behind `bastion keys` ---------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def create_key(
    data: KeyFile,
    *,
    name: str,
    models: list[str] | None = None,
    allow_ips: list[str] | None = None,
    expires: timedelta | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrent: int | None = None,
    budgets: list[Budget] | None = None,
    priority_class: str | None = None,
) -> tuple[KeyRecord, str]:
    """Add a key; returns its record and the secret key (shown once, never stored)."""
    taken = {r.id for r in data.keys}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    key = new_key(key_id)
    now = _now()
    try:
        record = KeyRecord(
            id=key_id,
            name=name,
            created=now,
            expires=now + expires if expires else None,
            models=models,
            allow_ips=allow_ips or [],
            rpm=rpm,
            tpm=tpm,
            max_concurrent=max_concurrent,
            budgets=to_mapping(budgets) if budgets else None,
            priority_class=priority_class,
            secrets=[SecretHash(sha256=hash_key(key), created=now)],
        )
    except ValidationError as exc:
        raise KeyStoreError(_describe(exc)) from None
    data.keys.append(record)
    return record, key


def revoke_key(data: KeyFile, key_id: str) -> KeyRecord:
    record = data.find(key_id)
    record.revoked = True
    return record


def rotate_key(data: KeyFile, key_id: str, overlap: timedelta = timedelta(0)) -> tuple[KeyRecord, str]:
    """A new secret for the same key and policy; older secrets stop working after `overlap`."""
    record = data.find(key_id)
    if record.revoked:
        raise KeyStoreError(f"key {key_id!r} is revoked; create a new one instead")
    now = _now()
    cutoff = now + overlap
    kept = []
    for secret in record.secrets:
        if secret.expires is not None and secret.expires <= now:
            continue  # already dead: drop it
        if secret.expires is None or secret.expires > cutoff:
            secret.expires = cutoff
        kept.append(secret)
    key = new_key(key_id)
    record.secrets = [*kept, SecretHash(sha256=hash_key(key), created=now)]
    return record, key
