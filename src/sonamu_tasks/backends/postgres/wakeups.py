"""Wake-ups sent after the commit: "a run of these workflows is due", coalesced per process.

A NOTIFY inside the transaction that inserts a run makes that commit take PostgreSQL's notification queue lock
until its WAL flush, serializing every producer's commit (see migrations/0013_notify_after_commit.sql). Here the
inserting process notifies after its commit instead: at most one NOTIFY of its own in flight, carrying every
workflow whose runs were committed since the previous one started.

Two payloads: "a:" + workflow for new runs, which workers claim after `listen_delay` (batching claims under
load), and "w:" + workflow for waiting runs woken (by a message or an event), which they claim at once
(migrations/0017_woken_runs_notify_urgently.sql).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator

from ...reconnect import without_deadline

logger = logging.getLogger("sonamu_tasks.postgres")

Send = Callable[[list[str]], Awaitable[None]]
"""Send one NOTIFY transaction with these payloads."""


class Wakeups:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._due: set[str] = set()  # payloads
        self._sender: asyncio.Task[None] | None = None
        self._turn = False  # a caller's statement carries the NOTIFY (turn)

    def runs_due(self, workflows: Iterable[str]) -> None:
        """New runs of `workflows` are committed and due now: wake the workers (call after the commit returned)."""
        self._due.update(f"a:{name}" for name in workflows)
        self._start()

    def runs_woken(self, workflows: Iterable[str]) -> None:
        """Waiting runs of `workflows` were made due now (committed): wake the workers to claim them at once."""
        self._due.update(f"w:{name}" for name in workflows)
        self._start()

    @contextlib.contextmanager
    def turn(self, wanted: bool = True) -> Iterator[bool]:
        """Around a statement that may carry the NOTIFY itself (no extra round trip): True when it should, that
        is when it is `wanted` and no NOTIFY of this process is in flight. Meanwhile `runs_due` and
        `runs_woken` only gather; what they gathered is sent once the turn is over. False: the caller reports
        what it made due with them after its commit."""
        if not wanted or self._sender is not None or self._turn:
            yield False
            return
        self._turn = True
        try:
            yield True
        finally:
            self._turn = False
            self._start()

    def _start(self) -> None:
        if self._due and self._sender is None and not self._turn:
            # Sends for every run() call since: no one caller's deadline (reconnect.py) applies.
            self._sender = asyncio.create_task(self._drain(), name="sonamu-wakeups", context=without_deadline())

    async def _drain(self) -> None:
        # The sender is cleared in the same step as the last look at the set (no await between them): a name
        # added after that look finds no sender and starts one, so none is stranded.
        try:
            while self._due:
                payloads, self._due = sorted(self._due), set()
                try:
                    await self._send(payloads)
                except Exception as error:  # the workers' polling finds these runs (the safety net)
                    logger.warning("could not notify workers (%s): %s", ", ".join(payloads), error)
        finally:
            self._sender = None

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait for the NOTIFYs still to send (before the pool closes), at most `timeout` seconds."""
        if self._sender is not None:
            await asyncio.wait({self._sender}, timeout=timeout)  # the drain logs its own errors
