"""One request's record, filled in along the path and handed to listeners at the end.

Authentication, limits and the proxy each write what they learn; metrics, the
audit log and token accounting read it once the response is finished. It holds
no credential and no prompt text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .usage import Usage


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    path: str
    client_ip: str = ""
    principal: str = ""
    model: str = ""
    stream: bool = False
    status: int = 0
    # Coarse outcome: ok | rejected (the gateway refused it) | client_disconnect | upstream_error.
    outcome: str = "ok"
    # Why, in a word from a small fixed set (a metric label): e.g. invalid_json, body_too_large,
    # not_ready, connect, timeout, midstream; later stages add invalid_api_key, ip_denied, rate_limit_requests...
    reason: str = ""
    usage: Usage | None = None
    # For the token estimate when a response ends without usage (see limits.middleware.tokens_used):
    # the request's max_tokens / max_completion_tokens, and the stream events forwarded so far.
    max_tokens: int | None = None
    events: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_byte: float | None = None
    finished: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started


Listener = Callable[[Exchange], None]

# Scope key: headers a stage before the proxy wants on the response (e.g. x-ratelimit-*).
RESPONSE_HEADERS = "bastion.response_headers"
