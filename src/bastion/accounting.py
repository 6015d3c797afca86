"""What a finished request is charged: the usage the engine reported, or a conservative estimate.

Accounting follows what the engine did, never what the request claims:

- a response that carried usage is charged exactly that;
- a 2xx that ended without usage (an upstream that ignores `include_usage`, a shape no
  reader knows) is charged what was reserved for it: the prompt estimate plus the
  completion cap (or the stream events forwarded, if more), and counted as estimated;
- a response cut short (the client went away, the upstream broke mid-stream) is charged
  its prompt plus the stream events forwarded (one token each), or, not
  streamed, the completion cap: what the engine may have generated;
- wherever no usage was read, the prompt is the engine's own count (`Exchange.prompt_counted`: the proxy
  asked the engine's `POST /tokenize` on its way out) when there is one, else the estimate from the bytes
  (`len(body) // 4`, which a digit-heavy prompt, ~1 token per byte, paid a quarter of);
- a Responses API request with `background: true` (allowed by the operator) is charged its
  reservation unless its own response carried usage (a background stream the client read to
  its end): the engine answers at once and generates afterwards, and its usage only ever
  reaches a later `GET /v1/responses/{id}`. That holds once it was forwarded (`Exchange.forwarded`)
  whatever the gateway answered: a 504 because the engine's answer was late, a 502 because the
  connection broke after the request was written; closing the connection does not stop it;
- a retrieval (any GET, a `cancel` of a stored response or batch) is charged nothing, whatever
  usage its body repeats: that generation was charged by the request that made it, and a stored
  response may be fetched any number of times;
- a request whose client left before it was forwarded (waiting in the fair queue, or for a free
  upstream connection) is charged nothing, background or not: the engine never had it;
- anything refused, or failed before the upstream answered, is charged nothing (a request that
  is not background included: the gateway closes the connection, and vLLM then aborts it).
"""

from __future__ import annotations

from .context import Exchange, Outcome

# POST routes that fetch or stop what an earlier request generated: never charged, nothing reserved.
RETRIEVAL_ROUTES = frozenset({"/v1/responses/{id}/cancel", "/v1/batches/{id}/cancel"})


def retrieval(exchange: Exchange) -> bool:
    """Whether the request only fetched (or stopped) what another generated: any usage it shows is not its own."""
    return exchange.method == "GET" or exchange.route in RETRIEVAL_ROUTES


def charge(exchange: Exchange) -> tuple[int, bool]:
    """(tokens to charge, whether a 2xx ended without usage and so was charged an estimate)."""
    if retrieval(exchange):
        return 0, False
    usage = exchange.usage
    if usage is not None:
        return usage.total_tokens, False
    if not estimates_prompt(exchange):
        return 0, False  # refused, left before the engine had it, or failed before the upstream answered
    # The prompt as the engine counted it, if the proxy could ask; else as estimated from the bytes.
    prompt = exchange.prompt_estimate if exchange.prompt_counted is None else exchange.prompt_counted
    # What the engine may have generated: the prompt and its cap (or the events relayed, if more).
    reserved = _at_least_one(exchange, prompt + max(exchange.completion_cap, exchange.events))
    if exchange.outcome is Outcome.CLIENT_DISCONNECT or exchange.reason == "midstream":
        if exchange.stream and not exchange.background:  # it stopped with its stream: what was relayed
            return _at_least_one(exchange, prompt + exchange.events), False
        # Not streamed, or a background response, which goes on generating without its client: what was reserved.
        return reserved, False
    if exchange.outcome is Outcome.OK:  # a 2xx that ended without usage: charged as estimated
        return reserved, reserved > 0
    # A background response forwarded, then given up on by the gateway (its answer's head late: a 504): the
    # engine generates it anyway.
    return reserved, False


def estimates_prompt(exchange: Exchange) -> bool:
    """Whether `charge` charges this request a prompt it never read from usage (the one place that says which
    requests are charged without usage): what the engine was given may then be counted by the engine itself
    (the proxy asks, `engine.prompt_count`)."""
    if exchange.usage is not None or not exchange.forwarded or retrieval(exchange):
        return False
    if exchange.outcome is Outcome.CLIENT_DISCONNECT or exchange.reason == "midstream":
        return True
    if exchange.outcome is Outcome.OK and 200 <= exchange.status < 300:
        return True
    return exchange.background and exchange.outcome is Outcome.UPSTREAM_ERROR


def _at_least_one(exchange: Exchange, tokens: int) -> int:
    """A request with a body never costs 0 once the engine had it; one without (a GET) costs what it reported."""
    if exchange.prompt_estimate == 0 and exchange.completion_cap == 0:
        return tokens
    return max(1, tokens)
