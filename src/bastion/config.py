"""Every setting of the gateway, validated once at start-up.

Settings come from (highest first) command-line flags, `BASTION_*` environment
variables, a `.env` file, then the defaults below. Secrets are `SecretStr` so a
stray `repr()` or log line never shows them.
"""

from __future__ import annotations

import json
import textwrap
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"],
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
]


def _list(value: Any) -> Any:
    """A list setting from the environment: a JSON list or comma-separated values."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _networks(values: list[str]) -> list[str]:
    from .auth.ipfilter import parse_network

    for value in values:
        parse_network(value)
    return values


StrList = Annotated[list[str], NoDecode, BeforeValidator(_list)]
NetworkList = Annotated[list[str], NoDecode, BeforeValidator(_list)]
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
        # Errors never repeat the value given: it may be a secret.
        hide_input_in_errors=True,
    )

    # --- listening -----------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: Port = Field(8000, description="Port the gateway listens on.")

    # --- upstream --------------------------------------------------------------------
    upstream_url: AnyHttpUrl | None = Field(
        None,
        description="External mode: base URL of an OpenAI-compatible server bastion does not own "
        "(e.g. http://127.0.0.1:8001). Nothing is spawned.",
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="Bearer key bastion sends to an external upstream (never the client's)."
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
        30.0, description="Seconds an idle upstream connection is kept for reuse."
    )

    # --- supervised upstream (used when upstream_url is not set) --------------------
    upstream_command: str | None = Field(
        None,
        description="Run this command as the supervised upstream instead of vLLM; {host}, {port} and {python} "
        "are filled in. E.g. '{python} -m bastion simulate --host {host} --port {port}' for the no-GPU demo.",
    )
    upstream_host: str = Field("127.0.0.1", description="Address the supervised child binds (keep it loopback).")
    upstream_port: Port = Field(0, description="Port the supervised child binds; 0 picks a free one.")
    upstream_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for the supervised child, as a JSON object (e.g. CUDA_VISIBLE_DEVICES).",
    )
    model: str = Field("Qwen/Qwen2.5-7B-Instruct", description="Model vLLM serves: a Hugging Face id or a local path.")
    served_model_name: str | None = Field(
        None, description="Name clients use for the model (vLLM's --served-model-name); default: the model."
    )
    dtype: str = Field("auto", description="vLLM --dtype: auto, bfloat16, float16, float32.")
    max_model_len: int | None = Field(None, ge=1, description="vLLM --max-model-len (context length cap).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM --tensor-parallel-size (GPUs per model).")
    vllm_extra_args: str = Field(
        "", description="More vLLM arguments, shell-quoted, e.g. '--load-format dummy --enable-prefix-caching'."
    )
    vllm_python: str = Field(
        "", description="Python interpreter that has vLLM installed; default: the one running bastion."
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

    # --- request handling ----------------------------------------------------------
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest accepted request body in bytes (413 above)."
    )
    client_header_timeout: Seconds = Field(
        10.0,
        description="Seconds a client may take to send a request's headers (from connecting, or from the end of "
        "its previous response); slower connections are closed (slowloris).",
    )
    client_body_timeout: Seconds = Field(
        60.0,
        description="Seconds a client may take to send a whole request body; slower uploads get 408 (a body is "
        "read before the rate limits, so an upload holds no concurrency slot).",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request head (request line and headers) in bytes (431/400 above)."
    )
    passthrough_methods: list[str] = Field(
        default_factory=lambda: ["GET", "POST"],
        description="HTTP methods forwarded on /v1/*; anything else gets 405. JSON list.",
    )

    # --- authentication -------------------------------------------------------------
    keys_file: Path | None = Field(
        None,
        description="API key store (JSON, managed with `bastion keys`). Reloaded when it changes and on "
        "SIGHUP. Unset = no key file.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Quick-start bootstrap keys: comma-separated or JSON list of plain keys (16+ characters "
        "each), accepted with no policy. Prefer a keys file for anything long-lived.",
    )
    keys_reload_interval: Seconds = Field(1.0, description="Seconds between checks of the key file's mtime.")
    allow_ips: NetworkList = Field(
        default_factory=list,
        description="Global IP allowlist: CIDRs or addresses, IPv4/IPv6, comma-separated. Empty = all.",
    )
    deny_ips: NetworkList = Field(
        default_factory=list, description="Global IP denylist (wins over the allowlist), comma-separated CIDRs."
    )
    trusted_proxies: NetworkList = Field(
        default_factory=list,
        description="Proxies whose X-Forwarded-For is believed (comma-separated CIDRs). A request from "
        "anywhere else is judged by its TCP peer address.",
    )
    jwt_secret: SecretStr | None = Field(
        None, description="HMAC secret for HS256/384/512 JWTs (also used by `bastion token mint`)."
    )
    jwt_public_key_file: Path | None = Field(None, description="PEM public key file for RS/ES/PS-signed JWTs.")
    jwt_jwks: str | None = Field(
        None,
        description="JWKS for RS/ES/PS-signed JWTs: a file path or an http(s) URL (cached, refetched on unknown kid).",
    )
    jwt_algorithms: StrList = Field(
        default_factory=lambda: ["HS256"],
        description="JWT algorithms accepted (the token header never chooses; `none` is always refused).",
    )
    jwt_audience: str | None = Field(None, description="Required JWT `aud`, when set.")
    jwt_issuer: str | None = Field(None, description="Required JWT `iss`, when set.")
    jwt_leeway: float = Field(30.0, ge=0, le=600, description="Clock skew allowed on exp/nbf/iat, seconds.")
    jwt_models_claim: str = Field("models", description="JWT claim holding the list of models the token may use.")
    jwt_limits_claim: str = Field(
        "limits", description="JWT claim holding an object with rpm, tpm and max_concurrent for the token."
    )
    jwt_allowed_models: StrList = Field(
        default_factory=list,
        description="Ceiling for every JWT: models a token can ever be granted (comma-separated). Empty = all.",
    )
    jwt_max_rpm: int | None = Field(None, ge=1, description="Ceiling on a JWT's requests/minute (default: none).")
    jwt_max_tpm: int | None = Field(None, ge=1, description="Ceiling on a JWT's tokens/minute (default: none).")
    jwt_max_concurrent: int | None = Field(
        None, ge=1, description="Ceiling on a JWT's concurrent requests (default: none)."
    )
    token_endpoint: bool = Field(
        False,
        description="Enable POST /v1/auth/token: a valid API key is exchanged for a short-lived HS256 JWT with "
        "the same (or a narrower) policy. Needs BASTION_JWT_SECRET.",
    )
    token_endpoint_ttl: Seconds = Field(
        900.0, description="Longest lifetime, in seconds, of a token from POST /v1/auth/token (also its default)."
    )

    @field_validator("allow_ips", "deny_ips", "trusted_proxies")
    @classmethod
    def _check_networks(cls, values: list[str]) -> list[str]:
        return _networks(values)

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
    auth_failure_limit: int = Field(
        20, ge=0, description="Failed authentications per minute per client IP before 429s; 0 = unlimited."
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Share rate-limit counts through Redis (redis://[:password@]host:port/db, rediss://...). "
        "Unset: in-process memory, correct only for one gateway process. Replicas must share one Redis.",
    )
    redis_fail_mode: Literal["open", "closed"] = Field(
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
    log_format: LogFormat = Field(LogFormat.TEXT, description="Log format: text (human) or json.")

    # --- observability -------------------------------------------------------------
    metrics_enabled: bool = Field(True, description="Serve /metrics and /metrics/upstream (protected, see below).")
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token a scraper must send to /metrics and /metrics/upstream. With neither a token nor "
        "BASTION_METRICS_ALLOW set, only loopback peers may scrape.",
    )
    metrics_allow: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description='CIDRs of peers allowed to scrape, JSON list (e.g. ["10.0.0.0/8"]). Matched against the TCP '
        "peer, never X-Forwarded-For. With a token too, a scrape needs both.",
    )
    metrics_principal_label: bool = Field(
        True, description="Label request and token metrics by principal (key name); turn off for large fleets."
    )
    metrics_models: list[str] = Field(
        default_factory=list,
        description="Model names always used as the `model` label, JSON list. Others become labels once the "
        "upstream has answered them with a 2xx (at most 32), else `other`.",
    )
    audit_log: str = Field(
        "stdout",
        description="Audit log destination: stdout, off, or a file path (one JSON line per /v1 request).",
    )


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's error into lines that name the environment variable to fix."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        env = f"BASTION_{name.upper()}"
        lines.append(f"invalid setting {env} ({name}): {item['msg']}")
    return "\n".join(lines)


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
        "environment, which wins over `.env`, which wins over the defaults below. List values take a JSON list or",
        "comma-separated values unless the description says JSON. Settings marked **secret** are never",
        "command-line flags and never appear in logs or `bastion check-config` output.",
        "`bastion check-config` validates the current environment; `bastion check-config --env-example`",
        "prints a commented `.env` template.",
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
