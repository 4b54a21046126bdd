"""Riding out a database that went away (guarantee 7): retry with backoff instead of failing runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import BackendUnavailable

T = TypeVar("T")
logger = logging.getLogger("sonamu_tasks.reconnect")

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 5.0


async def until_available(call: Callable[[], Awaitable[T]], *, what: str, give_up_after_s: float | None = None) -> T:
    """Call `call` until the backend answers; BackendUnavailable is retried with exponential backoff.

    Every backend method is safe to repeat, so a call whose answer was lost can be made again.
    """
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after_s is None else loop.time() + give_up_after_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return await call()
        except BackendUnavailable as error:
            if deadline is not None and loop.time() + delay > deadline:
                raise
            logger.warning("%s: %s; retrying in %.2fs", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
