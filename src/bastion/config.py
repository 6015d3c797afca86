"""Every setting of the gateway, validated once at start-up.

Settings come from (highest first) command-line flags, `BASTION_*` environment
variables, a `.env` file, then the defaults below. Secrets are `SecretStr` so a
stray `repr()` or log line never shows them.
"""

from __future__ import annotations

import json
import textwrap
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import AnyHttpUrl, BeforeValidator, Field, SecretStr, ValidationError, model_validator
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
    passthrough_methods: list[str] = Field(
        default_factory=lambda: ["GET", "POST"],
        description="HTTP methods forwarded on /v1/*; anything else gets 405. JSON list.",
    )

    # --- rate limits (per principal; anonymous traffic per client IP) ---------------
    rate_limit_rpm: int = Field(
        600, ge=0, description="Default requests per minute per principal (rolling window); 0 = unlimited."
    )
    rate_limit_tpm: int = Field(
        200_000,
        ge=0,
        description="Default tokens (prompt + completion) per minute per principal, charged from real usage; "
        "0 = unlimited.",
    )
    rate_limit_max_concurrent: int = Field(
        32, ge=0, description="Default in-flight requests per principal; 0 = unlimited."
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

    @model_validator(mode="after")
    def _shared_counts_for_several_processes(self) -> Self:
        # Memory storage counts per process: N workers would silently allow N times every limit.
        # There is no workers setting today (one process per `bastion serve`); this guards a future one.
        workers = getattr(self, "workers", 1)
        if isinstance(workers, int) and workers > 1 and self.redis_url is None:
            raise ValueError(
                f"{workers} workers with in-memory rate limits would multiply every limit by {workers}: "
                "set BASTION_REDIS_URL so the workers share counts, or run one worker"
            )
        return self


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
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            shown = json.dumps(default)
        elif isinstance(default, SecretStr) or default is None:
            shown = ""
        else:
            shown = str(getattr(default, "value", default))
        lines.extend((f"# {prefix}{name.upper()}={shown}", ""))
    return "\n".join(lines)
