"""The knobs of `bastion simulate`, apart from the simulator so the CLI can build its flags cheaply."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class SimulatorSettings(BaseSettings):
    """Knobs of `bastion simulate`; every flag has a BASTION_SIMULATE_* variable."""

    model_config = SettingsConfigDict(env_prefix="BASTION_SIMULATE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8001, ge=0, le=65535, description="Port to listen on.")
    model: str = Field("qwen2.5-7b-instruct", description="Model name served and reported.")
    ttft: float = Field(0.0, ge=0, description="Seconds before the first token.")
    itl: float = Field(0.0, ge=0, description="Seconds between tokens.")
    tokens: int = Field(16, ge=1, description="Completion tokens when the request sets no lower max_tokens.")
    startup_delay: float = Field(0.0, ge=0, description="Seconds to 'load the model' before listening.")
    error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of requests answered with a 500.")
    crash_after: int = Field(0, ge=0, description="Exit abruptly on the request after this many (0: never).")
    seed: int = Field(0, description="Seed of the error-rate random generator.")
    created: int = Field(0, ge=0, description="Fixed `created` timestamp for reproducible output (0: now).")
    # Read from VLLM_API_KEY like vLLM itself, so the supervisor treats both alike; never a flag.
    api_key: SecretStr | None = Field(None, validation_alias="VLLM_API_KEY", exclude=True)
