"""`bastion serve | simulate | check-config` (and `keys`, `token`, `usage` from their packages).

Every flag is a setting: a flag given on the command line wins over its
`BASTION_*` variable, which wins over `.env` and the default. Secrets are never
flags (argv is visible to every user of the machine); they come from the
environment or `.env`. Every command loads its settings with `config.load`, and
`main` turns every `ConfigError` into its lines and exit status 2: an operator's
mistake never shows a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic_settings import BaseSettings

from . import __version__
from .auth import cli as auth_cli
from .budget import cli as budget_cli
from .config import ConfigError, Settings, config_reference, env_example, load, unknown_variables, variables
from .engine import cli as engine_cli
from .simulator.settings import SimulatorSettings
from .simulator.settings import cli_flags as simulator_flags

log = logging.getLogger("bastion")


def _flag(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings], name: str, **kw: Any) -> None:
    """Add `--name` for a settings field; its help text is the field's description plus its variable."""
    field = settings_cls.model_fields[name]
    prefix = settings_cls.model_config.get("env_prefix", "")
    default = field.get_default(call_default_factory=True)
    help_text = f"{field.description} [{prefix}{name.upper()}, default: {default}]"
    parser.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=help_text, **kw)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion",
        description="Authenticating, rate-limiting OpenAI-compatible gateway for a self-hosted vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway", description="Run the gateway.")
    _flag(serve, Settings, "host")
    _flag(serve, Settings, "port", type=int)
    _flag(serve, Settings, "workers", type=int, metavar="N")
    _flag(serve, Settings, "upstream_url", metavar="URL")
    _flag(serve, Settings, "upstream_command", metavar="CMD")
    _flag(serve, Settings, "model")
    _flag(serve, Settings, "served_model_name", metavar="NAME")
    _flag(serve, Settings, "max_model_len", type=int, metavar="N")
    _flag(serve, Settings, "gpu_memory_utilization", type=float, metavar="FRACTION")
    _flag(serve, Settings, "tensor_parallel_size", type=int, metavar="N")
    _flag(serve, Settings, "vllm_extra_args", metavar="ARGS")
    _flag(serve, Settings, "startup_timeout", type=float, metavar="SECONDS")
    _flag(serve, Settings, "keys_file", metavar="PATH")
    _flag(serve, Settings, "log_level")
    _flag(serve, Settings, "log_format")

    simulate = commands.add_parser(
        "simulate",
        help="run a fake vLLM server (tests, benchmarks, no-GPU demo)",
        description="Run an OpenAI/vLLM-compatible fake model server. Its API key, if any, "
        "comes from VLLM_API_KEY as for vLLM.",
    )
    for name, kw in simulator_flags():
        _flag(simulate, SimulatorSettings, name, **kw)

    auth_cli.register(commands)  # keys create|list|revoke|rotate, token mint
    budget_cli.register(commands)  # usage
    engine_cli.register(commands)  # engines restart

    check = commands.add_parser(
        "check-config",
        help="validate the settings and print them (secrets hidden)",
        description="Validate settings from the environment and .env, print them, exit 0 if valid.",
    )
    check.add_argument(
        "--env-example", action="store_true", help="print a commented .env template of every setting instead"
    )
    check.add_argument(
        "--markdown", action="store_true", help="print the configuration reference (docs/configuration.md) instead"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    known = variables(Settings) | variables(SimulatorSettings)
    for warning in unknown_variables(known, "BASTION_", os.environ):
        print(f"bastion: {warning}", file=sys.stderr)
    try:
        return _run(command, args)
    except ConfigError as exc:  # an operator's mistake: one line per problem, never a traceback
        for line in exc.lines:
            print(line if line.startswith(" ") else f"bastion: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: `serve` and `simulate` have shut down gracefully by now (uvicorn raises the signal again once
        # done), a CLI call was left; the shell's status for SIGINT, without a traceback.
        return 130


def _run(command: str, args: dict[str, Any]) -> int:
    if (handler := args.pop("handler", None)) is not None:
        return int(handler(args))
    if command == "simulate":
        return _simulate(load(SimulatorSettings, args))
    if args.pop("env_example", False):
        print(env_example(Settings), end="")
        return 0
    if args.pop("markdown", False):
        print(config_reference(Settings), end="")
        return 0
    settings = load(Settings, args)
    if command == "check-config":
        return _check(settings)
    return _serve(settings)


def _check(settings: Settings) -> int:
    """Build everything `serve` builds (key store, JWT keys, audit log, child command), bind and spawn nothing."""
    from .preflight import build, logging_for, usage_db_busy

    logging_for(settings)
    build(settings, claim=False)  # beside a live gateway, as when checking an upgrade: its lock is not a mistake
    for name, value in settings.model_dump().items():
        print(f"{name} = {_shown(name, value)}")
    if (busy := usage_db_busy(settings)) is not None:
        print(f"bastion: note: {busy}", file=sys.stderr)
    print("bastion: configuration OK", file=sys.stderr)
    return 0


_HIDDEN = "**********"  # as pydantic shows a SecretStr
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def _shown(name: str, value: Any) -> Any:
    """A setting as check-config prints it: an engine entry's `api_key`, and environment values whose name looks
    like a credential (HF_TOKEN=...), hidden as the SecretStr settings are."""
    if name == "engines" and isinstance(value, list):
        return [_entry_shown(item) if isinstance(item, dict) else item for item in value]
    if name == "upstream_env" and isinstance(value, dict):
        return _env_shown(value)
    return value


def _entry_shown(item: dict[str, Any]) -> dict[str, Any]:
    shown = dict(item)
    if shown.get("api_key") is not None:
        shown["api_key"] = _HIDDEN
    if isinstance(shown.get("env"), dict):
        shown["env"] = _env_shown(shown["env"])
    return shown


def _env_shown(env: dict[str, Any]) -> dict[str, Any]:
    return {k: _HIDDEN if _SECRET_NAME.search(str(k)) else v for k, v in env.items()}


def _serve(settings: Settings) -> int:
    # Imported by the commands that run a server: `keys`, `usage` and `check-config` start faster without them.
    import prometheus_client

    from .listen import Server, bind, tune_collector, urls
    from .preflight import build, logging_for
    from .server import server_config

    logging_for(settings)
    # One process, one setting: `*_created` series would double every counter's series count in Prometheus.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    if settings.workers > 1:
        from .workers.master import serve_workers

        return serve_workers(settings)
    app = build(settings)
    # Bound before the lifespan spawns the child: a busy port is one line, and no model starts for nothing.
    sockets = bind(settings.host, settings.port, host_setting="BASTION_HOST", port_setting="BASTION_PORT")

    def started() -> None:
        log.info("listening on %s", urls(sockets))
        tune_collector()

    server = Server(server_config(app, settings), started)
    server.run(sockets=sockets)
    return 0


def _simulate(settings: SimulatorSettings) -> int:
    import uvicorn

    from .listen import Server, bind, urls
    from .simulator.app import Simulator

    sockets = bind(
        settings.host, settings.port, host_setting="BASTION_SIMULATE_HOST", port_setting="BASTION_SIMULATE_PORT"
    )
    if settings.startup_delay:
        _pretend_to_load(settings.startup_delay)
    config = uvicorn.Config(
        Simulator(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    address = urls(sockets)

    def serving() -> None:
        print(f"bastion simulate: serving {settings.model} on {address}", file=sys.stderr, flush=True)

    Server(config, serving).run(sockets=sockets)
    return 0


def _pretend_to_load(seconds: float) -> None:
    """Stay unreachable for a while, printing loading lines as vLLM does."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        print(f"bastion simulate: loading model weights... {left:.1f}s left", file=sys.stderr, flush=True)
        time.sleep(min(1.0, left))
