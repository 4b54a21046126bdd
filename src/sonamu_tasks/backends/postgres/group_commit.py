"""Group commit: writes from concurrent runs share one transaction, one round trip and one WAL flush.

Up to `in_flight` batches are committed at once, on separate connections: while PostgreSQL commits one,
the worker's event loop goes on running steps and the writes they produce form the next, so the two
overlap instead of taking turns. A lone write goes at once: batching costs no latency on an idle worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")

Flush = Callable[[list[Item]], Awaitable[set[str]]]
"""Commit a batch; return the keys of the items actually written (the others were fenced out)."""


class GroupCommit(Generic[Item]):
    def __init__(self, flush: Flush[Item], *, max_batch: int = 256, in_flight: int = 2) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._queue: list[tuple[str, Item, asyncio.Future[bool]]] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def submit(self, key: str, item: Item) -> bool:
        """Write `item` with the next batch; False if its fence rejected it. Flush errors are raised."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((key, item, future))
        if len(self._drains) < self._in_flight:
            task = asyncio.create_task(self._drain())
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            try:
                written = await self._flush([item for _, item, _ in batch])
            except Exception as error:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for key, _, future in batch:
                    if not future.done():
                        future.set_result(key in written)
