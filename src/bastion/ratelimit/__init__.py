"""Rate limits: requests/min, tokens/min and concurrent requests (see docs/rate-limits.md)."""

from .limiter import Admission, LimitedPrincipal, RateLimited, RateLimiter, RedisCollector, reset_duration
from .middleware import RateLimitMiddleware

__all__ = [
    "Admission",
    "LimitedPrincipal",
    "RateLimitMiddleware",
    "RateLimited",
    "RateLimiter",
    "RedisCollector",
    "reset_duration",
]
