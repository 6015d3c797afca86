"""What `serve` builds before it binds its port or spawns a child, shared with `check-config`.

Both commands call `build`, so `check-config` refuses exactly the settings `serve` refuses:
values are checked when the settings load (`config.load`); here come the checks that need the
filesystem or several settings at once (the key store, the JWT public key or JWKS file, the audit
log, the token endpoint's secret, the child's command and interpreter), then `create_app`
itself, which opens everything and starts nothing (the child is spawned in the lifespan).
Each problem is one line that names its setting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .app import Gateway, create_app, engine_problem
from .auth.keys import KeyStoreError, read_key_file
from .budget.sqlite import UsageDBBusy, UsageDBError, check_free
from .config import ConfigError, Settings, problem
from .engine.vllm import NO_VLLM_HINT, vllm_unavailable
from .listen import bind
from .logs import RedactingFilter, configure_logging


def build(settings: Settings, *, claim: bool = True) -> Gateway:
    """The gateway `serve` would run, or `ConfigError` with every problem found. `claim=False` (check-config)
    leaves out what only the running process takes, as the port: the SQLite usage file's lock, which the live
    gateway holds while its next version is checked beside it (docs/operations.md, "Upgrading")."""
    found = problems(settings, claim=claim)
    if found:
        raise ConfigError(found)
    try:
        return create_app(settings)
    except (ValueError, OSError) as exc:  # anything the checks above did not foresee: still one line
        raise ConfigError([f"cannot start: {exc}"]) from None


def logging_for(settings: Settings) -> RedactingFilter:
    """bastion's logging, with every secret the settings hold registered for redaction."""
    redactor = configure_logging(settings.log_level, settings.log_format)
    for key in settings.bootstrap_keys():
        redactor.add_secret(key)
    for secret in (settings.upstream_api_key, settings.metrics_token, settings.jwt_secret, settings.redis_url):
        if secret is not None:
            redactor.add_secret(secret.get_secret_value())
    return redactor


def problems(settings: Settings, *, claim: bool = True) -> list[str]:
    found = [
        *_child(settings),
        *_keys_file(settings.keys_file),
        *_public_key(settings.jwt_public_key_file),
        *_jwks(settings.jwt_jwks),
        *_audit_log(settings.audit_log),
        *_budget_db(settings.budget_db),
    ]
    if not found:
        found += _usage_db_free(settings, claim=claim)
    found += _workers(settings)
    if settings.token_endpoint and (settings.jwt_secret is None or "HS256" not in settings.jwt_algorithms):
        found.append(
            problem(Settings, "token_endpoint", "needs BASTION_JWT_SECRET and HS256 in BASTION_JWT_ALGORITHMS")
        )
    return found


def _workers(settings: Settings) -> list[str]:
    """Several worker processes: everything counted must be shared, or refused in one line (docs/operations.md)."""
    if settings.workers <= 1:
        return []
    found = []
    n = settings.workers
    if settings.redis_url is None:
        found.append(
            f"BASTION_WORKERS={n} needs BASTION_REDIS_URL: rate limits, concurrency slots and token budgets must be "
            f"counted once for all {n} worker processes, not once per worker; set BASTION_REDIS_URL=redis://"
            "127.0.0.1:6379/0 (one Redis every worker shares) or BASTION_WORKERS=1"
        )
    if settings.fairness:
        found.append(
            f"BASTION_WORKERS={n} cannot run with BASTION_FAIRNESS: the fair queue's engine capacity is counted in "
            "one process; set BASTION_WORKERS=1 for priority classes and fair queueing, or BASTION_FAIRNESS=false"
        )
    return found


def _child(settings: Settings) -> list[str]:
    """The supervised child's interpreter, command line and loopback address (nothing of it in external mode)."""
    if settings.engines or settings.engines_file is not None:  # each engine's entry and command (app.engine_problem)
        engines_problem = engine_problem(settings)
        return [engines_problem] if engines_problem is not None else []
    if settings.upstream_url is not None:
        return []
    command_problem = engine_problem(settings)  # placeholders, {port}, the program on PATH (engine/command.py)
    if command_problem is not None:
        return [command_problem]
    try:
        for sock in bind(
            settings.upstream_host, 0, host_setting="BASTION_UPSTREAM_HOST", port_setting="BASTION_UPSTREAM_PORT"
        ):
            sock.close()
    except ConfigError as exc:
        return exc.lines
    own_vllm = not (settings.upstream_command or settings.vllm_python)
    reason = vllm_unavailable() if own_vllm else None
    if reason:
        return NO_VLLM_HINT.format(reason=reason).removeprefix("bastion: ").splitlines()
    return []


def _keys_file(path: Path | None) -> list[str]:
    """A key file that exists must parse (serve refuses it at start-up); a missing one is only a warning."""
    if path is None or not os.path.lexists(path):
        return []
    try:
        read_key_file(path)
    except KeyStoreError as exc:
        return [problem(Settings, "keys_file", str(exc))]
    return []


def _public_key(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [problem(Settings, "jwt_public_key_file", f"cannot read {path}: {exc.strerror}")]
    try:
        load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            x509.load_pem_x509_certificate(data)
        except ValueError:
            return [problem(Settings, "jwt_public_key_file", f"{path} holds no PEM public key or certificate")]
    return []


def _jwks(source: str | None) -> list[str]:
    """A JWKS file must be there now (a URL is fetched when the first token comes)."""
    if source is None or source.startswith(("http://", "https://")):
        return []
    try:
        document = json.loads(Path(source).read_text())
    except OSError as exc:
        return [problem(Settings, "jwt_jwks", f"cannot read {source}: {exc.strerror}")]
    except ValueError:
        return [problem(Settings, "jwt_jwks", f"{source} is not JSON")]
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return [problem(Settings, "jwt_jwks", f"{source} is not a JWKS document (no `keys` list)")]
    return []


def _budget_db(path: Path | None) -> list[str]:
    """An explicit usage file must be a file in an existing, writable directory (the default falls back to memory)."""
    if path is None:
        return []
    if path.is_dir():
        return [problem(Settings, "budget_db", f"{path} is a directory; name a file in it")]
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        return [problem(Settings, "budget_db", f"cannot create {path}: its directory is missing or not writable")]
    return []


def _usage_db_free(settings: Settings, *, claim: bool = True) -> list[str]:
    """The SQLite usage file belongs to one gateway process: a second one is refused in one line."""
    db = _usage_db(settings)
    if db is None:
        return []
    try:
        check_free(db, lock=claim)
    except UsageDBError as exc:
        return [problem(Settings, "budget_db", str(exc))]
    return []


def usage_db_busy(settings: Settings) -> str | None:
    """Why a `serve` beside the running gateway would be refused (its SQLite usage file is held), or None."""
    db = _usage_db(settings)
    if db is None:
        return None
    try:
        check_free(db)
    except UsageDBBusy as exc:
        return str(exc)
    except UsageDBError:
        return None
    return None


def _usage_db(settings: Settings) -> Path | None:
    options = settings.budget_options()
    if options.redis_url is not None or options.db is None or not options.db.parent.is_dir():
        return None
    return options.db


def _audit_log(destination: str) -> list[str]:
    """A file destination must be writable (it is opened for appending, created if missing)."""
    if destination.lower() in ("stdout", "off"):
        return []
    path = Path(destination)
    if path.is_dir():
        return [problem(Settings, "audit_log", f"{path} is a directory; name a file in it")]
    if path.exists():
        ok = os.access(path, os.W_OK)
        why = f"{path} is not writable by this user"
    else:
        ok = path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)
        why = f"cannot create {path}: " + (
            "its directory is not writable by this user" if path.parent.is_dir() else "its directory does not exist"
        )
    return [] if ok else [problem(Settings, "audit_log", why)]
