"""Every setting of the gateway, validated once at start-up.

Settings come from (highest first) command-line flags, `BASTION_*` environment
variables, a `.env` file, then the defaults below. Secrets are `SecretStr` so a
stray `repr()` or log line never shows them.

`load` is the one way every command builds settings: each invalid value becomes a
line of `ConfigError` naming its variable and a valid example. Every value is
checked here (list and object values are parsed by our own validators, never
decoded by pydantic-settings, whose errors are tracebacks); checks that need the
filesystem or several settings at once live in `preflight`.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shlex
import textwrap
from collections.abc import Collection, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from .budget.calendar import zone
from .budget.options import BudgetOptions
from .budget.policy import Budget, Period, parse_budget, unique
from .engine.command import CommandError, check_template
from .engine.engines import load_engines_json, parse_engines
from .fairness.classes import DEFAULT_CLASSES, ClassTable, parse_classes
from .routes import DEFAULT_ROUTES, parse_routes

S = TypeVar("S", bound=BaseSettings)


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _host(value: str) -> str:
    """An IP address (v4 or v6, without brackets) or a host name: what a socket can bind."""
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError("not an IP address or host name") from None
    return value


def _list(value: Any) -> Any:
    """A list setting from the environment: a JSON list or comma-separated values."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON list ({exc.msg}, column {exc.colno}); or write a,b,c") from None
        if not isinstance(parsed, list):
            raise ValueError("not a JSON list")
        return parsed
    return [part.strip() for part in text.split(",") if part.strip()]


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _environment(value: Any) -> Any:
    """Extra child environment: a JSON object, or NAME=value pairs separated by spaces (shell quoting)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON object ({exc.msg}, column {exc.colno})") from None
        if isinstance(parsed, dict):  # {"CUDA_VISIBLE_DEVICES": 0} means "0"
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in parsed.items()}
        return parsed
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot be split like a shell line ({exc})") from None
    pairs: dict[str, str] = {}
    for number, word in enumerate(words, 1):
        name, sep, rest = word.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):  # never echo the word: it may hold a token
            raise ValueError(f"item {number} is not NAME=value (expected NAME=value pairs or a JSON object)")
        pairs[name] = rest
    return pairs


def _networks(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return [v.strip() for v in values]


def _default_routes() -> list[str]:
    return list(DEFAULT_ROUTES)


def _routes(values: list[str]) -> list[str]:
    parse_routes(values)
    return values


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _methods(values: list[str]) -> list[str]:
    upper = [v.strip().upper() for v in values]
    unknown = [v for v in upper if v not in _HTTP_METHODS]
    if unknown:
        raise ValueError(f"unknown HTTP method(s) {', '.join(unknown)} (known: {', '.join(sorted(_HTTP_METHODS))})")
    if not upper:
        raise ValueError("must name at least one method")
    return upper


def _names(values: list[str]) -> list[str]:
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError("every entry must be a non-blank name")
    return [v.strip() for v in values]


def _command_template(value: str | None) -> str | None:
    """Placeholders, braces and quotes, checked by the engine's own rules (engine/command.py)."""
    if value is None:
        return None
    if not value.strip():
        raise ValueError("must not be blank")
    try:
        check_template(value)
    except CommandError as exc:
        raise ValueError(exc.reason) from None
    return value


def _engines_json(value: Any) -> Any:
    """BASTION_ENGINES: a JSON list of engine objects (engine/engines.py checks each entry)."""
    if isinstance(value, str):
        return load_engines_json(value) if value.strip() else []
    return value


def _engines(value: list[Any]) -> list[Any]:
    parse_engines(value, os.environ)
    return value


def fairness_problem(fairness: bool, entries: list[Any], entry: str = "entry") -> str | None:
    """What an engine list (BASTION_ENGINES, or the file) says that BASTION_FAIRNESS contradicts, in one line:
    a capacity only the fair queue reads, with it off; an explicit --scheduling-policy other than priority, with
    it on (vLLM would then refuse every request below the top class). `entry` names an item in that line."""
    for item in entries:
        if not isinstance(item, dict):
            continue
        if not fairness and item.get("capacity") is not None:
            return (
                f"{entry} {item.get('model')!r} sets a capacity, which only the fair queue reads, and "
                'BASTION_FAIRNESS is off: set BASTION_FAIRNESS=true, or drop "capacity"'
            )
        if fairness and item.get("vllm_model") and isinstance(item.get("extra_args"), str):
            problem = _policy_problem(f"{entry} {item.get('model')!r} extra_args", item["extra_args"])
            if problem is not None:
                return problem
    return None


def _policy_problem(where: str, text: str) -> str | None:
    words = shlex.split(text)
    for i, word in enumerate(words):
        name, _, inline = word.partition("=")
        if name == "--scheduling-policy":
            policy = inline or (words[i + 1] if i + 1 < len(words) else "")
            if policy != "priority":
                return (
                    f"{where} sets --scheduling-policy {policy}, and vLLM then refuses every request whose class "
                    "has a nonzero priority (all but the highest); drop it (bastion adds --scheduling-policy "
                    "priority) or set BASTION_FAIRNESS=false"
                )
    return None


def _session_header(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError("must be an HTTP header name, e.g. x-session-id")
    return value


def _shell_words(value: str) -> str:
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot be split like a shell line ({exc})") from None
    return value


def _redis_url(value: SecretStr | None) -> SecretStr | None:
    """A URL bastion's Redis client takes (redis://, rediss://, redis+unix://; checked by its own parser)."""
    if value is None:
        return None
    from .redisio.url import parse_url  # the client's own parser: what passes here is what it connects to

    try:
        parse_url(value.get_secret_value())
    except ValueError as exc:
        # Its messages name the part that is wrong, never the password.
        raise ValueError(str(exc)) from None
    return value


_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def _header_safe(value: SecretStr | None) -> SecretStr | None:
    """A credential sent in an Authorization header: printable ASCII, no spaces."""
    if value is not None and not _HEADER_SAFE.fullmatch(value.get_secret_value()):
        raise ValueError("must be printable ASCII without spaces (it is sent in an HTTP header)")
    return value


MIN_HMAC_SECRET = 32  # bytes: RFC 7518 asks for a key at least as long as the hash (HS256: 256 bits)


def _hmac_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and len(value.get_secret_value().encode()) < MIN_HMAC_SECRET:
        raise ValueError(f"an HMAC secret needs at least {MIN_HMAC_SECRET} bytes; a shorter one can be guessed offline")
    return value


def _jwks(value: str | None) -> str | None:
    if value is None:
        return None
    value = _not_blank(value)
    if "://" in value and not value.startswith(("http://", "https://")):
        raise ValueError("must be a file path or an http(s):// URL")
    return value


Host = Annotated[str, AfterValidator(_host)]
Text = Annotated[str, AfterValidator(_not_blank)]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)]
StrList = Annotated[list[str], NoDecode, BeforeValidator(_list), AfterValidator(_names)]
NetworkList = Annotated[list[str], NoDecode, BeforeValidator(_list), AfterValidator(_networks)]
_JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
MIN_BOOTSTRAP_KEY = 16


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class Settings(BaseSettings):
    """Gateway settings. Field docs double as the configuration reference."""

    model_config = SettingsConfigDict(
        env_prefix="BASTION_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        # An empty value means "unset" (the default), so every line of .env.example can be uncommented.
        env_ignore_empty=True,
        # Errors never repeat the value given: it may be a secret.
        hide_input_in_errors=True,
    )

    # --- listening -----------------------------------------------------------------
    host: Host = Field("127.0.0.1", description="Address the gateway listens on.", examples=["0.0.0.0"])
    port: Port = Field(8000, description="Port the gateway listens on.")
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Gateway worker processes sharing the port, each on its own event loop and CPU core; the "
        "`bastion serve` process supervises them and the engines. Above 1 needs BASTION_REDIS_URL (limits and "
        "budgets shared exactly) and BASTION_FAIRNESS off. One carries ~26-52k streamed tokens/s (docs/operations.md).",
    )

    # --- upstream --------------------------------------------------------------------
    upstream_url: AnyHttpUrl | None = Field(
        None,
        description="External mode: base URL of an OpenAI-compatible server bastion does not own "
        "(e.g. http://127.0.0.1:8001). Nothing is spawned.",
        examples=["http://127.0.0.1:8001"],
    )
    upstream_api_key: Annotated[SecretStr | None, AfterValidator(_header_safe)] = Field(
        None,
        description="Bearer key bastion sends to an external upstream (never the client's).",
        examples=["<the upstream's API key>"],
    )
    upstream_connect_timeout: Seconds = Field(5.0, description="Seconds to open a connection upstream.")
    upstream_read_timeout: Seconds = Field(
        600.0,
        description="Longest silence (seconds) allowed between two upstream reads; long, because a "
        "large generation can take minutes before its first byte.",
    )
    upstream_write_timeout: Seconds = Field(60.0, description="Seconds to send a request body upstream.")
    upstream_pool_timeout: Seconds = Field(
        30.0, description="Seconds to wait for a free upstream connection before answering 503."
    )
    upstream_max_connections: int = Field(1024, ge=1, description="Upper bound on open connections to the upstream.")
    upstream_keepalive_expiry: Seconds = Field(
        4.0,
        description="Seconds an idle upstream connection is kept for reuse; keep it below the upstream's own "
        "keep-alive timeout (vLLM's: 5 s), as a request the upstream closed unanswered is never resent.",
    )
    upstream_max_keepalive: int = Field(
        100, ge=0, description="Idle upstream connections kept for reuse at most; extra ones are closed when freed."
    )

    # --- supervised upstream (used when upstream_url is not set) --------------------
    upstream_command: Annotated[str | None, AfterValidator(_command_template)] = Field(
        None,
        description="Run this command as the supervised upstream instead of vLLM; {host}, {port} and {python} "
        "are filled in. E.g. '{python} -m bastion simulate --host {host} --port {port}' for the no-GPU demo.",
        examples=["'{python} -m bastion simulate --host {host} --port {port}'"],
    )
    upstream_host: Host = Field("127.0.0.1", description="Address the supervised child binds (keep it loopback).")
    upstream_port: Port = Field(0, description="Port the supervised child binds; 0 picks a free one.")
    upstream_env: Annotated[dict[str, str], NoDecode, BeforeValidator(_environment)] = Field(
        default_factory=dict,
        description="Extra environment for the supervised child: NAME=value pairs separated by spaces "
        "(CUDA_VISIBLE_DEVICES=0,1 HF_HOME=/models) or a JSON object.",
        examples=["CUDA_VISIBLE_DEVICES=0"],
    )
    model: Text = Field("Qwen/Qwen2.5-7B-Instruct", description="Model vLLM serves: a Hugging Face id or a local path.")
    served_model_name: Text | None = Field(
        None,
        description="Name clients use for the model (vLLM's --served-model-name); default: the model.",
        examples=["qwen2.5-7b-instruct"],
    )
    dtype: Annotated[Literal["auto", "half", "float16", "bfloat16", "float", "float32"], BeforeValidator(_lower)] = (
        Field("auto", description="vLLM --dtype: auto, half, float16, bfloat16, float, float32.")
    )
    max_model_len: int | None = Field(
        None, ge=1, description="vLLM --max-model-len (context length cap).", examples=[8192]
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM --tensor-parallel-size (GPUs per model).")
    vllm_extra_args: Annotated[str, AfterValidator(_shell_words)] = Field(
        "",
        description="More vLLM arguments, shell-quoted, e.g. '--load-format dummy --enable-prefix-caching'.",
        examples=["'--enable-prefix-caching'"],
    )
    vllm_python: str = Field(
        "",
        description="Python interpreter that has vLLM installed; default: the one running bastion.",
        examples=["/opt/vllm/bin/python"],
    )
    startup_timeout: Seconds = Field(
        1800.0, description="Seconds the child may take to answer /health (loading a model takes minutes)."
    )
    health_interval: Seconds = Field(5.0, description="Seconds between health probes of a running child.")
    health_timeout: Seconds = Field(5.0, description="Seconds one health probe may take.")
    health_failures: int = Field(3, ge=1, description="Failed probes in a row after which a hung child is restarted.")
    restart_backoff: Seconds = Field(1.0, description="First restart delay in seconds; doubles per crash, with jitter.")
    restart_backoff_max: Seconds = Field(60.0, description="Longest restart delay in seconds.")
    max_restarts: int = Field(
        5, ge=1, description="Crashes within restart_window after which bastion stops restarting."
    )
    restart_window: Seconds = Field(600.0, description="Window (seconds) in which crashes are counted.")
    stop_timeout: Seconds = Field(30.0, description="Seconds the child gets to exit after SIGTERM before SIGKILL.")
    shutdown_grace: Seconds = Field(
        30.0, description="On SIGTERM, seconds in-flight requests get to finish before the child is stopped."
    )

    # --- several engines (docs/engines.md) -------------------------------------------
    engines: Annotated[list[Any], NoDecode, BeforeValidator(_engines_json), AfterValidator(_engines)] = Field(
        default_factory=list,
        description="Several engines behind one gateway, a JSON list: each entry has `model` (the name clients use), "
        "one of `url` (external; `api_key_env` names the variable holding its key), `vllm_model` (+ `extra_args`, "
        "`gpus`, `max_model_len`, `gpu_memory_utilization`, `python`, `env`) or `command` (with {host}/{port}/"
        "{python}), and `replicas` (default 1). Unset: one engine from the BASTION_UPSTREAM_*/vLLM settings.",
        examples=['\'[{"model": "chat", "command": "{python} -m bastion simulate --port {port}", "replicas": 2}]\''],
    )
    engines_file: Path | None = Field(
        None,
        description="A JSON file holding the BASTION_ENGINES list (instead of the variable).",
        examples=["/etc/bastion/engines.json"],
    )
    drain_timeout: Seconds = Field(
        60.0, description="Rolling restart: seconds an old replica gets to finish its requests before it is stopped."
    )
    session_header: Annotated[str, AfterValidator(_session_header)] = Field(
        "x-session-id", description="Request header whose value keeps a client on one replica (session affinity)."
    )
    prefix_affinity_bytes: int = Field(
        0,
        ge=0,
        le=1 << 20,
        description="Send requests whose bodies start with the same N bytes to the same replica while it is not "
        "25 % busier than the least loaded one (warm prefix caches); 0 turns it off.",
    )
    admin_token: Annotated[SecretStr | None, AfterValidator(_header_safe)] = Field(
        None,
        description="Bearer token for the admin routes (`bastion engines restart`). Unset: the admin routes refuse "
        "everything. Peers must also be in BASTION_ADMIN_ALLOW (default: loopback only).",
        examples=["$(openssl rand -hex 24)"],
    )
    admin_allow: NetworkList = Field(
        default_factory=list,
        description="CIDRs of peers allowed to call the admin routes (TCP peer, never X-Forwarded-For); "
        "default: loopback only.",
        examples=["10.0.0.0/8"],
    )

    # --- request handling ----------------------------------------------------------
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest accepted request body in bytes (413 above)."
    )
    client_header_timeout: Seconds = Field(
        10.0,
        description="Seconds a client may take to send a request's headers (from connecting, or from the end of "
        "its previous response); slower connections are closed (slowloris). An idle keep-alive connection is kept "
        "this long: keep it above your clients' idle expiry (httpx and the openai SDK: 5 s).",
    )
    client_body_timeout: Seconds = Field(
        60.0,
        description="Seconds a client may take to send a whole request body; slower uploads get 408 (a body is "
        "read before the rate limits, so an upload holds no concurrency slot).",
    )
    client_write_timeout: Seconds = Field(
        60.0,
        description="Seconds a client may leave the gateway's writes unread (its connection's send buffer full) "
        "before the connection is closed: the upstream request is stopped and its concurrency slot freed.",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request head (request line and headers) in bytes (431/400 above)."
    )
    routes: StrList = Field(
        default_factory=_default_routes,
        description="/v1 routes forwarded upstream, comma-separated or JSON list; any other path is 404 "
        "unknown_route. `default` is the OpenAI inference routes vLLM serves; add others from the route table in "
        "docs/security.md, e.g. `default,/v1/responses/{id}`. Model-restricted keys never reach unscoped routes.",
    )
    passthrough_methods: Annotated[list[str], NoDecode, BeforeValidator(_list), AfterValidator(_methods)] = Field(
        default_factory=lambda: ["GET", "POST"],
        description="HTTP methods forwarded on /v1/*, comma-separated; anything else gets 405.",
        examples=["GET,POST,DELETE"],
    )

    # --- authentication -------------------------------------------------------------
    keys_file: Path | None = Field(
        None,
        description="API key store (JSON, managed with `bastion keys`). Reloaded when it changes and on "
        "SIGHUP. Unset = no key file.",
        examples=["/var/lib/bastion/keys.json"],
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Quick-start bootstrap keys: comma-separated or JSON list of plain keys (16+ characters "
        "each), accepted with no policy. Prefer a keys file for anything long-lived.",
        examples=["$(openssl rand -hex 24)"],
    )
    keys_reload_interval: Seconds = Field(1.0, description="Seconds between checks of the key file's mtime.")
    allow_ips: NetworkList = Field(
        default_factory=list,
        description="Global IP allowlist: CIDRs or addresses, IPv4/IPv6, comma-separated. Empty = all.",
        examples=["10.0.0.0/8,192.168.1.5"],
    )
    deny_ips: NetworkList = Field(
        default_factory=list,
        description="Global IP denylist (wins over the allowlist), comma-separated CIDRs.",
        examples=["203.0.113.0/24"],
    )
    trusted_proxies: NetworkList = Field(
        default_factory=list,
        description="Proxies whose X-Forwarded-For is believed (comma-separated CIDRs). A request from "
        "anywhere else is judged by its TCP peer address.",
        examples=["127.0.0.1"],
    )
    jwt_secret: Annotated[SecretStr | None, AfterValidator(_hmac_secret)] = Field(
        None,
        description=f"HMAC secret for HS256/384/512 JWTs (also used by `bastion token mint`); at least "
        f"{MIN_HMAC_SECRET} bytes.",
        examples=["$(openssl rand -base64 48)"],
    )
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key file for RS/ES/PS-signed JWTs.", examples=["/etc/bastion/jwt.pem"]
    )
    jwt_jwks: Annotated[str | None, AfterValidator(_jwks)] = Field(
        None,
        description="JWKS for RS/ES/PS-signed JWTs: a file path or an http(s) URL (cached, refetched on unknown kid).",
        examples=["https://login.example.com/.well-known/jwks.json"],
    )
    jwt_algorithms: StrList = Field(
        default_factory=lambda: ["HS256"],
        description="JWT algorithms accepted, comma-separated (the token header never chooses; `none` is always "
        "refused).",
        examples=["HS256,RS256"],
    )
    jwt_audience: Text | None = Field(None, description="Required JWT `aud`, when set.", examples=["bastion"])
    jwt_issuer: Text | None = Field(
        None, description="Required JWT `iss`, when set.", examples=["https://login.example.com"]
    )
    jwt_leeway: float = Field(30.0, ge=0, le=600, description="Clock skew allowed on exp/nbf/iat, seconds.")
    jwt_models_claim: Text = Field("models", description="JWT claim holding the list of models the token may use.")
    jwt_limits_claim: Text = Field(
        "limits", description="JWT claim holding an object with rpm, tpm and max_concurrent for the token."
    )
    jwt_allowed_models: StrList = Field(
        default_factory=list,
        description="Ceiling for every JWT: models a token can ever be granted (comma-separated). Empty = all.",
        examples=["qwen2.5-7b-instruct"],
    )
    jwt_max_rpm: int | None = Field(
        None, ge=1, description="Ceiling on a JWT's requests/minute (default: none).", examples=[600]
    )
    jwt_max_tpm: int | None = Field(
        None, ge=1, description="Ceiling on a JWT's tokens/minute (default: none).", examples=[200000]
    )
    jwt_max_concurrent: int | None = Field(
        None, ge=1, description="Ceiling on a JWT's concurrent requests (default: none).", examples=[32]
    )
    token_endpoint: bool = Field(
        False,
        description="Enable POST /v1/auth/token: a valid API key is exchanged for a short-lived HS256 JWT with "
        "the same (or a narrower) policy. Needs BASTION_JWT_SECRET.",
    )
    token_endpoint_ttl: Seconds = Field(
        900.0, description="Longest lifetime, in seconds, of a token from POST /v1/auth/token (also its default)."
    )

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, values: list[str]) -> list[str]:
        return _routes(values)

    @field_validator("jwt_algorithms")
    @classmethod
    def _check_algorithms(cls, values: list[str]) -> list[str]:
        upper = [v.upper() for v in values]
        unknown = [v for v in upper if v not in _JWT_ALGORITHMS]
        if unknown:
            raise ValueError(f"unsupported JWT algorithm(s) {unknown} (`none` is never allowed)")
        return upper

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            keys = _list(value.get_secret_value())
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError("must be a comma-separated or JSON list of strings")
            if any(len(k) < MIN_BOOTSTRAP_KEY for k in keys):
                raise ValueError(f"every key must have at least {MIN_BOOTSTRAP_KEY} characters")
        return value

    def bootstrap_keys(self) -> list[str]:
        if self.api_keys is None:
            return []
        keys: list[str] = _list(self.api_keys.get_secret_value())
        return keys

    # --- rate limits (per principal; anonymous traffic per client IP) ---------------
    rate_limit_rpm: int = Field(
        600, ge=0, description="Default requests per minute per principal (rolling window); 0 = unlimited."
    )
    rate_limit_tpm: int = Field(
        200_000,
        ge=0,
        description="Default tokens (prompt + completion) per minute per principal: reserved at admission "
        "(prompt estimate + max_tokens), settled to real usage; 0 = unlimited.",
    )
    rate_limit_max_concurrent: int = Field(
        32, ge=0, description="Default in-flight requests per principal; 0 = unlimited."
    )
    default_max_tokens: int = Field(
        4096,
        ge=1,
        description="Completion tokens reserved against tokens/min for a request that sets no max_tokens "
        "(max_completion_tokens, max_output_tokens), times its n/best_of; also what a response that ends "
        "without usage is charged for its completion. Reservations are settled to real usage afterwards.",
    )
    enforce_max_tokens: bool = Field(
        False,
        description="Write BASTION_DEFAULT_MAX_TOKENS into a chat, completion or responses request that sets no "
        "completion cap (max_tokens, max_completion_tokens, max_output_tokens), so the engine stops where the "
        "reservation did. Off: the engine's own default applies (vLLM: the rest of the context window), and one "
        "such request may overrun tokens/min and budgets by the difference until it is settled.",
    )
    responses_background: bool = Field(
        False,
        description="Forward Responses API requests with `background: true` (vLLM answers at once, generates "
        "afterwards, and reports usage only to a later GET /v1/responses/{id}). Each is charged its reservation "
        "(prompt estimate + max_output_tokens) when posted, since the usage never comes back to that request; "
        "needs BASTION_ENFORCE_MAX_TOKENS so the engine cannot generate past it. Still refused (400): one with "
        "previous_response_id, built-in tools, or an input that is not text alone (its prompt is not in its bytes). "
        "Off: refused with a 400.",
    )
    auth_failure_limit: int = Field(
        20, ge=0, description="Failed authentications per minute per client IP before 429s; 0 = unlimited."
    )
    redis_url: Annotated[SecretStr | None, AfterValidator(_redis_url)] = Field(
        None,
        description="Share rate-limit counts through Redis (redis://[:password@]host:port/db, rediss://...). "
        "Unset: in-process memory, correct only for one gateway process. Replicas must share one Redis.",
        examples=["redis://:password@10.0.0.5:6379/0"],
    )
    redis_fail_mode: Annotated[Literal["open", "closed"], BeforeValidator(_lower)] = Field(
        "open",
        description="When Redis is unreachable: open = serve without limits (logged, counted), closed = answer "
        "503 with Retry-After.",
    )
    redis_timeout: Seconds = Field(0.5, description="Seconds to connect to Redis or wait for one reply.")
    concurrency_slot_ttl: Seconds = Field(
        60.0,
        description="Redis only: seconds after which a concurrency slot of a crashed gateway expires "
        "(live slots are refreshed every ttl/3).",
    )

    # --- logging -------------------------------------------------------------------
    log_level: LogLevel = Field("info", description="Log level: debug, info, warning, error.")
    log_format: Annotated[LogFormat, BeforeValidator(_lower)] = Field(
        LogFormat.TEXT, description="Log format: text (human) or json."
    )

    # --- observability -------------------------------------------------------------
    metrics_enabled: bool = Field(True, description="Serve /metrics and /metrics/upstream (protected, see below).")
    metrics_token: Annotated[SecretStr | None, AfterValidator(_header_safe)] = Field(
        None,
        description="Bearer token a scraper must send to /metrics and /metrics/upstream. Required for every scrape "
        "that comes through a proxy (X-Forwarded-For, Forwarded or X-Real-IP sent, or the peer a trusted proxy). With "
        "neither a token nor BASTION_METRICS_ALLOW set, only direct loopback peers may scrape, and none at all "
        "when BASTION_TRUSTED_PROXIES is set (a proxy on loopback is not a local scraper).",
        examples=["$(openssl rand -hex 24)"],
    )
    metrics_allow: Annotated[list[IPvAnyNetwork], NoDecode, BeforeValidator(_list)] = Field(
        default_factory=list,
        description="CIDRs of peers allowed to scrape, comma-separated (e.g. 10.0.0.0/8). Matched against the TCP "
        "peer, never X-Forwarded-For; a scrape through a proxy needs the token as well. With a token too, a scrape "
        "needs both.",
        examples=["10.0.0.0/8"],
    )
    metrics_principal_label: bool = Field(
        True, description="Label request and token metrics by principal (key name); turn off for large fleets."
    )
    metrics_models: StrList = Field(
        default_factory=list,
        description="Model names always used as the `model` label, comma-separated. Others become labels once "
        "the upstream has answered them with a 2xx (at most 32), else `other`.",
        examples=["qwen2.5-7b-instruct"],
    )
    audit_log: Text = Field(
        "stdout",
        description="Audit log destination: stdout, off, or a file path (one JSON line per /v1 request).",
        examples=["/var/log/bastion/audit.jsonl"],
    )

    # --- token budgets (bastion.budget; docs/budgets.md) ----------------------------------
    budget_day: int = Field(
        0,
        ge=0,
        description="Default token budget (prompt + completion) per principal per calendar day; 0 = none. "
        "A key's or token's own budgets win, period by period.",
    )
    budget_week: int = Field(0, ge=0, description="Default token budget per principal per ISO week; 0 = none.")
    budget_month: int = Field(0, ge=0, description="Default token budget per principal per month; 0 = none.")
    budget_timezone: str = Field(
        "UTC",
        description="Time zone (IANA name, e.g. Europe/Paris) whose midnights start budget days, weeks "
        "(Mondays) and months.",
    )
    budget_db: Path | None = Field(
        None,
        description="SQLite file of hourly usage roll-ups, loaded at start so budgets survive restarts. "
        "Default: usage.sqlite3 beside BASTION_KEYS_FILE (memory only without one). Not used with "
        "BASTION_REDIS_URL, where budgets and usage live in Redis.",
    )
    usage_retention_days: int = Field(
        400, ge=40, description="Days of hourly usage roll-ups kept (SQLite rows, Redis hashes); older are deleted."
    )
    jwt_budgets_claim: Text = Field(
        "budgets",
        description='JWT claim holding the token\'s budgets, e.g. {"day": 100000, "day:qwen": 5000}.',
    )
    jwt_max_budgets: StrList = Field(
        default_factory=list,
        description="Ceiling on every JWT's budgets, e.g. day=1000000,month=20000000: a larger or missing "
        "claim gets the ceiling. Empty = claims as given, defaults for the rest.",
    )

    @field_validator("budget_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("jwt_max_budgets")
    @classmethod
    def _check_budgets(cls, values: list[str]) -> list[str]:
        unique(parse_budget(value) for value in values)
        return values

    def budget_options(self) -> BudgetOptions:
        """The budget ledger's plain options (the ledger never sees Settings)."""
        defaults = tuple(
            Budget(period, tokens)
            for period, tokens in zip(Period, (self.budget_day, self.budget_week, self.budget_month), strict=True)
            if tokens
        )
        db, default = self.budget_db, False
        if db is None and self.keys_file is not None:
            db, default = self.keys_file.parent / "usage.sqlite3", True
        return BudgetOptions(
            defaults=defaults,
            timezone=self.budget_timezone,
            db=db,
            db_is_default=default,
            redis_url=self.redis_url.get_secret_value() if self.redis_url is not None else None,
            redis_timeout=self.redis_timeout,
            retention_days=self.usage_retention_days,
            fail_open=self.redis_fail_mode == "open",
        )

    # --- fairness: priority classes and the gateway queue (bastion.fairness; docs/fairness.md) ---------
    fairness: bool = Field(
        False,
        description="Priority classes and fair queueing: each forwarded request carries its principal's class "
        "as vLLM's integer `priority` (a supervised vLLM starts with --scheduling-policy priority), and when "
        "the engine is saturated requests wait at the gateway, higher classes first, principals sharing fairly.",
    )
    priority_classes: str = Field(
        DEFAULT_CLASSES,
        description="The classes, a JSON object name -> {order, weight, deadline}: order 0 goes first (and is "
        "the priority vLLM sees), weight is each principal's share within its class, deadline the seconds a "
        "request may wait at the gateway before a 429.",
    )
    default_priority_class: Text = Field(
        "standard", description="The class of a key or token that names none (bootstrap keys included)."
    )
    jwt_priority_class_claim: Text = Field(
        "priority_class", description="JWT claim naming the token's priority class (held to the ceiling below)."
    )
    jwt_max_priority_class: Text | None = Field(
        None,
        description="The highest class a JWT from an issuer may claim (a higher claim gets this one). "
        "Default: BASTION_DEFAULT_PRIORITY_CLASS.",
    )
    engine_capacity: int = Field(
        0,
        ge=0,
        description="Requests the gateway keeps outstanding at the engine at most (about vLLM's --max-num-seqs); "
        "more wait in the gateway's fair queue. 0 = no cap (only BASTION_ENGINE_WAITING_THRESHOLD).",
    )
    engine_reserve: int = Field(
        0,
        ge=0,
        description="Of BASTION_ENGINE_CAPACITY, slots only the highest class may fill, so that its requests "
        "find room at once beside a flood of lower classes.",
    )
    engine_backlog: int = Field(
        0,
        ge=0,
        le=4096,
        description="Requests let past BASTION_ENGINE_CAPACITY to wait in the engine's own queue (per replica), so "
        "a finished sequence's slot is refilled in the engine's next step rather than after a round trip through "
        "the gateway and the engine's API server (see BASTION_ENGINE_BACKLOG_LEAD for when). A top-class request "
        "that finds every slot busy then waits for the next to end (vLLM's priority scheduler puts it first). Only "
        "for engines run with --scheduling-policy priority. About the capacity with a lead; 0 = none.",
    )
    engine_backlog_lead: float = Field(
        0.15,
        ge=0,
        le=60,
        description="With BASTION_ENGINE_BACKLOG: a lower-class request is forwarded past the capacity only this "
        "many seconds before an outstanding one is predicted to end (from the fastest recent requests' seconds per "
        "token), so it waits inside the engine only around a slot's release, not for a whole request. About the "
        "engine's refill gap (vLLM's API server: ~0.1 s at 64 busy sequences). 0 = the backlog is always open.",
    )
    engine_waiting_threshold: int | None = Field(
        None,
        ge=0,
        description="Queue at the gateway while the engine's own waiting queue (vllm:num_requests_waiting, "
        "scraped about once a second) is above this. Unset = not scraped.",
    )
    queue_size: int = Field(
        1024, ge=1, description="Requests waiting at the gateway at most; beyond, the lowest class is shed first."
    )

    @field_validator("priority_classes")
    @classmethod
    def _check_classes(cls, value: str) -> str:
        parse_classes(value, None)
        return value

    @field_validator("responses_background")
    @classmethod
    def _check_background(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("enforce_max_tokens"):
            raise ValueError(
                "a background response is charged its reservation, which holds only if the engine stops there: "
                "set BASTION_ENFORCE_MAX_TOKENS=true as well"
            )
        return value

    @field_validator("fairness")
    @classmethod
    def _check_scheduling_policy(cls, value: bool, info: ValidationInfo) -> bool:
        """vLLM refuses a nonzero `priority` unless run with --scheduling-policy priority, which bastion adds to
        the vLLM it supervises; an explicit other policy wins, and every request below the top class would fail."""
        problem = fairness_problem(value, info.data.get("engines") or [], "BASTION_ENGINES entry")
        if (
            problem is None
            and value
            and not (info.data.get("upstream_url") or info.data.get("upstream_command") or info.data.get("engines"))
        ):
            problem = _policy_problem("BASTION_VLLM_EXTRA_ARGS", info.data.get("vllm_extra_args") or "")
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("upstream_command")
    @classmethod
    def _check_one_upstream(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("upstream_url") is not None:
            raise ValueError(
                "BASTION_UPSTREAM_URL is set too, and an external upstream is never spawned: unset one of them "
                "(the URL for a server you run yourself, the command for a child bastion supervises)"
            )
        return value

    @field_validator("engines", "engines_file")
    @classmethod
    def _check_engines_source(cls, value: Any, info: ValidationInfo) -> Any:
        if not value:
            return value
        if info.field_name == "engines_file":
            if "engines" not in info.data:  # BASTION_ENGINES itself is wrong: its line says so
                return value
            if info.data["engines"]:
                raise ValueError("BASTION_ENGINES is set too: give the engine list in one of them, and unset the other")
        # One engine's own settings beside the list would be ignored without a word.
        given = " and ".join(f"BASTION_{n.upper()}" for n in ("upstream_url", "upstream_command") if info.data.get(n))
        if given:
            raise ValueError(
                f"{given} is for the one engine used when there is no engine list: move it into an entry of the "
                f'list ("url" or "command") and unset {given}'
            )
        return value

    @field_validator("engine_capacity", "engine_reserve", "engine_backlog", "engine_waiting_threshold")
    @classmethod
    def _check_gate_is_on(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Read only by the fair queue: set without it, an operator believes the engine capped when nothing is.
        given = value is not None if info.field_name == "engine_waiting_threshold" else bool(value)
        if given and info.data.get("fairness") is False:
            raise ValueError(
                "is read only by the fair queue, which is off: set BASTION_FAIRNESS=true as well, or unset it"
            )
        return value

    @field_validator("engine_reserve")
    @classmethod
    def _check_reserve(cls, value: int, info: ValidationInfo) -> int:
        if not value or info.data.get("engines") or info.data.get("engines_file"):  # room = capacity x replicas
            return value
        capacity = info.data.get("engine_capacity")
        if capacity == 0:
            raise ValueError(
                "a reserve is kept out of BASTION_ENGINE_CAPACITY, which is 0 (no cap); set the capacity (vLLM's "
                "--max-num-seqs) or set the reserve to 0"
            )
        if capacity is not None and value >= capacity:
            raise ValueError(
                f"{value} of BASTION_ENGINE_CAPACITY={capacity} leaves no room for any class but the highest "
                "(its requests would all wait for their deadline); keep it below the capacity (2-4 is usual)"
            )
        return value

    @field_validator("engine_backlog")
    @classmethod
    def _check_backlog(cls, value: int, info: ValidationInfo) -> int:
        engines = info.data.get("engines") or info.data.get("engines_file")  # their entries may carry a capacity
        if value and not info.data.get("engine_capacity") and not engines:
            raise ValueError(
                "a backlog is counted beyond BASTION_ENGINE_CAPACITY, which is 0 (no cap); set the capacity "
                "(vLLM's --max-num-seqs) or set the backlog to 0"
            )
        return value

    @field_validator("default_priority_class", "jwt_max_priority_class")
    @classmethod
    def _check_class_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        classes = info.data.get("priority_classes")
        if value is not None and classes is not None:
            names = [c.name for c in parse_classes(classes, None).classes]
            if value not in names:
                raise ValueError(f"{value!r} is not a class of BASTION_PRIORITY_CLASSES ({', '.join(names)})")
        return value

    def class_table(self) -> ClassTable:
        return parse_classes(self.priority_classes, self.default_priority_class)


class ConfigError(Exception):
    """Settings that cannot be used: one line per problem, each naming the variable to fix.

    What an operator sees instead of a traceback (printed as `bastion: <line>`, exit status 2).
    """

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def variable(settings_cls: type[BaseSettings], name: str) -> str:
    """The environment variable of a field (`port` -> `BASTION_PORT`)."""
    field = settings_cls.model_fields.get(name)
    if field is not None and isinstance(field.validation_alias, str):
        return field.validation_alias
    if field is None and any(f.validation_alias == name for f in settings_cls.model_fields.values()):
        return name  # pydantic reports an aliased field by its alias (VLLM_API_KEY)
    return f"{settings_cls.model_config.get('env_prefix', '')}{name.upper()}"


def example(settings_cls: type[BaseSettings], name: str) -> str | None:
    """A valid value for a field, as written in the environment: its example, else its default."""
    field = settings_cls.model_fields.get(name)
    if field is None:
        return None
    if field.examples:
        return str(field.examples[0])
    if isinstance(field.default, bool):
        return str(field.default).lower()
    default = _default_text(field)
    return None if default in (None, "[]", "{}") else default


def problem(settings_cls: type[BaseSettings], name: str, text: str, *, flag: bool = False) -> str:
    """One line: the variable (and its flag, when the value came from one), what is wrong, a valid example."""
    env = variable(settings_cls, name)
    where = f"--{name.replace('_', '-')} ({env})" if flag else env
    line = f"invalid {where}: {' '.join(text.split())}"
    valid = example(settings_cls, name)
    return f"{line}; e.g. {env}={valid}" if valid is not None else line


def describe(settings_cls: type[BaseSettings], error: ValidationError, flags: Collection[str] = ()) -> list[str]:
    """pydantic's errors as one line per setting (several problems of one setting share its line)."""
    found: dict[str, list[str]] = {}
    for item in error.errors(include_url=False, include_input=False):
        loc = item["loc"]
        name = str(loc[0]) if loc else ""
        message = item["msg"].removeprefix("Value error, ")
        if len(loc) > 1:
            where = f"item {loc[1] + 1}" if isinstance(loc[1], int) else repr(loc[1])
            message = f"{where}: {message}"
        if message not in found.setdefault(name, []):
            found[name].append(message)
    return [
        problem(settings_cls, name, "; ".join(messages), flag=name in flags)
        if name
        else f"invalid settings: {'; '.join(messages)}"
        for name, messages in found.items()
    ]


_SETTINGS_ERROR_FIELD = re.compile(r'field "(\w+)"')


def load(
    settings_cls: type[S],
    overrides: Mapping[str, Any] | None = None,
    *,
    env_file: Path | str | None = ".env",
) -> S:
    """The one way every command builds its settings: flags (`overrides`) over environment over `.env`.

    An empty flag means unset, like an empty variable. Every invalid value raises `ConfigError`.
    """
    given = {name: value for name, value in (overrides or {}).items() if value is not None and value != ""}
    try:
        if "env_file" in settings_cls.model_config:
            return settings_cls(_env_file=env_file, **given)
        return settings_cls(**given)
    except ValidationError as exc:
        raise ConfigError(describe(settings_cls, exc, flags=given.keys())) from None
    except SettingsError as exc:  # a value pydantic-settings could not even decode (not expected: NoDecode)
        match = _SETTINGS_ERROR_FIELD.search(str(exc))
        name = match.group(1) if match else ""
        raise ConfigError([problem(settings_cls, name, "cannot be parsed")]) from None


def unknown_variables(
    known: Collection[str], prefix: str, environ: Mapping[str, str], env_file: Path | str | None = ".env"
) -> list[str]:
    """Warnings for `prefix*` names that no setting reads (a typo keeps a default silently otherwise)."""
    found = [(name, "in the environment") for name in environ]
    path = Path(env_file) if env_file is not None else None
    if path is not None and path.is_file():
        found += [(name, f"in {path}") for name in dotenv_values(path)]
    upper = {name.upper() for name in known}
    warnings = []
    for name, where in found:
        if not name.upper().startswith(prefix) or name.upper() in upper:
            continue
        close = difflib.get_close_matches(name.upper(), sorted(upper), n=1)
        hint = f"; did you mean {close[0]}?" if close else "; see `bastion check-config --env-example`"
        warnings.append(f"warning: {name} ({where}) is not a setting and is ignored{hint}")
    return warnings


def variables(settings_cls: type[BaseSettings]) -> set[str]:
    return {variable(settings_cls, name) for name in settings_cls.model_fields}


def env_example(settings_cls: type[BaseSettings]) -> str:
    """A commented `.env` template: every setting, its description and default."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    lines = [
        "# bastion settings. Copy to .env (never commit it) or export them as environment variables.",
        "# Command-line flags override these; these override the defaults shown.",
        "# Generated by `bastion check-config --env-example`.",
        "",
    ]
    for name, field in settings_cls.model_fields.items():
        lines.extend(f"# {line}" for line in textwrap.wrap(field.description or "", 100))
        lines.extend((f"# {prefix}{name.upper()}={_default_text(field) or ''}", ""))
    return "\n".join(lines)


def _default_text(field: FieldInfo) -> str | None:
    """A field's default as it is written in the environment (JSON for lists), or None if unset."""
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list | dict):
        return json.dumps(default)
    if default is None or default == "" or isinstance(default, SecretStr):
        return None
    return str(getattr(default, "value", default))


def _is_secret(annotation: Any) -> bool:
    return "SecretStr" in str(annotation)


def config_reference(settings_cls: type[BaseSettings]) -> str:
    """docs/configuration.md: every setting as a table row (variable, default, description)."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `bastion check-config --markdown > docs/configuration.md`; do not edit by hand:",
        "     tests/unit/test_config.py fails when this file and the Settings class differ. -->",
        "",
        f"Every setting is an environment variable with the `{prefix}` prefix, or a line in a `.env` file in the",
        "working directory. Command-line flags of `bastion serve` (see `bastion serve --help`) win over the",
        "environment, which wins over `.env`, which wins over the defaults below. List values are comma-separated",
        "or a JSON list; an empty value means unset (the default). Choices ignore case. Settings marked **secret**",
        "are never command-line flags and never appear in logs or `bastion check-config` output.",
        "An invalid value stops every command with one line naming the variable and a valid example (exit 2).",
        "`bastion check-config` builds everything `serve` would from the current environment, without binding",
        "a port or starting a child; `bastion check-config --env-example` prints a commented `.env` template.",
        "",
        "| Variable | Default | Description |",
        "|---|---|---|",
    ]
    for name, field in settings_cls.model_fields.items():
        default = _default_text(field)
        shown = "(unset)" if default is None else f"`{default}`"
        description = (field.description or "").replace("|", "\\|")
        if _is_secret(field.annotation):
            description = f"**secret.** {description}"
        lines.append(f"| `{prefix}{name.upper()}` | {shown} | {description} |")
    return "\n".join(lines) + "\n"
