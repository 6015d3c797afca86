"""Every setting of the gateway, validated once at start-up.

Settings come from (highest first) command-line flags, `BASTION_*` environment
variables, a `.env` file, then the defaults below. Secrets are `SecretStr` so a
stray `repr()` or log line never shows them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"],
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
]


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

    # --- request handling ----------------------------------------------------------
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest accepted request body in bytes (413 above)."
    )
    passthrough_methods: list[str] = Field(
        default_factory=lambda: ["GET", "POST"],
        description="HTTP methods forwarded on /v1/*; anything else gets 405. JSON list.",
    )

    # --- logging -------------------------------------------------------------------
    log_level: LogLevel = Field("info", description="Log level: debug, info, warning, error.")
    log_format: LogFormat = Field(LogFormat.TEXT, description="Log format: text (human) or json.")


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's error into lines that name the environment variable to fix."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        env = f"BASTION_{name.upper()}"
        lines.append(f"invalid setting {env} ({name}): {item['msg']}")
    return "\n".join(lines)
