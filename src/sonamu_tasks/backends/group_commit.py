"""Group commit: writes from concurrent callers share one transaction, one round trip and one WAL flush.

Up to `in_flight` batches are committed at once, on separate connections: while PostgreSQL commits one,
the worker's event loop goes on running steps and the writes they produce form the next, so the two
overlap instead of taking turns. A lone write goes at once: batching costs no latency on an idle worker.

Used for the checkpoints and completions of running runs (the result: whether the run's fence let the write
in) and for the inserts of `run()` calls made concurrently (the result: the run's id and whether it is new).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ..errors import BackendUnavailable
from ..reconnect import current_deadline, giving_up_at, without_deadline

Item = TypeVar("Item")
Result = TypeVar("Result")

Flush = Callable[[list[Item]], Awaitable[Sequence[Result]]]
"""Commit a batch; return one result per item, in the batch's order."""

Entry = tuple[Item, "asyncio.Future[Result]", float | None]
"""An item, its submitter's future, and when its submitter gives up (reconnect's deadline), None for never."""


class GroupCommit(Generic[Item, Result]):
    def __init__(self, flush: Flush[Item, Result], *, max_batch: int = 256, in_flight: int = 2) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._queue: list[Entry[Item, Result]] = []
        self._draining = 0  # drains running; counted down by the drain itself, never by a done-callback
        self._drains: set[asyncio.Task[None]] = set()  # strong references, so no drain is collected mid-way

    async def submit(self, item: Item) -> Result:
        """Write `item` with the next batch and return its result. Flush errors are raised."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, current_deadline()))
        if self._draining < self._in_flight:
            self._draining += 1
            # Its batches carry other callers' items: no one caller's deadline cuts their wait for a connection.
            # Each batch waits until the last of its callers' deadlines instead (see _drain).
            task = asyncio.create_task(self._drain(), context=without_deadline())
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        return await future

    async def _drain(self) -> None:
        # The count goes down in the same step as the last look at the queue: an item queued after that look
        # finds the slot free and starts a drain. (A done-callback would run a step later and strand it.)
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    # A batch's wait for a connection ends when the last of its callers gives up: none of them
                    # waits past its own deadline for the batch (run()'s 30 s during an outage), and none is
                    # cut short by another's. Any caller without a deadline: no deadline.
                    deadlines = [deadline for _, _, deadline in batch]
                    latest = None if None in deadlines else max(d for d in deadlines if d is not None)
                    with giving_up_at(latest):
                        await self._commit(batch)
                except BaseException:  # cancelled: no submitter may wait forever
                    for _, future, _ in batch:
                        future.cancel()
                    raise
        finally:
            self._draining -= 1

    async def _commit(self, batch: list[Entry[Item, Result]]) -> None:
        try:
            results = await self._flush([item for item, _, _ in batch])
        except BackendUnavailable as error:  # the database went away: every item is retried by its submitter
            _settle(batch, error=error)
        except Exception as error:
            if len(batch) == 1:
                _settle(batch, error=error)
                return
            # The database refused the batch for what one item holds (a value it cannot store, say). One run's
            # data must never fail, delay or cost an attempt to another: write each alone, and only the
            # offending one gets the error.
            for entry in batch:
                await self._commit([entry])
        else:
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def _settle(batch: list[Entry[Item, Result]], *, error: BaseException) -> None:
    for _, future, _ in batch:
        if not future.done():
            future.set_exception(error)
