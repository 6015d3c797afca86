"""`bastion keys create|list|revoke|rotate` and `bastion token mint`.

Secrets go to stdout alone (so `KEY=$(bastion keys create ...)` captures just the
key); everything said to the operator goes to stderr. Secrets never come from argv:
the JWT secret is read from BASTION_JWT_SECRET (or .env).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..budget.policy import Budget, parse_budget, to_mapping, unique
from ..config import ConfigError, Settings, load
from ..jsonscan import valid_unicode
from .ipfilter import parse_network
from .keys import (
    KeyFile,
    KeyRecord,
    KeyStoreError,
    create_key,
    display_prefix,
    read_key_file,
    revoke_key,
    rotate_key,
    write_key_file,
)

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
Handler = Callable[[dict[str, Any]], int]


def duration(text: str) -> timedelta:
    """`90s`, `15m`, `1h`, `30d`, `2w`."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 1h, 30d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def limit(text: str) -> int:
    """A per-principal limit: a whole number, 0 meaning unlimited."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 = unlimited)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (unlimited) or more")
    return value


def _budget(text: str) -> Budget:
    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budgets(given: list[Budget] | None) -> list[Budget] | None:
    try:
        return list(unique(given)) if given else None
    except ValueError as exc:
        raise KeyStoreError(str(exc)) from None


def _network(text: str) -> str:
    """A `--allow-ip` value, checked as the key file's `allow_ips` is (a usage error, not a half-made key)."""
    try:
        parse_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _limit_help(what: str, setting: str) -> str:
    default = Settings.model_fields[setting].get_default()
    return f"{what} (default: the gateway's BASTION_{setting.upper()}, {default}; 0 = unlimited)"


def register(commands: Any) -> None:
    """Add the `keys` and `token` commands to bastion's subparsers."""
    store = argparse.ArgumentParser(add_help=False)
    description = Settings.model_fields["keys_file"].description
    help_text = f"{description} [BASTION_KEYS_FILE]"
    store.add_argument("--keys-file", dest="keys_file", metavar="PATH", default=argparse.SUPPRESS, help=help_text)
    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument("--models", nargs="+", metavar="MODEL", help="models it may use (default: all)")
    limits.add_argument("--rpm", type=limit, help=_limit_help("requests per minute", "rate_limit_rpm"))
    limits.add_argument("--tpm", type=limit, help=_limit_help("tokens per minute", "rate_limit_tpm"))
    limits.add_argument(
        "--max-concurrent", type=limit, help=_limit_help("concurrent requests", "rate_limit_max_concurrent")
    )
    limits.add_argument(
        "--budget",
        action="append",
        type=_budget,
        metavar="PERIOD[:MODEL]=TOKENS",
        help="token budget per calendar day, week or month, e.g. day=2000000 or day:qwen=100000; repeatable; "
        "0 lifts the default (default: BASTION_BUDGET_DAY/WEEK/MONTH)",
    )

    keys = commands.add_parser(
        "keys", help="manage API keys", description="Manage the API key store (only hashes are stored)."
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", parents=[store, limits], help="create a key; prints it once, alone, on stdout"
    )
    create.add_argument("--name", required=True, help="who or what the key is for (shown in logs and metrics)")
    create.add_argument(
        "--allow-ip", action="append", type=_network, metavar="CIDR", help="only from these networks (repeatable)"
    )
    create.add_argument(
        "--priority-class",
        metavar="CLASS",
        help="its priority class when the engine is saturated: one of BASTION_PRIORITY_CLASSES, e.g. interactive "
        "or batch (default: BASTION_DEFAULT_PRIORITY_CLASS; see docs/fairness.md)",
    )
    create.add_argument("--expires", type=duration, metavar="DURATION", help="lifetime, e.g. 30d (default: none)")
    create.add_argument(
        "--allow-duplicate-name",
        action="store_true",
        help="create it even if a live key has this name (they then share one name in logs and metrics)",
    )
    listing = actions.add_parser("list", parents=[store], help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    revoke = actions.add_parser("revoke", parents=[store], help="revoke a key at once")
    revoke.add_argument("id")
    rotate = actions.add_parser(
        "rotate", parents=[store], help="new secret, same policy; prints it once, alone, on stdout"
    )
    rotate.add_argument("id")
    rotate.add_argument(
        "--overlap",
        type=duration,
        default=timedelta(0),
        metavar="DURATION",
        help="how long the old secret keeps working, e.g. 24h (default: 0, it stops at once)",
    )
    keys.set_defaults(handler=_keys)

    token = commands.add_parser("token", help="JWT helpers", description="Mint short-lived HS256 tokens.")
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    mint = token_actions.add_parser(
        "mint",
        parents=[limits],
        help="mint an HS256 token with BASTION_JWT_SECRET; prints it alone on stdout",
        description="Mint an HS256 token signed with BASTION_JWT_SECRET (from the environment or .env).",
    )
    mint.add_argument("--sub", required=True, help="subject: the principal name the token stands for")
    mint.add_argument("--ttl", type=duration, default=timedelta(hours=1), metavar="DURATION", help="default: 1h")
    token.set_defaults(handler=_token)


def _settings(args: dict[str, Any]) -> Settings:
    """The settings as every command loads them (`--keys-file` applied); ConfigError names what is invalid."""
    return load(Settings, {"keys_file": args.pop("keys_file")} if "keys_file" in args else {})


def _say(message: str) -> None:
    print(f"bastion: {message}", file=sys.stderr)


def _keys(args: dict[str, Any]) -> int:
    settings = _settings(args)
    if settings.keys_file is None:
        raise ConfigError(["no key store: pass --keys-file PATH or set BASTION_KEYS_FILE"])
    path = settings.keys_file
    if path.is_dir():
        raise ConfigError([f"{path} is a directory (BASTION_KEYS_FILE, --keys-file): name the key file in it"])
    if args["action"] != "create" and not path.exists():
        raise ConfigError(
            [f"{path} does not exist (BASTION_KEYS_FILE, --keys-file): check the path, or make it with `keys create`"]
        )
    if (wanted := args.get("priority_class")) is not None:
        names = [c.name for c in settings.class_table().classes]
        if wanted not in names:  # the gateway would give it the lowest class, without a word
            raise ConfigError(
                [
                    f"--priority-class {wanted!r} is not a class of BASTION_PRIORITY_CLASSES ({', '.join(names)}); "
                    "name one of them (run `bastion keys` with the gateway's environment if it defines others)"
                ]
            )
    try:
        if args["action"] == "list":
            return _list(_read(path), args["json"])
        with _locked(path):
            data = _read(path)
            secret = _change(data, args, path)
            write_key_file(path, data)
    except KeyStoreError as exc:  # what was asked cannot be done (no such id, a name taken, ...)
        _say(str(exc))
        return 1
    except OSError as exc:
        _say(f"{exc.filename or path}: {exc.strerror} (run `bastion keys` as the user that owns the key store)")
        return 1
    if secret is not None:
        print(secret, flush=True)
    return 0


def _read(path: Path) -> KeyFile:
    """The key file; one that cannot be read or parsed is a configuration mistake, as for `serve`."""
    try:
        return read_key_file(path)
    except KeyStoreError as exc:
        raise ConfigError([f"invalid BASTION_KEYS_FILE: {exc}"]) from None


def _change(data: KeyFile, args: dict[str, Any], path: Path) -> str | None:
    action = args["action"]
    if action == "create":
        now = datetime.now(UTC)
        if not args["allow_duplicate_name"] and any(
            r.name == args["name"] and _status(r, now) == "active" for r in data.keys
        ):
            raise KeyStoreError(
                f"a live key is already named {args['name']!r}: names tell keys apart in logs, metrics and audit "
                "lines; choose another name (or revoke that key first, or pass --allow-duplicate-name)"
            )
        record, key = create_key(
            data,
            name=args["name"],
            models=args["models"],
            allow_ips=args["allow_ip"],
            expires=args["expires"],
            rpm=args["rpm"],
            tpm=args["tpm"],
            max_concurrent=args["max_concurrent"],
            budgets=_budgets(args["budget"]),
            priority_class=args["priority_class"],
        )
        _say(f"created key {record.id} ({record.name}) in {path}; it is printed once, on stdout")
        return key
    if action == "revoke":
        record = revoke_key(data, args["id"])
        _say(f"revoked key {record.id} ({record.name}); a running gateway drops it within seconds")
        return None
    record, key = rotate_key(data, args["id"], args["overlap"])
    until = [s.expires for s in record.secrets if s.expires is not None]
    _say(
        f"rotated key {record.id} ({record.name}); the old secret works until {max(until).isoformat()}"
        if until and args["overlap"]
        else f"rotated key {record.id} ({record.name}); the old secret stops working now"
    )
    return key


def _list(data: KeyFile, as_json: bool) -> int:
    now = datetime.now(UTC)
    rows = [_row(record, now) for record in data.keys]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':<10} {'PREFIX':<16} {'NAME':<20} {'STATUS':<9} {'EXPIRES':<17} {'ROTATED':<17} MODELS")
    for row in rows:
        models = ",".join(row["models"]) if row["models"] is not None else "*"
        rotated = _short(row["rotated"])
        if row["old_secret_until"]:
            rotated += f" (old secret until {_short(row['old_secret_until'])})"
        print(
            f"{row['id']:<10} {row['prefix']:<16} {row['name']:<20} {row['status']:<9} "
            f"{_short(row['expires']):<17} {rotated:<17} {models}"
        )
    return 0


def _short(stamp: str | None) -> str:
    """`2025-03-01T12:00:00+00:00` -> `2025-03-01 12:00Z` (the table; --json keeps full ISO times)."""
    if stamp is None:
        return "-"
    return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")


def _status(record: KeyRecord, now: datetime) -> str:
    if record.revoked:
        return "revoked"
    if record.expires is not None and record.expires <= now:
        return "expired"
    return "active"


def _row(record: KeyRecord, now: datetime) -> dict[str, Any]:
    newest = max(record.secrets, key=lambda s: s.created)
    older = [s.expires for s in record.secrets if s is not newest and s.expires is not None and s.expires > now]
    return {
        "id": record.id,
        "prefix": display_prefix(record.id),
        "name": record.name,
        "status": _status(record, now),
        "created": record.created.isoformat(),
        "expires": record.expires.isoformat() if record.expires else None,
        # when the current secret replaced an older one (`keys rotate`); None if never rotated
        "rotated": newest.created.isoformat() if len(record.secrets) > 1 or newest.created > record.created else None,
        "old_secret_until": max(older).isoformat() if older else None,
        "models": record.models,
        "allow_ips": record.allow_ips,
        "rpm": record.rpm,
        "tpm": record.tpm,
        "max_concurrent": record.max_concurrent,
        "budgets": record.budgets,
        "priority_class": record.priority_class,
        "secrets": len(record.secrets),
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent `bastion keys` writers (read-modify-write) with a lock beside the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _token(args: dict[str, Any]) -> int:
    from .jwt import mint

    settings = _settings({})
    if settings.jwt_secret is None:
        raise ConfigError(["set BASTION_JWT_SECRET (environment or .env) to mint tokens; it is never a flag"])
    if "HS256" not in settings.jwt_algorithms:
        _say("warning: HS256 is not in BASTION_JWT_ALGORITHMS, so the gateway will refuse this token")
    limits = {k: args[k] for k in ("rpm", "tpm", "max_concurrent") if args[k] is not None}
    try:
        budgets = _budgets(args["budget"])
    except KeyStoreError as exc:
        _say(str(exc))
        return 2
    if not valid_unicode(args["sub"]):  # bytes the terminal's locale could not decode (a Latin-1 "é")
        _say("--sub must be valid UTF-8 text (the gateway refuses a token whose subject is not)")
        return 2
    token = mint(
        settings.jwt_secret.get_secret_value(),
        args["sub"],
        args["ttl"].total_seconds(),
        models=args["models"],
        limits=limits,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        models_claim=settings.jwt_models_claim,
        limits_claim=settings.jwt_limits_claim,
        budgets=to_mapping(budgets) if budgets else None,
        budgets_claim=settings.jwt_budgets_claim,
    )
    print(token, flush=True)
    return 0
