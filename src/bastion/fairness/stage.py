"""`FairShare`: the plain-ASGI stage just before the proxy forwards, holding a request while its engine is full.

The request's engine group is `engine_name_for(exchange)`: the router's group for its model
(`groups.group_of`), so each model has a gate of its own. A request that finds
room goes straight on (no task, no future: a counter); one that does not waits in its
engine's `Gate`, watched for a client that leaves (it leaves the queue at once), and gets
an OpenAI-shaped 429 with Retry-After if its class's deadline passes or a higher class
needs its place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from ..accounting import retrieval
from ..asgi import CONNECTION_HOOK, ASGIApp, DisconnectWatch, Receive, Scope, Send
from ..context import Exchange, Outcome, exchange_of
from ..errors import GatewayError, send_error
from .classes import ClassTable
from .gate import Gate, Hold, Refused, Shed

EngineName = Callable[[Exchange], str]
_MESSAGES = {
    Shed.DEADLINE: "The model server is saturated and this request waited its priority class's limit; retry later.",
    Shed.FULL: "The model server is saturated and the gateway's queue is full; retry later.",
    Shed.EVICTED: "The model server is saturated and higher-priority requests took this request's place; retry later.",
}


class _Seat:
    """A forwarded request's place in its gate, given back once: when the proxy says the engine is done with it
    (before it counts a prompt, which may take seconds) or when the stage returns, whichever comes first."""

    __slots__ = ("_exchange", "_gate", "_hold")

    def __init__(self, gate: Gate, hold: Hold | None, exchange: Exchange) -> None:
        self._gate: Gate | None = gate
        self._hold = hold
        self._exchange = exchange

    def __call__(self) -> None:
        gate = self._gate
        if gate is None:
            return
        self._gate = None
        usage = self._exchange.usage  # what the engine generated: how fast it goes, for the backlog's lead
        gate.leave(self._hold, usage.completion_tokens if usage is not None else 0)


class FairShare:
    def __init__(
        self, app: ASGIApp, gates: Mapping[str, Gate], classes: ClassTable, engine_name_for: EngineName
    ) -> None:
        self.app = app
        self.gates = gates
        self.classes = classes
        self.engine_name_for = engine_name_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        gate = self.gates.get(self.engine_name_for(exchange)) if not retrieval(exchange) else None
        if gate is None:  # retrievals (GETs, a cancel) take no sequence of the engine's
            await self.app(scope, receive, send)
            return
        cls = self.classes.of(exchange.principal)
        if not gate.enter(cls) and not await self._queue(scope, receive, send, exchange, gate):
            return
        seat = exchange.engine_done = _Seat(gate, gate.forwarded(cls, exchange.completion_cap), exchange)
        try:
            await self.app(scope, receive, send)
        finally:
            seat()

    async def _queue(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange, gate: Gate) -> bool:
        """Wait in the gate; True once admitted, False if answered here (refused) or the client left."""
        cls = self.classes.of(exchange.principal)
        principal = exchange.principal.id if exchange.principal is not None else exchange.client_ip
        cost = exchange.prompt_estimate + exchange.completion_cap  # what the limits and budgets reserved
        # Under bastion's own server a lost connection cancels this task at once; elsewhere the class deadline
        # bounds the wait (reading `receive` here would take the body from the proxy).
        watch = DisconnectWatch(scope, receive) if scope.get(CONNECTION_HOOK) is not None else None
        try:
            await gate.wait(cls, principal, cost)
        except Refused as refused:
            exchange.status, exchange.outcome, exchange.reason = 429, Outcome.REJECTED, f"queue_{refused.reason.value}"
            error = GatewayError(
                429,
                _MESSAGES[refused.reason],
                code="engine_saturated",
                headers=[(b"retry-after", b"%d" % refused.retry_after)],
            )
            await send_error(send, error, [(b"x-request-id", exchange.request_id.encode())])
            return False
        except asyncio.CancelledError:
            if watch is None or not watch.absorb():
                raise
            exchange.outcome = Outcome.CLIENT_DISCONNECT
            return False
        finally:
            if watch is not None:
                watch.finish()
        return True
