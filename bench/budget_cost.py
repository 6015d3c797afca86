"""CPU cost of token budgets per request, memory/SQLite mode (the Redis mode is a round trip).

    .venv/bin/python bench/budget_cost.py [N]

Best of 5 runs, CPU µs per request (process time: the 2-core box is shared, wall time would count
other processes), 100 principals in turn, each with a day and a month budget:
- ledger: `reserve_now` + `settle_now` (the check, the count, the roll-up kept for the journal);
- awaited: the same through the async `reserve`/`settle` the stage calls;
- stage: `BudgetStage` around an app that only sets usage (reserve, headers, settle, the exchange);
- flush: writing one second's roll-ups to SQLite on the journal's thread, per request, at 500 requests/s.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from bastion.asgi import Message, Scope
from bastion.auth.identity import Principal
from bastion.budget.calendar import Calendar, zone
from bastion.budget.ledger import Admitted, Ledger
from bastion.budget.middleware import BudgetStage, Resolver
from bastion.budget.policy import Budget, Period
from bastion.budget.sqlite import SQLiteJournal
from bastion.context import Exchange
from bastion.usage import Usage

BUDGETS = (Budget(Period.DAY, 10**12), Budget(Period.MONTH, 10**13))
PRINCIPALS = [f"key-{i}" for i in range(100)]


def ledger_cost(ledger: Ledger, n: int) -> float:
    now = time.time()
    turn = iter(range(10**12))

    def one() -> None:
        verdict = ledger.reserve_now(PRINCIPALS[next(turn) % 100], "qwen", 600, BUDGETS, now)
        assert isinstance(verdict, Admitted)
        ledger.settle_now(verdict.reservation, 350)

    return min(timeit.repeat(one, number=n, repeat=5, timer=time.process_time)) / n


async def awaited_cost(ledger: Ledger, n: int) -> float:
    now = time.time()
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for i in range(n):
            verdict = await ledger.reserve(PRINCIPALS[i % 100], "qwen", 600, BUDGETS, now)
            assert isinstance(verdict, Admitted)
            await ledger.settle(verdict.reservation, 350)
        best = min(best, time.process_time() - started)
    return best / n


async def stage_cost(ledger: Ledger, n: int) -> float:
    async def app(scope: Scope, receive: object, send: object) -> None:
        scope["bastion.exchange"].usage = Usage(100, 250)

    stage = BudgetStage(app, ledger, Resolver(()))  # type: ignore[arg-type]
    principals = [Principal(id=p, name=p, kind="key", budgets=BUDGETS) for p in PRINCIPALS]

    async def receive() -> Message:
        return {"type": "http.request"}

    async def send(message: Message) -> None:
        pass

    best = float("inf")
    batch = 1000  # exchanges made ahead in batches (not timed), so few are alive at once, as in a gateway
    for _ in range(5):
        spent = 0.0
        for _ in range(n // batch):
            exchanges = [Exchange("r", "POST", "/v1/chat/completions") for _ in range(batch)]
            for i, exchange in enumerate(exchanges):
                exchange.principal, exchange.model = principals[i % 100], "qwen"
                exchange.prompt_estimate, exchange.completion_cap = 100, 500
            scopes: list[dict[str, object]] = [{} for _ in exchanges]
            for scope, exchange in zip(scopes, exchanges, strict=True):
                exchange.attach(scope)
            started = time.process_time()
            for scope in scopes:
                await stage(scope, receive, send)
            spent += time.process_time() - started
        best = min(best, spent)
    return best / (n // batch * batch)


async def flush_cost(path: Path) -> float:
    ledger = Ledger(Calendar(zone("UTC")), SQLiteJournal(path))
    async with ledger.running():
        now = time.time()
        best = float("inf")
        for _ in range(5):
            for i in range(500):  # one second at 500 requests/s: 100 principals x 1 model
                verdict = ledger.reserve_now(PRINCIPALS[i % 100], "qwen", 600, BUDGETS, now)
                assert isinstance(verdict, Admitted)
                ledger.settle_now(verdict.reservation, 350)
            started = time.process_time()
            await ledger.flush()
            best = min(best, time.process_time() - started)
    return best / 500


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "usage.sqlite3"
        ledger = Ledger(Calendar(zone("UTC")), SQLiteJournal(path))
        async with ledger.running():
            print(f"ledger (reserve + settle):      {ledger_cost(ledger, n) * 1e6:6.2f} µs per request")
            print(f"awaited (reserve + settle):     {await awaited_cost(ledger, n) * 1e6:6.2f} µs per request")
            print(f"stage (reserve, headers, settle): {await stage_cost(ledger, n) * 1e6:6.2f} µs per request")
        print(
            f"flush to SQLite (amortised):    {await flush_cost(Path(tmp) / 'flush.sqlite3') * 1e6:6.2f} µs per request"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
