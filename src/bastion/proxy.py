"""The hot path: a plain ASGI callable that streams `/v1/*` to the upstream.

Bytes go through untouched and unbuffered. The only edits are on the way in:
the client's credentials are replaced by the gateway's internal upstream key, and
the body is the one `request_body.InspectBody` passed on (with
`stream_options.include_usage` added where the gateway asked for usage itself; that
usage event is removed again on the way out, so the client sees the stream it asked
for). Whether a response is a stream is decided by its content type, and its usage is
read as it passes (`usage.py`), wherever it sits in the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable

from .accounting import estimates_prompt
from .asgi import BodyWriter, ClientGone, DisconnectWatch, Receive, Scope, Send, read_body
from .auth.errors import refusal
from .auth.identity import Principal, filter_model_list
from .context import Exchange, Outcome, exchange_of
from .engine.catalog import Card, ModelCatalog
from .engine.prompt_count import COUNTED_ROUTES, PromptCounter
from .engine.router import Backend, EngineGroup, Router
from .engine.state import Phase
from .errors import GatewayError, send_error, upstream_failure
from .http.client import Client
from .http.http1 import (
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    HTTPError,
    ReadTimeout,
    Response,
    WriteTimeout,
)
from .usage import EVENT_END, USAGE_KEY, BodyUsage, StreamTap

log = logging.getLogger("bastion.proxy")

# RFC 9110 §7.6.1: fields meant for one connection only, never forwarded (nor is any field the
# `Connection` header names). proxy-connection and keep-alive are its legacy ones.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# What a client claims about where its request came from: replaced by the one address bastion decided
# (`x-forwarded-for: <client_ip>`), so the upstream (and its logs, and vLLM's own proxy-header handling)
# never sees a client's word for it.
_FORWARDED = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
    }
)
# Never forwarded upstream: the client's credentials, what the transport recomputes, and its
# Accept-Encoding (bastion asks for `identity`: it reads some bodies, e.g. the /v1/models list).
_DROP_REQUEST = (
    HOP_BY_HOP
    | _FORWARDED
    | {
        b"host",
        b"authorization",
        b"content-length",
        b"expect",
        b"x-request-id",
        b"accept-encoding",
    }
)
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close"})  # what clients send; neither names a field
# Never passed back: what our own server sets (date, server) or we set (x-request-id).
_DROP_RESPONSE = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}
_SSE = b"text/event-stream"
# Encoded dots and separators, and backslashes, in any case: one search instead of lowering and four scans.
_FORBIDDEN_IN_PATH = re.compile(rb"%2[ef]|%5c|\\", re.IGNORECASE)
# Failures that may have reached the engine and cost it time: not sent again elsewhere.
_NOT_RETRIED = (ReadTimeout, WriteTimeout)
# Failures that say the upstream never took the request: refused, or reset unread. An exiting server's
# connections can close before its listener does (Linux 6.18: 264 of 300 tries), so a request sent just
# after the one that died with it is accepted into the dying listener's backlog, then reset.
_NOT_TAKEN = (ConnectError, ConnectionReset)
# Failures that prove the engine never had the whole request: no connection (refused, timed out, none free in
# the pool: then nothing was sent at all), reset unread, or a body it did not read in time. Any other (a read
# timeout waiting for the response head above all) came after the request was written: the engine may be
# generating it.
_NEVER_SENT = (ConnectError, ConnectTimeout, ConnectionReset, WriteTimeout)
# A server error's head, before any byte went to the client, is tried once on another replica: a 503 from a
# replica not ready (yet), and the 500 vLLM's API server answers for the second or so between its engine core
# dying (EngineDeadError) and its own exit. Once is the bound: a request that itself makes engines fail costs two.
_RETRIED_STATUSES = frozenset({500, 502, 503, 504})


class UpstreamBroke(Exception):
    """The upstream failed after the response had started: the connection is aborted."""


class Proxy:
    """`catalog` answers `GET /v1/models` when engines are named (BASTION_ENGINES); without one,
    bastion lists the engines' names itself (tests that build a proxy by hand). `counter` asks the engine how
    many tokens a prompt was when its usage was never read (the client left, the engine broke mid-stream);
    without one, such a prompt is charged its estimate from the bytes."""

    def __init__(
        self,
        router: Router,
        client: Client,
        *,
        methods: Iterable[str],
        catalog: ModelCatalog | None = None,
        counter: PromptCounter | None = None,
    ) -> None:
        self._router = router
        self._client = client
        self._catalog = catalog
        self._counter = counter
        self._created = int(time.time())
        self._methods = frozenset(m.upper() for m in methods)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        try:
            await self._handle(scope, receive, send, exchange)
        except GatewayError as error:
            exchange.status = error.status
            if exchange.outcome is Outcome.OK:
                exchange.outcome = Outcome.UPSTREAM_ERROR if error.status in (502, 504) else Outcome.REJECTED
                exchange.reason = exchange.reason or error.resolved_code
            await send_error(send, error, _our_headers(scope, exchange))

    async def _handle(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        if scope["method"] not in self._methods:
            raise GatewayError(405, f"Method {scope['method']} is not allowed here.")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not _safe_path(scope["path"], raw_path):
            raise GatewayError(404, "Unknown route.")
        if self._router.named and scope["method"] == "GET":
            path = scope["path"]
            if path == "/v1/models":
                # Every model's entry, whichever engines are ready: never a 503 because the first one is not.
                await self._send_model_list(send, exchange, exchange.principal, _our_headers(scope, exchange))
                return
            if path.startswith("/v1/models/"):
                # One model's card, from the engine serving it: forwarded, it went to the first engine, whatever
                # the model (another engine's answer, never this model's card).
                await self._send_model_card(send, exchange, path[len("/v1/models/") :], _our_headers(scope, exchange))
                return
        group = self._router.group(exchange.model)
        if group is None:
            raise GatewayError(404, f"The model {exchange.model!r} does not exist.", code="model_not_found")
        if not group.ready:
            raise group.not_ready_error()
        try:
            # Read, bounded and inspected, by the stage before the limits (request_body.InspectBody).
            content = await read_body(receive, sys.maxsize)
        except ClientGone:
            exchange.outcome = Outcome.CLIENT_DISCONNECT
            return
        principal = exchange.principal
        restricted = principal is not None and principal.models is not None and scope["method"] == "GET"
        if restricted and scope["path"].startswith("/v1/models/"):
            assert principal is not None
            if not principal.allows(scope["path"][len("/v1/models/") :]):
                raise refusal("model_not_allowed")

        target = raw_path + b"?" + scope["query_string"] if scope.get("query_string") else raw_path
        ours = _our_headers(scope, exchange)
        watch = DisconnectWatch(scope, receive)
        response: Response | None = None
        backend: Backend | None = None
        completed = False
        broke: UpstreamBroke | None = None
        try:
            backend, response = await self._open(scope, exchange, group, target, content)
            if restricted and scope["path"] == "/v1/models":
                completed = await self._relay_model_list(response, send, exchange, principal, ours)
            else:
                completed = await self._relay(response, send, exchange, watch, ours)
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
            exchange.outcome = Outcome.CLIENT_DISCONNECT
        except UpstreamBroke as exc:
            broke = exc  # raised again once the prompt is counted
        finally:
            watch.finish()
            if response is not None:
                # A finished response returns its connection to the pool; anything else closes it,
                # which is what makes vLLM abort a generation nobody will read.
                if completed:
                    response.release()
                else:
                    response.close()
            if backend is not None:
                backend.release()
        if exchange.usage is None and exchange.forwarded and exchange.route in COUNTED_ROUTES:
            await self._count_prompt(exchange, group, content)
        if broke is not None:
            raise broke

    async def _count_prompt(self, exchange: Exchange, group: EngineGroup, content: bytes) -> None:
        """No usage was read: the engine that served the request counts its prompt, for `accounting.charge`.

        The client is gone (or the response is over) by now: the wait, at most the counter's timeout, delays
        only this request's settle and the release of its key's concurrency slot. Its replica is released.
        """
        counter = self._counter
        if counter is None or exchange.background or not estimates_prompt(exchange):
            return
        # The replica it went to last (`Exchange.engine`): a client that left before the response head never
        # let `_open` hand its backend back. A restarted replica's new engine serves the same model.
        served = next((r.backend for r in group.replicas if r.backend.label == exchange.engine), None)
        if served is not None:
            if exchange.engine_done is not None:
                exchange.engine_done()  # the engine is done with it: its place in the fair queue's gate goes back
            exchange.prompt_counted = await counter.count(
                served.upstream, exchange.route, content, exchange.model, exchange.request_id
            )

    async def _open(
        self, scope: Scope, exchange: Exchange, group: EngineGroup, target: bytes, content: bytes
    ) -> tuple[Backend, Response]:
        """The forward step: choose a replica, open the request there; a failure before the response's
        first byte (refused, the engine died, a 5xx head: not ready, or its engine core dead) is retried once on
        another replica. The returned backend is counted in: the caller releases it."""
        router = self._router
        affinity = router.affinity(scope["headers"], content) if len(group.replicas) > 1 else None
        backend = router.acquire(group, affinity)
        if backend is None:
            raise group.not_ready_error()
        headers = self._upstream_headers(scope, exchange)
        for attempt in (0, 1):
            exchange.engine = backend.label
            upstream = backend.upstream
            sent = headers
            if upstream.api_key:
                sent = [*headers, (b"authorization", b"Bearer " + upstream.api_key.encode())]
            try:  # forwarded once the client hands the bytes over, unless a failure proves the engine never had them
                response = await self._client.open(
                    scope["method"], upstream.base_url, target, sent, content, on_sent=exchange.sent
                )
            except asyncio.CancelledError:
                backend.release()  # the client left waiting for the head: the caller never gets this backend
                raise
            except HTTPError as exc:
                if isinstance(exc, _NEVER_SENT):
                    exchange.forwarded = False
                other = None if attempt or isinstance(exc, _NOT_RETRIED) else router.acquire(group, affinity, backend)
                backend.release()
                if other is None:
                    if isinstance(exc, _NOT_TAKEN) and upstream.phase is not Phase.EXTERNAL:
                        # Our own child refuses connections, or resets them with the request unread: it is
                        # exiting (its exit not noticed yet) or restarting, and never took this request.
                        # That is "not ready, retry shortly", the 503 the next request gets, not a 502.
                        raise upstream.not_ready_error() from exc
                    raise upstream_failure(exc) from exc
                log.info("request %s: %s failed before a byte (%s); retried on %s", exchange.request_id,
                         backend.label, exc, other.label)  # fmt: skip
                backend = other
                continue
            if response.status in _RETRIED_STATUSES and not attempt:
                other = router.acquire(group, affinity, backend)
                if other is not None:  # not ready (yet), or its engine died under its API server: the other answers
                    log.info("request %s: %s answered %d before a byte; retried on %s", exchange.request_id,
                             backend.label, response.status, other.label)  # fmt: skip
                    response.close()
                    backend.release()
                    backend = other
                    continue
            return backend, response
        raise AssertionError("unreachable")  # the second attempt returns or raises

    def _upstream_headers(self, scope: Scope, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        headers = [(name, value) for name, value in raw if name not in _DROP_REQUEST]
        for name, value in raw:
            # Fields the client's Connection header names are hop-by-hop too (`keep-alive`/`close` name none).
            if name == b"connection" and value.lower() not in _CONNECTION_OPTIONS:
                named = {token.strip().lower() for token in value.split(b",")}
                headers = [(k, v) for k, v in headers if k not in named]
        headers.append((b"accept-encoding", b"identity"))
        if exchange.client_ip:
            headers.append((b"x-forwarded-for", exchange.client_ip.encode()))
        headers.append((b"x-request-id", exchange.request_id.encode()))
        return headers

    async def _relay(
        self,
        response: Response,
        send: Send,
        exchange: Exchange,
        watch: DisconnectWatch,
        ours: list[tuple[bytes, bytes]],
    ) -> bool:
        """Stream the response back; True if it was read to the end.

        An event stream is pushed (`Response.push_to`): each chunk goes from the upstream's
        `data_received` through the tap straight to the client's connection (the server's `BodyWriter`):
        measured 5-7 µs (10-12 %) of CPU less per paced chunk than a task wake-up and an ASGI `send`
        each, and half the TTFT added at c=32 (docs/benchmarks.md). What is not pushed (the first
        bytes, bytes a slow client cannot take now) is read and sent below, as any other body.
        """
        headers: list[tuple[bytes, bytes]] = []
        is_sse = False
        for name, value in response.headers:
            if name in _DROP_RESPONSE:
                continue
            if name == b"content-type" and value.startswith(_SSE):
                is_sse = True
            headers.append((name, value))
        headers += ours
        tap: StreamTap | None = None
        reader: BodyUsage | None = None
        exchange.stream = is_sse  # what the response is decides, not what the request said
        if is_sse:
            tap = StreamTap(strip_usage=exchange.usage_added)
            headers = [h for h in headers if h[0] != b"content-length"]
            headers.append((b"x-accel-buffering", b"no"))
        elif 200 <= response.status < 300:
            reader = BodyUsage()
        exchange.status = response.status
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        writer = watch.body_writer(send) if tap is not None else None
        if tap is not None and writer is not None:
            response.push_to(_pusher(tap, exchange, writer))

        body = b""  # what goes out with the end of the response
        try:
            while chunk := await response.read_some():
                if exchange.first_byte is None:
                    exchange.first_byte = time.perf_counter()
                # Usually the upstream's last bytes arrive with its end marker: they then go out with
                # ours in one write, not as a chunk followed by an empty one (one syscall per response).
                ended = response.complete
                if tap is not None:
                    chunk = tap.feed(chunk) + (tap.flush() if ended else b"")
                    exchange.events += chunk.count(tap.event_end)
                elif reader is not None:
                    reader.feed(chunk, last=ended)
                if ended:
                    body = chunk
                    break
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                body = tap.flush() if tap is not None else b""
        except HTTPError as exc:
            exchange.outcome, exchange.reason = Outcome.UPSTREAM_ERROR, "midstream"
            if tap is None:
                # Status and headers are out: the only honest signal left is a closed connection.
                if watch.abort_connection():
                    log.warning(
                        "request %s: the upstream failed mid-response (%s); connection closed", exchange.request_id, exc
                    )
                    return False
                raise UpstreamBroke("upstream failed mid-response") from exc
            await self._end_stream_with_error(send, tap, watch, upstream_failure(exc))
            return False
        watch.finish()
        await send({"type": "http.response.body", "body": body, "more_body": False})
        if tap is not None:
            exchange.usage = tap.usage
        elif reader is not None:
            exchange.usage = reader.finish()
        return True

    async def _relay_model_list(
        self,
        response: Response,
        send: Send,
        exchange: Exchange,
        principal: Principal | None,
        ours: list[tuple[bytes, bytes]],
    ) -> bool:
        """`GET /v1/models` for a principal with a model allowlist: only the models it may use.

        The only response the gateway parses; unrestricted principals get the upstream's bytes.
        """
        try:
            body = await response.read()
        except HTTPError as exc:
            raise upstream_failure(exc) from exc
        if response.status == 200 and principal is not None:
            body = filter_model_list(body, principal)
        drop = _DROP_RESPONSE | {b"content-length", b"content-encoding"}
        headers = [(k, v) for k, v in response.headers if k not in drop]
        headers += [(b"content-length", str(len(body)).encode()), *ours]
        exchange.status = response.status
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return True

    async def _cards(self) -> list[Card]:
        """One card per model group, as its engine wrote it (`engine.catalog`), or made here without a catalog
        (tests that build a proxy by hand)."""
        if self._catalog is not None:
            return await self._catalog.cards()
        return [
            {"id": g.name, "object": "model", "created": self._created, "owned_by": "bastion"}
            for g in self._router.groups
        ]

    async def _send_model_list(
        self, send: Send, exchange: Exchange, principal: Principal | None, ours: list[tuple[bytes, bytes]]
    ) -> None:
        """`GET /v1/models` with several engines: one card per model group, filtered for the principal (each
        engine serves the one model it is named for)."""
        data = [card for card in await self._cards() if principal is None or principal.allows(card["id"])]
        exchange.status = 200
        await _send_json(send, {"object": "list", "data": data}, ours)

    async def _send_model_card(
        self, send: Send, exchange: Exchange, name: str, ours: list[tuple[bytes, bytes]]
    ) -> None:
        """`GET /v1/models/{model}` with several engines: the model's card as `GET /v1/models` lists it, or 404.
        (A restricted principal asking for a model not its own was refused by the route guard.)"""
        card = next((card for card in await self._cards() if card["id"] == name), None)
        if card is None:
            raise GatewayError(404, f"The model {name!r} does not exist.", code="model_not_found")
        exchange.model, exchange.status = name, 200
        await _send_json(send, card, ours)

    async def _end_stream_with_error(
        self, send: Send, tap: StreamTap, watch: DisconnectWatch, error: GatewayError
    ) -> None:
        """Close a broken stream with an error event, as vLLM does, so SDKs raise instead of hanging."""
        event = json.dumps(error.payload(), separators=(",", ":")).encode()
        body = tap.flush() + b"data: " + event + b"\n\n"
        watch.finish()
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(send: Send, payload: object, ours: list[tuple[bytes, bytes]]) -> None:
    """A 200 answered by the gateway itself: `payload` as compact JSON, with the gateway's own headers."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *ours]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _pusher(tap: StreamTap, exchange: Exchange, writer: BodyWriter) -> Callable[[bytes, bytes | None], bool]:
    """The sink a pushed event stream's bytes go to: the tap, then the client's connection; False if it cannot
    now (the bytes then wait for the relay's task). A read of whole chunks comes with its framing (`framed`):
    when the tap would pass it whole (`StreamTap`'s rule, checked here inline: this runs for every token), it
    is written as it came, since the client's response is chunked the same way."""
    writable, write, write_framed = writer.writable, writer.write, writer.write_framed

    def push(data: bytes, framed: bytes | None) -> bool:
        if framed is not None and not tap.held and data.endswith(EVENT_END) and USAGE_KEY not in data:
            if not write_framed(framed):
                return False
            events = data.count(EVENT_END)
        else:
            if not writable():
                return False
            out = tap.feed(data)
            if out:
                write(out)
            events = out.count(tap.event_end)  # a CRLF stream comes this way: its chunks end with b"\r\n"
        if exchange.first_byte is None:
            exchange.first_byte = time.perf_counter()
        exchange.events += events
        return True

    return push


def _our_headers(scope: Scope, exchange: Exchange) -> list[tuple[bytes, bytes]]:
    """What the gateway adds to every response: the request id, and the x-ratelimit-* headers the
    limiter left in the scope (so no stage has to wrap `send` for every chunk)."""
    return [(b"x-request-id", exchange.request_id.encode()), *exchange.response_headers]


def _safe_path(path: str, raw_path: bytes) -> bool:
    """Refuse dot segments and encoded separators that an upstream might normalise away."""
    if "/." in path and any(segment in (".", "..") for segment in path.split("/")):
        return False
    if b"%" not in raw_path and b"\\" not in raw_path:  # nothing the pattern could match: not searched
        return True
    return _FORBIDDEN_IN_PATH.search(raw_path) is None
