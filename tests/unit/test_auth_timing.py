"""Timing: a wrong key and a near miss (same prefix and id, one character off) take the same time.

Keys are looked up by their hash (a dict lookup on SHA-256), so no byte of a guess is compared
with a stored key. Measured in-process on the real ASGI app (refusals never reach an upstream):
interleaved calls, medians over a few hundred each, compared with a generous bound so a busy
2-core machine cannot make it flaky while a per-byte comparison leak (or a separate code path for
a known key id) would still show.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from bastion.app import create_app
from bastion.auth.keys import KeyFile, create_key, write_key_file
from bastion.config import Settings
from tests.support import TEST_KEY

# Medians of refusal times compared: run alone.
pytestmark = pytest.mark.serial

ROUNDS = 300
BOUND = 1.5  # median ratio either way


def one_off(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


async def measure(app: Any, keys: dict[str, str]) -> dict[str, float]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def call(key: str) -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/v1/models",
            "raw_path": b"/v1/models",
            "query_string": b"",
            "headers": [(b"authorization", b"Bearer " + key.encode())],
            "client": ("127.0.0.1", 1),
        }
        await app(scope, receive, send)
        return int(sent[0]["status"])

    samples: dict[str, list[float]] = {name: [] for name in keys}
    for name, key in keys.items():  # warm-up
        assert await call(key) == 401, name
    for _ in range(ROUNDS):
        for name, key in keys.items():
            started = time.perf_counter()
            await call(key)
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def test_wrong_and_near_miss_keys_take_the_same_time(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    data = KeyFile()
    _, stored = create_key(data, name="timing")
    write_key_file(path, data)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        upstream_url="http://127.0.0.1:9",
        api_keys=TEST_KEY,
        keys_file=path,
        auth_failure_limit=0,
        audit_log="off",
        metrics_enabled=False,
    )
    app = create_app(settings)
    keys = {
        "wrong": "bst-" + secrets.token_urlsafe(len(TEST_KEY))[: len(TEST_KEY) - 4],
        "near-miss": one_off(TEST_KEY),
        "near-miss-prefix": TEST_KEY[:-8] + secrets.token_urlsafe(8)[:8],
        "near-miss-stored": one_off(stored),  # same bst-<id>_ prefix as a stored key
    }
    medians = asyncio.run(measure(app, keys))
    base = medians["wrong"]
    report = ", ".join(f"{name} {value * 1e6:.1f} µs" for name, value in medians.items())
    print(f"\nmedian refusal time: {report}")
    for value in medians.values():
        assert 1 / BOUND <= value / base <= BOUND, report
