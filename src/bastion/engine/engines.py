"""Several engines behind one gateway: what BASTION_ENGINES describes, checked once.

Each entry is one engine group: the `model` name clients use, how its replicas run
(an external `url`, a vLLM `vllm_model`, or any `command`), and how many `replicas`.
`parse_engines` turns the JSON into frozen `EngineEntry` values or raises ValueError
with one line naming the item and the fix; nothing here touches the filesystem or
spawns anything (the program on PATH is checked by preflight through `build_command`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .command import CommandError, check_template

_KEYS = frozenset(
    {
        "model",
        "url",
        "api_key",
        "api_key_env",
        "vllm_model",
        "command",
        "python",
        "extra_args",
        "gpus",
        "max_model_len",
        "gpu_memory_utilization",
        "dtype",
        "tensor_parallel_size",
        "replicas",
        "share_gpus",
        "env",
        "capacity",
    }
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
MAX_REPLICAS = 64


@dataclass(frozen=True, slots=True)
class EngineEntry:
    """One engine group: `replicas` identical servers of `model`."""

    model: str
    url: str | None = None
    api_key: str | None = None  # resolved from api_key or api_key_env; never logged, never argv
    vllm_model: str | None = None
    command: str | None = None
    python: str = ""
    extra_args: str = ""
    gpus: tuple[int, ...] = ()
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    replicas: int = 1
    share_gpus: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    capacity: int | None = None  # requests one replica runs at once (for the queue in front); None: unknown

    @property
    def external(self) -> bool:
        return self.url is not None

    def gpus_of(self, replica: int) -> tuple[int, ...]:
        """The GPUs one replica sees (its CUDA_VISIBLE_DEVICES): its slice of `gpus`."""
        if not self.gpus:
            return ()
        per = len(self.gpus) // self.replicas
        return self.gpus[replica * per : (replica + 1) * per]

    def label(self, replica: int) -> str:
        """The bounded metric/audit value of one replica: the model and the replica's index."""
        return f"{self.model}/{replica}"


def load_engines_json(text: str) -> list[Any]:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if not isinstance(parsed, list):
        raise ValueError('must be a JSON list of engines, e.g. [{"model": "chat", "url": "http://10.0.0.5:8000"}]')
    return parsed


def parse_engines(items: Sequence[Any], environ: Mapping[str, str]) -> tuple[EngineEntry, ...]:
    """The engines, or ValueError naming the first mistake (`item N (model): ...`)."""
    entries = tuple(_entry(number, item, environ) for number, item in enumerate(items, 1))
    seen: dict[str, int] = {}
    for number, entry in enumerate(entries, 1):
        if entry.model in seen:
            raise ValueError(
                f"item {number}: model {entry.model!r} is also item {seen[entry.model]}; "
                'a model served by several servers is one entry with "replicas": N'
            )
        seen[entry.model] = number
    owner: dict[int, str] = {}
    for entry in entries:
        for gpu in set(entry.gpus):
            other = owner.get(gpu)
            if other is not None and not entry.share_gpus:
                raise ValueError(
                    f"GPU {gpu} is given to both {other!r} and {entry.model!r}; give each engine its own GPUs "
                    'or set "share_gpus": true on the entry that may share (and lower gpu_memory_utilization)'
                )
            owner[gpu] = entry.model
    return entries


def _entry(number: int, item: Any, environ: Mapping[str, str]) -> EngineEntry:
    where = f"item {number}"
    if not isinstance(item, dict):
        raise ValueError(f'{where}: must be an object like {{"model": "chat", "url": "http://10.0.0.5:8000"}}')
    model = item.get("model")
    if not isinstance(model, str) or not _MODEL_NAME.fullmatch(model):
        raise ValueError(f'{where}: needs "model", the name clients use (letters, digits, . _ - : / @ +)')
    where = f"item {number} ({model})"
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    kinds = [key for key in ("url", "vllm_model", "command") if item.get(key) is not None]
    if len(kinds) != 1:
        raise ValueError(f'{where}: give exactly one of "url" (external), "vllm_model" or "command"')
    replicas = _int(item, "replicas", 1, where, low=1, high=MAX_REPLICAS)
    tp = _int(item, "tensor_parallel_size", 1, where, low=1, high=64)
    url = item.get("url")
    api_key = _api_key(item, where, environ)
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f'{where}: "url" must start with http:// or https://')
        if url.rstrip("/").endswith("/v1"):
            raise ValueError(f'{where}: "url" should be the server\'s root, without /v1')
        if item.get("gpus"):
            raise ValueError(f'{where}: "gpus" is for engines bastion runs, not for an external "url"')
    elif api_key is not None:
        raise ValueError(f'{where}: "api_key" is for an external "url"; bastion gives its own children a fresh key')
    command = item.get("command")
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            raise ValueError(f'{where}: "command" must be a non-empty string')
        try:
            check_template(command)
        except CommandError as exc:
            raise ValueError(f'{where}: "command": {exc.reason}') from None
        if "{port}" not in command:
            raise ValueError(f'{where}: "command" has no {{port}}: each replica listens on a port bastion picks')
    gpus = _gpus(item.get("gpus"), where)
    if gpus and len(gpus) != replicas * tp:
        raise ValueError(
            f'{where}: "gpus" lists {len(gpus)} GPU(s) for {replicas} replica(s) x tensor_parallel_size {tp}; '
            f"list {replicas * tp}, one slice per replica"
        )
    env = item.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and _ENV_NAME.fullmatch(k) for k in env):
        raise ValueError(f'{where}: "env" must be an object of NAME: value')
    memory = item.get("gpu_memory_utilization", 0.9)
    if not isinstance(memory, int | float) or isinstance(memory, bool) or not 0 < memory <= 1:
        raise ValueError(f'{where}: "gpu_memory_utilization" must be a number in (0, 1]')
    max_len = item.get("max_model_len")
    if max_len is not None:
        max_len = _int(item, "max_model_len", 0, where, low=1, high=1 << 24)
    capacity = item.get("capacity")
    if capacity is not None:
        capacity = _int(item, "capacity", 0, where, low=1, high=1 << 20)
    for key in ("vllm_model", "python", "extra_args", "dtype"):
        if key in item and not isinstance(item[key], str):
            raise ValueError(f'{where}: "{key}" must be a string')
    share = item.get("share_gpus", False)
    if not isinstance(share, bool):
        raise ValueError(f'{where}: "share_gpus" must be true or false')
    return EngineEntry(
        model=model,
        url=url.rstrip("/") if isinstance(url, str) else None,
        api_key=api_key,
        vllm_model=item.get("vllm_model"),
        command=command,
        python=item.get("python", ""),
        extra_args=item.get("extra_args", ""),
        gpus=gpus,
        max_model_len=max_len,
        gpu_memory_utilization=float(memory),
        dtype=item.get("dtype", "auto"),
        tensor_parallel_size=tp,
        replicas=replicas,
        share_gpus=share,
        env={k: v if isinstance(v, str) else json.dumps(v) for k, v in env.items()},
        capacity=capacity,
    )


def _int(item: Mapping[str, Any], key: str, default: int, where: str, *, low: int, high: int) -> int:
    value = item.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f'{where}: "{key}" must be a whole number from {low} to {high}')
    return value


def _gpus(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            value = None
    if not isinstance(value, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value):
        raise ValueError(f'{where}: "gpus" must be GPU ids, e.g. [0, 1] or "0,1"')
    if len(set(value)) != len(value):
        raise ValueError(f'{where}: "gpus" names a GPU twice')
    return tuple(value)


def _api_key(item: Mapping[str, Any], where: str, environ: Mapping[str, str]) -> str | None:
    """The external engine's key: given inline (from a file or the environment) or named by api_key_env."""
    key, name = item.get("api_key"), item.get("api_key_env")
    if key is not None and name is not None:
        raise ValueError(f'{where}: give "api_key" or "api_key_env", not both')
    if name is not None:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f'{where}: "api_key_env" must name an environment variable')
        key = environ.get(name)
        if not key:
            raise ValueError(f'{where}: "api_key_env" names {name}, which is not set (or empty)')
    if key is not None and (not isinstance(key, str) or not re.fullmatch(r"[\x21-\x7e]+", key)):
        raise ValueError(f"{where}: the API key must be printable ASCII without spaces")  # never echoed
    return key
