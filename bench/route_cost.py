"""Micro-benchmark: what the route stage (routes.RouteGuard) costs per request, in microseconds.

Calls the stage in front of a no-op ASGI app, in one event loop, and subtracts the
cost of calling the no-op app directly. Not a test; run it with
`PYTHONPATH=src .venv/bin/python bench/route_cost.py`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bastion.auth.identity import Principal
from bastion.context import Exchange
from bastion.routes import RouteGuard, RouteTable, parse_routes

N = 200_000


async def _noop(scope: Any, receive: Any, send: Any) -> None:
    return None


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


def _scope(method: str, path: str, principal: Principal) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "method": method, "path": path, "headers": []}
    exchange = Exchange(request_id="r", method=method, path=path, principal=principal)
    exchange.attach(scope)
    return scope


async def _per_call(app: Any, scope: dict[str, Any]) -> float:
    for _ in range(1000):  # warm-up
        await app(scope, _receive, _send)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(N):
            await app(scope, _receive, _send)
        best = min(best, (time.perf_counter() - start) / N)
    return best * 1e6


async def main() -> None:
    table = RouteTable(parse_routes(["default", "/v1/responses/{id}", "/v1/files"]))
    guard = RouteGuard(_noop, table)
    anyone = Principal(id="k", name="k", kind="key")
    restricted = Principal(id="r", name="r", kind="key", models=frozenset({"m"}))
    baseline = await _per_call(_noop, _scope("POST", "/v1/chat/completions", anyone))
    cases = {
        "POST /v1/chat/completions (a dict hit)": _scope("POST", "/v1/chat/completions", anyone),
        "same, model-restricted key": _scope("POST", "/v1/chat/completions", restricted),
        "GET /v1/models/{model}, restricted (template + check)": _scope("GET", "/v1/models/m", restricted),
        "GET /v1/responses/{id} (template)": _scope("GET", "/v1/responses/resp_1", anyone),
    }
    print(f"no-op ASGI call baseline: {baseline:.2f} µs (subtracted below)")
    for name, scope in cases.items():
        print(f"{name:<56} {await _per_call(guard, scope) - baseline:6.2f} µs")
    start = time.perf_counter()
    for _ in range(N):
        table.match("/v1/chat/completions")
    print(f"{'RouteTable.match alone, plain path':<56} {(time.perf_counter() - start) / N * 1e6:6.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
