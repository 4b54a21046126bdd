"""Retention: finished runs are deleted once they are older than their workflow's retention.

A run is expired when it finished (completed, failed or canceled) longer ago than the retention of its
workflow: the workflow's own (`workflow(..., retention="90d")`), else the configured default
(`tasks["retention"]`; None, the default, keeps runs forever). It is deleted with its steps, messages,
published events and event waits. Never deleted: an unfinished run, whatever its times say, and a finished
child whose parent is unfinished or finished more recently than the child's cutoff (the parent may still read
the child's outcome; the child goes once the parent is past it too, or gone).

Who deletes: every worker runs a RetentionSweeper. Each stores the retention its workflows declare, one row per
workflow name and version (table `workflow_version_retention`), so the worker that deletes applies every workflow's
own retention, also of workflows it does not register itself. A worker replaces only the versions it declares:
another version's row, also one no worker serves any more, keeps counting. The runs of one workflow name, whatever
their version, go by the longest retention its versions declare; a version that declares none counts as the
deleting worker's default, and as forever when there is none (`deletion_plan`). So a retention is never shortened
by a worker that does not serve the version declaring the longer one. (What a worker of an older release stored by
workflow name alone, table `workflow_retention`, counts until a version of it is declared.) Every
`retention_interval` a worker makes one pass, under a lock one worker holds at a time (on PostgreSQL an advisory
lock on a connection of its own; on SQLite the file's single writer serializes the batches anyway). A pass deletes
one workflow's runs at a time (`by_workflow`: the default's share workflow by workflow), so a batch reads only that
workflow's expired runs off an index by (workflow, finish time), never the runs other workflows keep longer. It
deletes in batches of BATCH_SIZE runs, each one short transaction that waits on no lock (PostgreSQL: SKIP LOCKED; its
commit does not wait for the WAL flush, a deletion lost to a crash is simply made again), and pauses after each
batch four times as long as the batch took: deleting takes at most a fifth of one connection's time, and claims and
checkpoints go on between the batches (`benchmarks/purge.py` measures what it costs them).

`WorkflowManager.purge` (the `purge` command) deletes on demand by age, status and workflow, in the same
batches, whatever the retention says.

Broadcast events (`manager.emit`) go once no stored run can read them. `step.wait_for_event` takes the first event
of its name and key emitted at or after its run was created (both times by the database's clock), and a run that
may yet wait is any run that is not completed: an unfinished one, and a failed or canceled one, which a retry
starts again with the same created_at (a fork is a new run, created when it is forked). So every event emitted
before the creation of the oldest such run (or before now, when there is none), less EVENT_MARGIN, is unreachable.
The margin covers a run whose insert is in flight during the pass: on PostgreSQL its created_at is its
transaction's start, earlier than the pass, while the pass cannot see it yet. An event that woke a waiting run is
never among them: the woken run is pending, created at or before the event. Every pass deletes them after the
expired runs (whose deletion can only move the horizon later), whether or not a retention is configured, in
batches as the runs' (off an index by emission time); the `purge` command too. Nothing else bounds them: a failed
or canceled run kept forever keeps every event emitted since its creation (its retry may wait for any of them),
until it is deleted (retention, purge).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TypeVar

from .backends.base import FINISHED_STATUSES, Backend, FinishedRuns
from .duration import Duration, parse_duration
from .errors import BackendUnavailable, InvalidValue
from .limits import check_workflow_name
from .reconnect import until_available
from .registry import Registry
from .waiting import stop_gently, wait_for_event

logger = logging.getLogger("sonamu_tasks.retention")

BATCH_SIZE = 500
"""Runs deleted per statement: a batch of their rows and their steps' rows stays a short transaction."""

MAX_BATCH_SIZE = 10_000

PAUSE_RATIO = 4.0
"""After each batch, pause this many times as long as the batch took. Beside a throughput run on a 2-core machine a
purge at 1.0 cost it 15 % of its workflows/s, at 2.0 7-13 %, at 4.0 5-8 % (claim p99: +20 %, +16-32 %, +6-34 %;
benchmarks/README.md, "Purge")."""

EVENT_BATCH_SIZE = 2_000
"""Broadcast events deleted per statement: an event is one row and two index entries, nothing cascades."""

EVENT_MARGIN = timedelta(hours=1)
"""How much earlier than the oldest run that may still wait (or now) an event must be emitted to be deleted. A run
insert takes milliseconds from its transaction's start (its created_at) to its commit; an hour covers one that
waited on locks or a stalled connection meanwhile, and a wall clock set back (SQLite), for the price of keeping
the last hour's events."""

Progress = Callable[[int, int], None]
"""Called after each batch with (runs deleted so far, how many there were to delete at the start)."""

S = TypeVar("S")


class RetentionSweeper:
    """The background loop of one worker: publish its workflows' retention, and every `interval` delete the
    expired runs if no other worker is doing so."""

    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        default: Duration | None,
        *,
        interval: Duration,
        batch_size: int = BATCH_SIZE,
        pause_ratio: float = PAUSE_RATIO,
        event_batch_size: int = EVENT_BATCH_SIZE,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.default = None if default is None else parse_duration(default, what="tasks.retention")
        self.interval = parse_duration(interval, what="tasks.retention_interval")
        self.batch_size = batch_size
        self.pause_ratio = pause_ratio
        self.event_batch_size = event_batch_size
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> None:
        """Store the retention the registered workflows declare (None: the default applies to it)."""
        await self.backend.save_retention(declared_retention(self.registry))

    async def sweep(self) -> int:
        """One pass: delete every expired run, then the broadcast events no run can read any more, unless another
        worker holds the lock. Returns how many runs it deleted."""
        await self.publish()  # also after a reload: the policies follow the code
        plan = deletion_plan(await self.backend.list_retention(), self.default)
        async with self.backend.retention_lock() as held:
            if not held:
                logger.debug("retention: another worker is deleting expired runs")
                return 0
            total = await self._delete_runs(plan)
            if not self._stopping:
                events = await delete_unreachable_events(
                    self.backend,
                    batch_size=self.event_batch_size,
                    pause_ratio=self.pause_ratio,
                    stopping=self._stopping_soon,
                )
                if events:
                    logger.info("retention: deleted %d broadcast events no run can read any more", events)
            return total

    async def _delete_runs(self, plan: list[tuple[str, FinishedRuns]]) -> int:
        total = 0
        for what, selection in plan:
            deleted = 0
            for chosen in await by_workflow(self.backend.finished_workflows, selection):
                deleted += await delete_in_batches(
                    self.backend.delete_finished_runs,
                    chosen,
                    batch_size=self.batch_size,
                    pause_ratio=self.pause_ratio,
                    stopping=self._stopping_soon,
                )
                if self._stopping:
                    break
            if deleted:
                logger.info(
                    "retention: deleted %d finished runs of %s (finished more than %s ago)",
                    deleted,
                    what,
                    duration_words(selection.older_than),
                )
            total += deleted
            if self._stopping:
                break
        return total

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sonamu-retention")

    async def stop(self) -> None:
        # A flag, not only a cancel: the pass ends after its current batch.
        self._stopping = True
        self._wake.set()
        await stop_gently(self._task)
        self._task = None

    async def _stopping_soon(self, pause: float) -> bool:
        """Pause between batches; True when the sweeper is stopping (the pass ends)."""
        if pause > 0 and not self._stopping:
            await wait_for_event(self._wake, pause)
        return self._stopping

    async def _loop(self) -> None:
        # The first pass after one interval: the other workers starting with this one store their own
        # workflows' retention first.
        while not self._stopping:
            await wait_for_event(self._wake, self.interval.total_seconds())
            if self._stopping:
                break
            try:
                await self.sweep()
            except BackendUnavailable as error:
                logger.warning("retention: database unavailable (%s); trying again in %s", error, self.interval)
            except Exception:
                logger.exception("retention pass failed; trying again in %s", self.interval)


def declared_retention(registry: Registry) -> dict[tuple[str, str], timedelta | None]:
    """The retention each registered (workflow name, version) declares; None: the default applies to it."""
    return {definition.key: definition.retention for definition in registry}


def deletion_plan(
    declarations: Mapping[str, Sequence[timedelta | None]], default: timedelta | None
) -> list[tuple[str, FinishedRuns]]:
    """What one pass deletes: each workflow with a retention of its own by it, then every other workflow by
    the default (none when there is no default).

    `declarations` holds, per workflow name, what each of its versions declares. A workflow's runs all go by the
    longest: the runs of one version are no different to keep than another's, and a worker serving only the
    shorter version must not delete what the longer one keeps. A version declaring none counts as the default;
    without a default that is forever, so its workflow's runs are kept (as they were before any version declared
    one). A workflow none of whose versions declares one goes with the default's batch."""
    own: dict[str, timedelta] = {}
    for name, retentions in declarations.items():
        declared = [retention for retention in retentions if retention is not None]
        if not declared:
            continue
        if len(declared) < len(retentions):
            if default is None:
                continue  # kept forever; without a default there is no default batch to exclude it from
            declared.append(default)
        own[name] = max(declared)
    plan = [(f"workflow {name!r}", FinishedRuns(older_than, workflow=name)) for name, older_than in sorted(own.items())]
    if default is not None:
        what = "the workflows without a retention of their own"
        plan.append((what, FinishedRuns(default, excluded=tuple(sorted(own)))))
    return plan


def purge_selection(
    older_than: Duration, statuses: str | Iterable[str] | None = None, workflow: str | None = None
) -> FinishedRuns:
    """The runs `purge` deletes; InvalidValue naming the argument when one is wrong."""
    age = parse_duration(older_than, what="older_than")
    chosen: tuple[str, ...] = FINISHED_STATUSES
    if statuses is not None:
        given = [statuses] if isinstance(statuses, str) else list(statuses)
        for status in given:
            if status not in FINISHED_STATUSES:
                raise InvalidValue(
                    f"statuses: {status!r} is not a finished status; only {', '.join(FINISHED_STATUSES)} "
                    "runs are ever deleted",
                    field="statuses",
                )
        if not given:
            raise InvalidValue(f"statuses: name at least one of {', '.join(FINISHED_STATUSES)}", field="statuses")
        chosen = tuple(status for status in FINISHED_STATUSES if status in given)
    name = None if workflow is None else check_workflow_name(workflow)
    return FinishedRuns(age, statuses=chosen, workflow=name)


async def purge(
    backend: Backend,
    selection: FinishedRuns,
    *,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    pause_ratio: float = PAUSE_RATIO,
) -> int:
    """Delete (or with `dry_run` only count) the runs `selection` names; the number deleted (counted)."""
    _check_batch_size(batch_size)

    async def workflows() -> list[str]:
        return await until_available(backend.finished_workflows, what="list workflows", give_up_after_s=30)

    selections = await by_workflow(workflows, selection)

    async def count_one(chosen: FinishedRuns) -> int:
        return await until_available(lambda: backend.count_finished_runs(chosen), what="count runs", give_up_after_s=30)

    async def count() -> int:
        return sum([await count_one(chosen) for chosen in selections])

    if dry_run:
        return await count()
    total = await count() if progress is not None else 0

    async def delete(chosen: FinishedRuns, limit: int) -> int:
        return await until_available(
            lambda: backend.delete_finished_runs(chosen, limit), what="delete runs", give_up_after_s=30
        )

    deleted = 0
    report = _Reporter(progress, total)
    if progress is not None:
        progress(0, total)
    for chosen in selections:
        report.before = deleted  # a workflow's batches count on from the workflows before
        deleted += await delete_in_batches(
            delete, chosen, batch_size=batch_size, pause_ratio=pause_ratio, stopping=_throttle, on_batch=report
        )
    logger.info("purge: deleted %d finished runs", deleted)
    return deleted


async def delete_unreachable_events(
    backend: Backend,
    *,
    batch_size: int,
    pause_ratio: float,
    stopping: Callable[[float], Awaitable[bool]],
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Delete, batch after batch, the broadcast events emitted before the horizon of this moment (see the module's
    docstring); the number deleted. The horizon is fixed for the pass: a run created meanwhile is created after it
    by more than EVENT_MARGIN, and a run completed meanwhile only moves it later, for the next pass."""
    horizon = await backend.unreachable_events_horizon(EVENT_MARGIN)
    if horizon is None:
        return 0
    return await delete_in_batches(
        backend.delete_events_before,
        horizon,
        batch_size=batch_size,
        pause_ratio=pause_ratio,
        stopping=stopping,
        on_batch=on_batch,
    )


async def purge_events(
    backend: Backend,
    *,
    dry_run: bool = False,
    batch_size: int = EVENT_BATCH_SIZE,
    progress: Progress | None = None,
    pause_ratio: float = PAUSE_RATIO,
) -> int:
    """Delete (or with `dry_run` only count) the broadcast events no stored run can read any more, in batches as
    `purge`; the number deleted (counted). `progress(deleted, total)` as for `purge`, only when there are some."""
    _check_batch_size(batch_size)

    async def horizon_now() -> datetime | None:
        return await backend.unreachable_events_horizon(EVENT_MARGIN)

    horizon = await until_available(horizon_now, what="find unreachable events", give_up_after_s=30)
    if horizon is None:
        return 0
    fixed = horizon

    async def count() -> int:
        return await backend.count_events_before(fixed)

    if dry_run:
        return await until_available(count, what="count events", give_up_after_s=30)
    total = await until_available(count, what="count events", give_up_after_s=30) if progress is not None else 0

    async def delete(before: datetime, limit: int) -> int:
        return await until_available(
            lambda: backend.delete_events_before(before, limit), what="delete events", give_up_after_s=30
        )

    if progress is not None and total:
        progress(0, total)
    deleted = await delete_in_batches(
        delete,
        fixed,
        batch_size=batch_size,
        pause_ratio=pause_ratio,
        stopping=_throttle,
        on_batch=_Reporter(progress, total),
    )
    logger.info("purge: deleted %d broadcast events no run can read any more", deleted)
    return deleted


async def by_workflow(
    finished_workflows: Callable[[], Awaitable[list[str]]], selection: FinishedRuns
) -> list[FinishedRuns]:
    """`selection` made into one selection per workflow: a backend reads one workflow's finished runs at a time,
    off an index by (workflow, finish time), so a batch never walks the runs of other workflows, kept longer or
    excluded. A selection of every workflow (but `excluded`) becomes one per workflow that has finished runs."""
    if selection.workflow is not None:
        return [selection]
    return [
        replace(selection, workflow=name, excluded=())
        for name in await finished_workflows()
        if name not in selection.excluded
    ]


async def delete_in_batches(
    delete: Callable[[S, int], Awaitable[int]],
    selection: S,
    *,
    batch_size: int,
    pause_ratio: float,
    stopping: Callable[[float], Awaitable[bool]],
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Delete batch after batch until one comes back short; after each, `stopping(pause)` pauses for
    `pause_ratio` times the batch's duration and says whether to stop. Returns the number deleted."""
    deleted = 0
    while True:
        began = time.monotonic()
        count = await delete(selection, batch_size)
        deleted += count
        if on_batch is not None:
            on_batch(deleted)
        if count < batch_size:
            return deleted
        if await stopping((time.monotonic() - began) * pause_ratio):
            return deleted


def _check_batch_size(batch_size: int) -> None:
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InvalidValue(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}", field="batch_size")


class _Reporter:
    """A purge's `on_batch`: `progress(done, total)` when the count moved (a last, empty batch adds nothing to
    say), the total growing to what was done if more came meanwhile. `before`: deleted by earlier selections."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.before = 0
        self._reported = 0

    def __call__(self, deleted: int) -> None:
        done = self.before + deleted
        if self.progress is not None and done != self._reported:
            self._reported = done
            self.progress(done, max(self.total, done))


async def _throttle(seconds: float) -> bool:
    """A purge's pause between batches (it never stops early)."""
    if seconds > 0:
        await asyncio.sleep(seconds)  # throttling between batches, not waiting for a condition
    return False


def duration_words(duration: timedelta) -> str:
    """`30d`, `12h`, `90s`: the largest unit that divides the duration, for log lines and summaries."""
    seconds = duration.total_seconds()
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
