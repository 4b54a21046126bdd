"""Group commit: writes from concurrent runs share one transaction, one round trip and one WAL flush.

Up to `in_flight` batches are committed at once, on separate connections: while PostgreSQL commits one,
the worker's event loop goes on running steps and the writes they produce form the next, so the two
overlap instead of taking turns. A lone write goes at once: batching costs no latency on an idle worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from ..errors import BackendUnavailable

Item = TypeVar("Item")

Flush = Callable[[list[Item]], Awaitable[set[str]]]
"""Commit a batch; return the keys of the items actually written (the others were fenced out)."""


class GroupCommit(Generic[Item]):
    def __init__(self, flush: Flush[Item], *, max_batch: int = 256, in_flight: int = 2) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._queue: list[tuple[str, Item, asyncio.Future[bool]]] = []
        self._draining = 0  # drains running; counted down by the drain itself, never by a done-callback
        self._drains: set[asyncio.Task[None]] = set()  # strong references, so no drain is collected mid-way

    async def submit(self, key: str, item: Item) -> bool:
        """Write `item` with the next batch; False if its fence rejected it. Flush errors are raised."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((key, item, future))
        if self._draining < self._in_flight:
            self._draining += 1
            task = asyncio.create_task(self._drain())
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
                    await self._commit(batch)
                except BaseException:  # cancelled: no submitter may wait forever
                    for _, _, future in batch:
                        future.cancel()
                    raise
        finally:
            self._draining -= 1

    async def _commit(self, batch: list[tuple[str, Item, asyncio.Future[bool]]]) -> None:
        try:
            written = await self._flush([item for _, item, _ in batch])
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
            _settle(batch, written=written)


def _settle(
    batch: list[tuple[str, Item, asyncio.Future[bool]]],
    *,
    written: set[str] | None = None,
    error: BaseException | None = None,
) -> None:
    for key, _, future in batch:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(written is not None and key in written)
