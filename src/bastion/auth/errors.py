"""Why a credential was refused: a reason (metric label) and a fixed, secret-free message."""

from __future__ import annotations

from ..errors import GatewayError

# reason -> (status, code, message). The messages are fixed strings: they never echo what was sent.
_REFUSALS: dict[str, tuple[int, str, str]] = {
    "missing_credentials": (
        401,
        "invalid_api_key",
        "Missing credentials: send your API key or token as `Authorization: Bearer <key>`.",
    ),
    "invalid_api_key": (401, "invalid_api_key", "Incorrect API key provided."),
    "expired": (401, "invalid_api_key", "The API key or token has expired."),
    "revoked": (401, "invalid_api_key", "The API key has been revoked."),
    "invalid_token": (401, "invalid_api_key", "Invalid token."),
    "ip_denied": (403, "ip_not_allowed", "Requests from your network address are not allowed."),
    "model_not_allowed": (403, "model_not_allowed", "This credential may not use the requested model."),
}


class AuthFailure(Exception):
    """A refused request; `reason` is a key of `_REFUSALS`."""

    def __init__(self, reason: str) -> None:
        assert reason in _REFUSALS, reason
        super().__init__(reason)
        self.reason = reason

    def error(self) -> GatewayError:
        status, code, message = _REFUSALS[self.reason]
        return GatewayError(status, message, code=code)


def refusal(reason: str) -> GatewayError:
    return AuthFailure(reason).error()
