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
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..budget.policy import Budget, parse_budget, to_mapping, unique
from ..config import Settings, describe_validation_error
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
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


def register(commands: Any) -> None:
    """Add the `keys` and `token` commands to bastion's subparsers."""
    store = argparse.ArgumentParser(add_help=False)
    description = Settings.model_fields["keys_file"].description
    help_text = f"{description} [BASTION_KEYS_FILE]"
    store.add_argument("--keys-file", dest="keys_file", metavar="PATH", default=argparse.SUPPRESS, help=help_text)
    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument("--models", nargs="+", metavar="MODEL", help="models it may use (default: all)")
    limits.add_argument("--rpm", type=_positive, help="requests per minute (default: unlimited)")
    limits.add_argument("--tpm", type=_positive, help="tokens per minute (default: unlimited)")
    limits.add_argument("--max-concurrent", type=_positive, help="concurrent requests (default: unlimited)")
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
    create.add_argument("--allow-ip", action="append", metavar="CIDR", help="only from these networks (repeatable)")
    create.add_argument("--expires", type=duration, metavar="DURATION", help="lifetime, e.g. 30d (default: none)")
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


def _settings(args: dict[str, Any]) -> Settings | None:
    """The settings (with `--keys-file` applied), or None after saying what is invalid."""
    overrides = {"keys_file": args.pop("keys_file")} if "keys_file" in args else {}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        _say(describe_validation_error(exc))
        return None


def _say(message: str) -> None:
    print(f"bastion: {message}", file=sys.stderr)


def _keys(args: dict[str, Any]) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    if settings.keys_file is None:
        _say("no key store: pass --keys-file PATH or set BASTION_KEYS_FILE")
        return 2
    path = settings.keys_file
    try:
        if args["action"] == "list":
            return _list(read_key_file(path), args["json"])
        with _locked(path):
            data = read_key_file(path)
            secret = _change(data, args, path)
            write_key_file(path, data)
    except (KeyStoreError, OSError) as exc:
        _say(str(exc))
        return 1
    if secret is not None:
        print(secret, flush=True)
    return 0


def _change(data: KeyFile, args: dict[str, Any], path: Path) -> str | None:
    action = args["action"]
    if action == "create":
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
    rows = [_row(record) for record in data.keys]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':<10} {'PREFIX':<16} {'NAME':<20} {'STATUS':<8} {'EXPIRES':<26} MODELS")
    for row in rows:
        models = ",".join(row["models"]) if row["models"] is not None else "*"
        print(
            f"{row['id']:<10} {row['prefix']:<16} {row['name']:<20} {row['status']:<8} "
            f"{row['expires'] or '-':<26} {models}"
        )
    return 0


def _row(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "prefix": display_prefix(record.id),
        "name": record.name,
        "status": "revoked" if record.revoked else "active",
        "created": record.created.isoformat(),
        "expires": record.expires.isoformat() if record.expires else None,
        "models": record.models,
        "allow_ips": record.allow_ips,
        "rpm": record.rpm,
        "tpm": record.tpm,
        "max_concurrent": record.max_concurrent,
        "budgets": record.budgets,
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
    if settings is None:
        return 2
    if settings.jwt_secret is None:
        _say("set BASTION_JWT_SECRET (environment or .env) to mint tokens; it is never a flag")
        return 2
    if "HS256" not in settings.jwt_algorithms:
        _say("warning: HS256 is not in BASTION_JWT_ALGORITHMS, so the gateway will refuse this token")
    limits = {k: args[k] for k in ("rpm", "tpm", "max_concurrent") if args[k] is not None}
    try:
        budgets = _budgets(args["budget"])
    except KeyStoreError as exc:
        _say(str(exc))
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
