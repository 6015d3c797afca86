"""Micro-benchmark: what admission costs per request, in microseconds.

Calls the auth middleware in front of a no-op ASGI app, in one event loop, and
subtracts the cost of calling the no-op app directly. Not a test; run it with
`.venv/bin/python bench/auth_micro.py`.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bastion.app import build_auth
from bastion.auth.jwt import mint
from bastion.auth.keys import KeyFile, create_key, write_key_file
from bastion.config import Settings

N = 50_000
SECRET = "bench-jwt-secret-0123456789abcdef"


async def _noop(scope: Any, receive: Any, send: Any) -> None:
    return None


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


def _scope(credential: str | None, peer: str = "127.0.0.1", xff: str | None = None) -> dict[str, Any]:
    headers = [(b"host", b"gw"), (b"content-type", b"application/json"), (b"user-agent", b"OpenAI/Python 1.x")]
    if credential:
        headers.append((b"authorization", b"Bearer " + credential.encode()))
    if xff:
        headers.append((b"x-forwarded-for", xff.encode()))
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers, "client": (peer, 5)}


async def _per_call(app: Any, scope: dict[str, Any]) -> float:
    for _ in range(1000):  # warm-up
        await app(dict(scope), _receive, _send)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(N):
            await app(dict(scope), _receive, _send)
        best = min(best, (time.perf_counter() - start) / N)
    return best * 1e6


async def main() -> None:
    directory = Path(tempfile.mkdtemp())
    data = KeyFile()
    keys = [create_key(data, name=f"user{i}")[1] for i in range(1000)]
    _, restricted = create_key(data, name="ip-limited", allow_ips=["127.0.0.0/8", "10.0.0.0/8"], models=["m"])
    write_key_file(directory / "keys.json", data)
    base: dict[str, Any] = {"keys_file": directory / "keys.json", "jwt_secret": SECRET, "_env_file": None}
    plain = build_auth(Settings(**base)).guard(_noop)
    lists = build_auth(
        Settings(**base, allow_ips="127.0.0.0/8,10.0.0.0/8,2001:db8::/32", trusted_proxies="127.0.0.1")
    ).guard(_noop)
    allowlist = build_auth(Settings(**base, allow_ips="127.0.0.0/8")).guard(_noop)  # what bench/run.py sets
    token = mint(SECRET, "ci", 3600, models=["m"])

    baseline = await _per_call(_noop, _scope(keys[500]))
    cases = {
        "valid API key (1,001 keys in the store)": (plain, _scope(keys[500])),
        "valid API key with its own IP allowlist": (plain, _scope(restricted)),
        "valid key + global allowlist (bench/run.py's)": (allowlist, _scope(keys[500])),
        "valid key + global allowlist + trusted-proxy XFF": (lists, _scope(keys[500], xff="10.1.2.3")),
        "valid HS256 JWT": (plain, _scope(token)),
        "refused: unknown key (401 written)": (plain, _scope("bst-00000000_" + "x" * 43)),
        "refused: no credential (401 written)": (plain, _scope(None)),
    }
    print(f"no-op ASGI call baseline: {baseline:.2f} µs (subtracted below)")
    for name, (app, scope) in cases.items():
        print(f"{name:<52} {await _per_call(app, scope) - baseline:7.2f} µs")
    verifier = plain._auth.jwt
    assert verifier is not None
    start = time.perf_counter()
    for _ in range(N // 10):
        await verifier._verify(token)  # the signature check a first use pays (then cached)
    first_use = (time.perf_counter() - start) / (N // 10) * 1e6
    print(f"{'HS256 JWT first use (uncached verification)':<52} {first_use:7.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
