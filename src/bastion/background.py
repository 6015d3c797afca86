"""A coroutine run beside the request path for as long as a service lives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def background(work: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Runs `work()` while the context is open; on the way out it is cancelled and awaited."""
    task = asyncio.get_running_loop().create_task(work())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
