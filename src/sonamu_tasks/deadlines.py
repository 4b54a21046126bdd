"""Deadlines that hold without a claim: every worker fails the pending runs whose deadline passed.

A run's `deadline` fails it with "deadline exceeded" if it has not finished by then. The claim checks it
(attempt.py, DeadlineExceeded), so does the decision to retry a failed attempt, and a parked run is due by its
deadline at the latest. A pending run that no worker claims would still wait past it: one of a version no live
worker serves (forever), one behind a full queue or key (until a slot frees). So every worker also runs a
DeadlineSweeper: about once a second it fails the pending runs of its database whose deadline passed, whatever
their workflow, version or queue (`Backend.fail_overdue_runs`), with the error the claim would have stored. The
status triggers then do what they do for any failed run: a parent waiting on it is woken, result() waiters are
told. A paused run is left alone (a person paused it; resumed, it is pending again and fails then).

Several workers sweeping the same database do not fail a run twice and never wait for each other or for a claim:
each batch takes its runs with SKIP LOCKED (PostgreSQL) or under the file's single write lock (SQLite), and only
a run still pending is failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

from .backends.base import Backend, OverdueRun
from .errors import BackendUnavailable
from .telemetry import DISABLED, Telemetry
from .waiting import stop_gently, wait_for_event

logger = logging.getLogger("sonamu_tasks.deadlines")

SWEEP_EVERY_S = 1.0
"""How often each worker looks for overdue runs. A deadline is given in seconds or more, so a run failing within
about a second of it keeps the promise; a look finding nothing costs one probe of an index that holds only pending
runs with a deadline (no write on PostgreSQL, a read without the write lock on SQLite), so even many workers
looking every second cost the database next to nothing beside their claims."""

BATCH_SIZE = 100
"""Runs failed per statement: a short transaction, whatever the backlog of overdue runs."""

MAX_BACKOFF_S = 60.0
"""The longest wait after a look that failed for an unexpected reason (a bug would otherwise log every second)."""


class DeadlineSweeper:
    """One worker's loop failing overdue pending runs; `on_failed` is told of each batch failed."""

    def __init__(
        self,
        backend: Backend,
        on_failed: Callable[[Sequence[OverdueRun]], None],
        *,
        telemetry: Telemetry = DISABLED,
        every_s: float = SWEEP_EVERY_S,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.backend = backend
        self.on_failed = on_failed
        self.telemetry = telemetry
        self.every_s = every_s
        self.batch_size = batch_size
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sonamu-deadlines")

    async def stop(self) -> None:
        # A flag, not only a cancel: a pass ends after its current batch.
        self._stopping = True
        self._wake.set()
        await stop_gently(self._task)
        self._task = None

    async def sweep(self) -> int:
        """Fail every pending run whose deadline passed, a batch at a time; how many were failed."""
        total = 0
        while not self._stopping:
            began = time.monotonic()
            failed = await self.backend.fail_overdue_runs(self.batch_size)
            if failed:
                total += len(failed)
                self.telemetry.overdue_failed([run.workflow_name for run in failed])
                logger.warning(
                    "deadline exceeded: failed %d pending run(s) not claimed by their deadline (%s)",
                    len(failed),
                    _by_version(failed),
                )
                self.on_failed(failed)
            if len(failed) < self.batch_size:
                break
            # A long backlog of overdue runs: as much time for claims and checkpoints as for each batch.
            await wait_for_event(self._wake, time.monotonic() - began)
        return total

    async def _loop(self) -> None:
        backoff = self.every_s
        while not self._stopping:
            await wait_for_event(self._wake, backoff)
            if self._stopping:
                break
            try:
                await self.sweep()
                backoff = self.every_s
            except BackendUnavailable as error:  # the claim loop reports the outage; look again next time
                logger.debug("overdue runs not looked for: %s", error)
            except Exception:
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                logger.exception("looking for overdue runs failed; trying again in %.0fs", backoff)


def _by_version(runs: Sequence[OverdueRun]) -> str:
    """`send_invoice@1: 2, report@3: 1`: how many runs of each workflow version."""
    counts = Counter(f"{run.workflow_name}@{run.version}" for run in runs)
    return ", ".join(f"{key}: {count}" for key, count in sorted(counts.items()))
