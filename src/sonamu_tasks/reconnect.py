"""Riding out a database that went away (guarantee 7): retry with backoff instead of failing runs."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from .errors import BackendUnavailable

T = TypeVar("T")
logger = logging.getLogger("sonamu_tasks.reconnect")

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 5.0
# A call made at its deadline still gets this long for a connection (one ready in the pool is taken at once).
LAST_CHANCE_S = 0.05

# When the call in progress gives up (time.monotonic()), None without a deadline. Read by a backend for the
# wait for a pooled connection (`connection_wait`): one wait for the pool would otherwise outlast the deadline
# by the pool's whole timeout (30 s), since the deadline is only looked at between attempts.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("sonamu_tasks_deadline", default=None)


async def until_available(call: Callable[[], Awaitable[T]], *, what: str, give_up_after_s: float | None = None) -> T:
    """Call `call` until the backend answers; BackendUnavailable is retried with exponential backoff.

    Every backend method is safe to repeat, so a call whose answer was lost can be made again. With
    `give_up_after_s`, BackendUnavailable is raised by then: the wait for a connection is bounded by the time
    left (a statement already running is not interrupted: whether it committed would be unknown).
    """
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after_s is None else loop.time() + give_up_after_s
    delay = FIRST_DELAY_S
    while True:
        try:
            if deadline is None:
                return await call()
            with _giving_up_at(time.monotonic() + (deadline - loop.time())):
                return await call()
        except BackendUnavailable as error:
            if deadline is not None and loop.time() + delay > deadline:
                # Named for what the caller asked (the backend's message names its own internal call).
                raise BackendUnavailable(
                    f"could not {what}: the database did not answer within {give_up_after_s:g}s ({error})"
                ) from error
            logger.warning("%s: %s; retrying in %.2fs", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)


@contextlib.contextmanager
def _giving_up_at(at: float) -> Iterator[None]:
    """The deadline of the calls inside (the earlier one when calls nest)."""
    outer = _deadline.get()
    token = _deadline.set(at if outer is None else min(at, outer))
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline() -> float | None:
    """When the call in progress gives up (time.monotonic()), None without a deadline."""
    return _deadline.get()


@contextlib.contextmanager
def giving_up_at(at: float | None) -> Iterator[None]:
    """The calls inside give up at `at` (a time.monotonic()), or at the current deadline if sooner; None: no
    deadline of their own. For a task that serves other calls (a group commit's batch) and carries theirs."""
    if at is None:
        yield
        return
    with _giving_up_at(at):
        yield


def connection_wait(limit_s: float) -> float:
    """How long the call in progress may wait for a connection: `limit_s` (the pool's timeout), or less when
    its caller gives up sooner."""
    at = _deadline.get()
    if at is None:
        return limit_s
    return max(LAST_CHANCE_S, min(limit_s, at - time.monotonic()))


def without_deadline() -> contextvars.Context:
    """The current context without a caller's deadline: for a task that serves many callers (a group commit's
    batch), which one caller's deadline must not cut short."""
    context = contextvars.copy_context()
    context.run(_deadline.set, None)
    return context
