"""The knobs of `bastion simulate`, apart from the simulator so the CLI can build its flags cheaply."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class SchedulingPolicy(enum.StrEnum):
    """The order of vLLM's waiting queue (`--scheduling-policy`)."""

    FCFS = "fcfs"
    PRIORITY = "priority"


class SimulatorSettings(BaseSettings):
    """Knobs of `bastion simulate`; every flag has a BASTION_SIMULATE_* variable."""

    model_config = SettingsConfigDict(env_prefix="BASTION_SIMULATE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8001, ge=0, le=65535, description="Port to listen on.")
    model: str = Field("qwen2.5-7b-instruct", description="Model name served and reported.")
    ttft: float = Field(0.0, ge=0, description="Seconds from being scheduled to the first token (the prefill).")
    itl: float = Field(0.0, ge=0, description="Seconds between tokens while one sequence runs.")
    itl_per_seq: float = Field(
        0.0,
        ge=0,
        description="Extra seconds between tokens for each other running sequence, so throughput "
        "saturates as on a GPU (0: a batch is as fast as one sequence).",
    )
    tokens: int = Field(16, ge=1, description="Completion tokens when the request sets no lower max_tokens.")
    max_num_seqs: int = Field(
        256,
        ge=1,
        description="Sequences generated at once, as vLLM's --max-num-seqs; later requests wait "
        "(a stream gets its response head at once and its first token once scheduled). "
        "A request with n choices takes n.",
    )
    scheduling_policy: SchedulingPolicy = Field(
        SchedulingPolicy.FCFS,
        description="Order of the waiting queue, as vLLM's --scheduling-policy: fcfs (arrival; a "
        "request's priority is ignored, as vLLM V1 does) or priority (the request's integer "
        "`priority`, lower first, ties by arrival). Running sequences are never preempted.",
    )
    admission_delay: float = Field(
        0.0,
        ge=0,
        description="Seconds from a request's arrival to its joining the waiting queue, as vLLM's API server "
        "parses and tokenizes it before its engine core sees it: the gap before a slot is refilled when "
        "nothing waits inside the engine (0: none).",
    )
    startup_delay: float = Field(0.0, ge=0, description="Seconds to 'load the model' before listening.")
    error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of requests answered with a 500.")
    crash_after: int = Field(0, ge=0, description="Exit abruptly on the request after this many (0: never).")
    seed: int = Field(0, description="Seed of the error-rate random generator.")
    created: int = Field(0, ge=0, description="Fixed `created` timestamp for reproducible output (0: now).")
    # Read from VLLM_API_KEY like vLLM itself, so the supervisor treats both alike; never a flag.
    api_key: SecretStr | None = Field(None, validation_alias="VLLM_API_KEY", exclude=True)


def cli_flags() -> list[tuple[str, dict[str, Any]]]:
    """Each knob that is a flag, with its argparse keywords: a new knob needs no change to the CLI."""
    flags: list[tuple[str, dict[str, Any]]] = []
    for name, field in SimulatorSettings.model_fields.items():
        kind = field.annotation
        if field.exclude or not isinstance(kind, type):
            continue
        if issubclass(kind, enum.Enum):
            flags.append((name, {"choices": [member.value for member in kind]}))
        else:
            flags.append((name, {"type": kind}))
    return flags
