"""`bastion engines restart [MODEL | MODEL/INDEX]`: ask the running gateway for a rolling restart.

It talks to the gateway's admin route (`POST /admin/engines/restart`) with
BASTION_ADMIN_TOKEN from the environment (never a flag: argv is visible to every
user), and prints one line per replica restarted. The call returns when the restart
is over: minutes with vLLM.
"""

from __future__ import annotations

import sys
from typing import Any

import httpx

from ..config import Settings, load

_CONNECT_TIMEOUT = 5.0


def register(commands: Any) -> None:
    """Add `engines restart` to bastion's subparsers."""
    engines = commands.add_parser(
        "engines",
        help="manage the running gateway's engines",
        description="Manage the engines of a running gateway, through its admin route (BASTION_ADMIN_TOKEN).",
    )
    actions = engines.add_subparsers(dest="action", required=True, metavar="ACTION")
    restart = actions.add_parser(
        "restart",
        help="restart MODEL's replicas (or MODEL/INDEX, one; default: every engine) one at a time, without "
        "downtime where it has 2+",
        description="Rolling restart through the running gateway: start a new child, wait until ready, move new "
        "requests to it, drain and stop the old one. Needs BASTION_ADMIN_TOKEN in the environment.",
    )
    restart.add_argument(
        "model",
        nargs="?",
        metavar="MODEL[/INDEX]",
        help="the model (engine name) to restart, or one replica of it (chat/1); default: every engine",
    )
    restart.add_argument("--url", help="the gateway's base URL (default: http://BASTION_HOST:BASTION_PORT)")
    restart.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for the restart to finish (default: 3600)"
    )
    restart.set_defaults(handler=_restart)


def _say(message: str) -> None:
    print(f"bastion: {message}", file=sys.stderr)


def _restart(args: dict[str, Any]) -> int:
    settings = load(Settings)  # ConfigError: main says it
    if settings.admin_token is None:
        _say("BASTION_ADMIN_TOKEN is not set: set it (the same value as the gateway's) in the environment")
        return 2
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = (args.get("url") or f"http://{host}:{settings.port}").rstrip("/")
    params = {"model": args["model"]} if args.get("model") else {}
    headers = {"authorization": "Bearer " + settings.admin_token.get_secret_value()}
    timeout = httpx.Timeout(args["timeout"], connect=_CONNECT_TIMEOUT)
    try:
        response = httpx.post(url + "/admin/engines/restart", params=params, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        _say(f"cannot reach the gateway at {url} ({type(exc).__name__}: {exc}); pass --url")
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        message = body.get("error", {}).get("message", response.text[:200]) if isinstance(body, dict) else ""
        _say(f"the gateway refused ({response.status_code}): {message}")
        return 1
    failed = False
    for report in body.get("restarted", []):
        print(f"{report['engine']}: {report['outcome']} ({report['detail']})")
        if report["outcome"] == "restarted_with_downtime":
            print(f"{report['engine']}: note: one replica only, so this restart had downtime")
        failed = failed or report["outcome"] == "failed"
    if not body.get("restarted"):
        print("nothing to restart (no engine bastion runs matches)")
    return 1 if failed else 0
