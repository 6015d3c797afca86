"""One request's typed context, filled in along the path and handed to listeners at the end.

Authentication, limits and the proxy each write what they learn here (never in
string scope keys); metrics, the audit log and token accounting read it once the
response is finished. It holds no credential and no prompt text.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from .asgi import Scope
from .auth.identity import Principal
from .budget.ledger import EarlyReservation
from .usage import Usage

_SCOPE_KEY = "bastion.exchange"  # the one key the gateway puts in an ASGI scope


class Outcome(StrEnum):
    OK = "ok"
    REJECTED = "rejected"  # the gateway refused it
    CLIENT_DISCONNECT = "client_disconnect"
    UPSTREAM_ERROR = "upstream_error"


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    path: str
    # The enabled route this request matched (its template, e.g. "/v1/models/{model}"), set by routes.RouteGuard:
    # a bounded value, so a metric label as it is.
    route: str = ""
    client_ip: str = ""
    principal: Principal | None = None
    model: str = ""
    engine: str = ""  # the replica the proxy forwarded to last, "<model>/<index>" (engine.router.Backend.label)
    stream: bool = False  # the response is a stream (its content type); until then, whether the request asks
    status: int = 0
    outcome: Outcome = Outcome.OK
    # Why, in a word from a small fixed set (a metric label): e.g. invalid_json, body_too_large,
    # not_ready, connect, timeout, midstream; later stages add invalid_api_key, ip_denied, rate_limit_requests...
    reason: str = ""
    usage: Usage | None = None
    # Read from the request body (request_body.InspectBody), for the tokens reserved at admission and the
    # estimate charged when a response ends without usage (accounting.charge): prompt tokens estimated from
    # the bytes received, the most completion tokens it may generate, and whether the gateway asked for
    # the usage event itself (so the proxy hides it). Then the stream events forwarded so far.
    usage_added: bool = False
    prompt_estimate: int = 0
    completion_cap: int = 0
    priority: int | None = None
    background: bool = False  # a Responses API `background: true`: it generates after its response ends
    # Whether the request may have reached the engine: set (`sent`) the moment the HTTP client hands it to an
    # upstream connection, cleared again by a failure that proves it did not (reset unread, body not taken). A
    # request answered before (refused, left in the fair queue or while waiting for an upstream connection) never
    # was: `accounting.charge` charges it nothing.
    forwarded: bool = False
    events: int = 0
    # The prompt's tokens as the engine that served it counted them (`POST /tokenize`), asked by the proxy on
    # its way out when no usage was read (the client left, the engine broke mid-stream): `accounting.charge`
    # charges it instead of `prompt_estimate`. None: not asked, or the engine could not say.
    prompt_counted: int | None = None
    # Called once the engine is done with the request and before the gateway's own work after it (the prompt
    # count): the fair queue gives its place in the gate back then, not when its stage returns. None: no gate.
    engine_done: Callable[[], None] | None = None
    usage_estimated: bool = False  # a 2xx that ended without usage, charged a conservative estimate
    # Headers a stage before the proxy wants on the response (e.g. x-ratelimit-*).
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Work a stage issued as the request ended and left for the gateway to await once every stage has returned
    # (a budget settle already queued on the shared Redis connection: the limiter's settle, issued by the stage
    # around it, joins the same write). Each handles its own failure; the request is not over until they are.
    deferred: tuple[Awaitable[None], ...] = ()  # (a tuple: a list's default_factory costs ~150 ns per request)
    # The budget reservation issued with the limiter's last Redis write, until the budget stage claims it.
    early_budget: EarlyReservation | None = None
    started: float = field(default_factory=time.perf_counter)
    first_byte: float | None = None
    finished: float | None = None

    @property
    def principal_name(self) -> str:
        return self.principal.name if self.principal is not None else ""

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started

    def attach(self, scope: Scope) -> None:
        scope[_SCOPE_KEY] = self

    def sent(self) -> None:
        """The HTTP client handed the request to an upstream connection (`Pool.open`'s `on_sent`)."""
        self.forwarded = True


def exchange_of(scope: Scope) -> Exchange:
    """The context of a `/v1` request (the gateway attaches one to every such scope)."""
    exchange: Exchange = scope[_SCOPE_KEY]  # typed by assignment: `typing.cast` is a Python call per request
    return exchange


def find_exchange(scope: Scope) -> Exchange | None:
    """The context if there is one: stages shared with the admin routes, which have none."""
    exchange: Exchange | None = scope.get(_SCOPE_KEY)
    return exchange


Listener = Callable[[Exchange], None]
