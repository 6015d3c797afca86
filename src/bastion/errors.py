"""OpenAI-shaped errors: the one place that knows the envelope.

Every status the gateway produces itself uses
`{"error": {"message", "type", "param", "code"}}`, so the `openai` SDK raises the
matching exception class (AuthenticationError for 401, RateLimitError for 429, ...).
Messages are fixed strings chosen here or by the caller; they never echo a credential.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import httpx

from . import http
from .asgi import Send

# status -> (type, default code)
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("upstream_error", "upstream_unavailable"),
    503: ("service_unavailable", "upstream_not_ready"),
    504: ("timeout_error", "upstream_timeout"),
}

Headers = list[tuple[bytes, bytes]]


class GatewayError(Exception):
    """An error the gateway answers itself, already decided down to the status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = list(headers)

    @property
    def resolved_code(self) -> str:
        """The code clients see: the one given, or the status's default."""
        return self.code or _kind(self.status)[1]

    def payload(self) -> dict[str, dict[str, str | None]]:
        return error_payload(self.status, self.message, code=self.code, param=self.param)


def _kind(status: int) -> tuple[str, str]:
    """(type, default code) for a status the gateway answers itself."""
    return _KINDS.get(status, ("server_error", "error"))


def error_payload(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    kind, default_code = _kind(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(error_payload(status, message, code=code, param=param), separators=(",", ":")).encode()


async def send_error(send: Send, error: GatewayError, extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error.payload(), separators=(",", ":")).encode()
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *error.headers,
        *extra_headers,
    ]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def upstream_failure(exc: BaseException) -> GatewayError:
    """Map a failure talking to the upstream to the status the client sees (502, 503 or 504).

    Accepts the HTTP client's exceptions and httpx's (whose cause, where it is one of ours, decides).
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None else exc
    if isinstance(cause, http.PoolTimeout | httpx.PoolTimeout):
        return GatewayError(
            503,
            "Every connection to the model server is busy; retry shortly.",
            code="upstream_busy",
            headers=[(b"retry-after", b"1")],
        )
    if isinstance(cause, http.ConnectTimeout | httpx.ConnectTimeout):
        return GatewayError(502, "The model server could not be reached in time.", code="upstream_unavailable")
    if isinstance(cause, http.ReadTimeout | http.WriteTimeout | TimeoutError | httpx.TimeoutException):
        return GatewayError(504, "The model server did not answer in time.", code="upstream_timeout")
    return GatewayError(
        502, "The model server could not be reached or failed mid-request.", code="upstream_unavailable"
    )
