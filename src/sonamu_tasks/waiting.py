"""Waiting on an event with a timeout, safely on Python 3.11.

`asyncio.wait_for(event.wait(), t)` on 3.11 can swallow a cancellation that arrives as the event fires
(CPython gh-86296): the task then never stops. `asyncio.timeout` does not have that flaw.
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger("sonamu_tasks")


async def wait_for_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True if it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(task: asyncio.Task[None], *, timeout: float = 5.0) -> None:
    """Cancel a background loop and wait for it, but never hang a shutdown on a loop that will not end."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        logger.warning("background task %s did not stop within %.0fs; leaving it", task.get_name(), timeout)
        return
    if not task.cancelled() and task.exception() is not None:
        logger.warning("background task %s ended with %r", task.get_name(), task.exception())


async def stop_gently(task: asyncio.Task[None] | None, *, timeout: float = 5.0) -> None:
    """Wait for a loop that was told to stop (its flag set, its wake-up event set) to end by itself, and
    cancel it only past `timeout`: a cancel that lands inside a database call can be absorbed there."""
    if task is None:
        return
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        await cancel_and_wait(task)
