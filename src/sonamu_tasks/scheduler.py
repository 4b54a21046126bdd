"""Cron firing. Every worker runs a Scheduler; the database decides which one fires each time.

Exactly once per fire time: a fire advances the schedule's `next_fire_at` by compare-and-set from the
value the worker read, and the run it starts carries the idempotency key `schedule:{name}@{fire time}`,
both in one transaction. Workers racing for the same fire: one wins, the others write nothing.

Late and missed fires: a fire at most CATCH_UP_GRACE (10 s) late is still made, so a slow tick on a busy
machine skips nothing. Fires missed by more (every worker was down) collapse into one run for the latest
missed time; the schedule then continues from the next future one. No burst of catch-up runs.

Who fires a schedule: the stored row (what the last worker to synchronize declared: expression, timezone,
static input, version) sets the fire times. Every worker that registers the row's workflow and declares a
schedule of that name fires it, with its own code: the version it registers (the newest, in natural order,
when it registers several that declare it) and its own input. So a rolling deploy or a canary rollback leaves
the schedule firing whichever release is still up; a worker whose code has no such schedule (it was removed)
fires nothing, and only synchronize writes rows, so an old worker that keeps running re-creates nothing.

A fire skips a row another worker holds (PostgreSQL: SKIP LOCKED): that worker is firing it, and one stuck
between its update and its commit stalls only that schedule, not every schedule of every worker.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from . import serde
from .backends.base import ScheduleRecord, ScheduleStore
from .definition import WorkflowDefinition
from .errors import BackendUnavailable, InvalidInput, InvalidValue, SerializationError
from .registry import Registry
from .run_creation import RunOptions, prepare_run
from .schedule import Schedule, latest_fire_at_or_before, next_fire_after, zone
from .waiting import stop_gently, wait_for_event

logger = logging.getLogger("sonamu_tasks.scheduler")

Clock = Callable[[], datetime]

CATCH_UP_GRACE = timedelta(seconds=10)
"""A fire at most this late is still made; fires missed by more collapse into one run for the latest."""


def system_clock() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    def __init__(
        self,
        store: ScheduleStore,
        registry: Registry,
        timezone: str,
        *,
        clock: Clock = system_clock,
        max_sleep_s: float = 5.0,
    ) -> None:
        zone(timezone)  # a wrong name is a configuration error now, not at the first fire
        self.store = store
        self.registry = registry
        self.timezone = timezone
        self.clock = clock
        self.max_sleep_s = max_sleep_s
        self._owned_workflows: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def synchronize(self) -> None:
        """Store the schedules the registered workflows declare; drop those the code no longer has."""
        now = self.clock()
        records = []
        for name, (definition, schedule) in sorted(_declared(self.registry).items()):
            static_input = None if callable(schedule.input) else schedule.input
            serde.dumps(static_input, what=f"the input of schedule {name!r}")
            records.append(
                ScheduleRecord(
                    name=name,
                    workflow_name=definition.name,
                    version=definition.version,
                    expression=schedule.expression,
                    timezone=self.timezone,
                    input=static_input,
                    next_fire_at=next_fire_after(schedule.expression, self.timezone, now),
                )
            )
        await self._warn_of_taken_names(records)
        workflows = {definition.name for definition in self.registry}
        # Workflows this process registered before a reload count too: their removal removes their schedules.
        scope = sorted(workflows | self._owned_workflows)
        await self.store.sync_schedules(records, scope)
        self._owned_workflows = workflows
        self._wake.set()

    async def _warn_of_taken_names(self, records: list[ScheduleRecord]) -> None:
        """A schedule stored for another workflow (a workflow renamed, or another application on this database
        using the name) is taken over, as the last worker to synchronize always sets the row: said loudly."""
        stored = {record.name: record for record in await self.store.list_schedules()}
        for record in records:
            other = stored.get(record.name)
            if other is not None and other.workflow_name != record.workflow_name:
                logger.warning(
                    "schedule %r was stored for workflow %r; workflow %r declares it here and takes it over, so "
                    "workers running %r no longer fire it. If both workflows still run (two applications on one "
                    "database), give one of the schedules another name",
                    record.name,
                    other.workflow_name,
                    record.workflow_name,
                    other.workflow_name,
                )

    async def tick(self) -> float | None:
        """Fire every due schedule this process declares; return seconds until the next fire."""
        soonest: datetime | None = None
        declared = _declared(self.registry)
        now = self.clock()
        for record in await self.store.list_schedules():
            definition, schedule = declared.get(record.name, (None, None))
            if definition is None or schedule is None or definition.name != record.workflow_name:
                continue  # not declared by the code here: the workers whose code declares it fire it
            # Read after the database answered (and each fire): a read that waited out an outage would judge a
            # time long missed as on time, firing it as well as the run that collapses the missed ones.
            now = self.clock()
            if record.next_fire_at <= now:
                record_next = await self._fire(record, definition, schedule, now)
            else:
                record_next = record.next_fire_at
            soonest = record_next if soonest is None else min(soonest, record_next)
        return None if soonest is None else (soonest - now).total_seconds()

    async def _fire(
        self, record: ScheduleRecord, definition: WorkflowDefinition[Any, Any], schedule: Schedule, now: datetime
    ) -> datetime:
        """Fire the due time with this process's `definition` of the workflow; return the next fire time."""
        if now - record.next_fire_at <= CATCH_UP_GRACE:
            # A tick a little late (a busy machine) skips nothing: fire this time, the next comes right after.
            fire_at = record.next_fire_at
            next_fire_at = next_fire_after(record.expression, record.timezone, fire_at)
        else:
            # Every worker was away: one run for the latest missed time, then on from the future.
            fire_at = latest_fire_at_or_before(record.expression, record.timezone, now)
            next_fire_at = next_fire_after(record.expression, record.timezone, now)
        run = None
        try:
            run = prepare_run(
                definition.name,
                definition.version,
                definition,
                await schedule.evaluate_input(),
                RunOptions(idempotency_key=f"schedule:{record.name}@{fire_at.isoformat()}"),
                what=f"the input of schedule {record.name!r}",
            )
        except (InvalidInput, InvalidValue, SerializationError) as error:
            logger.error("schedule %s: skipping the fire at %s: %s", record.name, fire_at.isoformat(), error)
        except Exception as error:  # the user's input callable raised
            logger.exception("schedule %s: its input callable raised %r; skipping this fire", record.name, error)
        fired = await self.store.fire_schedule(record.name, record.next_fire_at, fire_at, next_fire_at, run)
        if fired and run is not None:
            missed = "" if fire_at == record.next_fire_at else f" (missed fires since {record.next_fire_at})"
            logger.info(
                "schedule %s fired for %s%s: run %s (version %s)",
                record.name,
                fire_at.isoformat(),
                missed,
                run.id,
                run.version,
            )
        return next_fire_at

    # the loop every worker runs

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sonamu-scheduler")

    async def stop(self) -> None:
        # A flag, not only a cancel: a cancel that lands inside a database call can be absorbed there.
        self._stopping = True
        self._wake.set()
        await stop_gently(self._task)
        self._task = None

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                wait = await self.tick()
            except BackendUnavailable as error:
                logger.warning("schedules unavailable (%s); retrying", error)
                wait = 1.0
            except Exception:
                logger.exception("scheduler tick failed; retrying")
                wait = 1.0
            wait = self.max_sleep_s if wait is None else min(max(wait, 0.0), self.max_sleep_s)
            await wait_for_event(self._wake, wait)


def _declared(registry: Registry) -> dict[str, tuple[WorkflowDefinition[Any, Any], Schedule]]:
    """Each schedule the registered workflows declare, by name: the version of its workflow that fires it here
    (the newest, when several declare it) and that version's declaration. The registry refuses one name
    declared by two workflows."""
    declared: dict[str, tuple[WorkflowDefinition[Any, Any], Schedule]] = {}
    for definition in registry:
        for schedule in definition.schedules:
            name = schedule.name_for(definition.name)
            known = declared.get(name)
            if known is None or version_order(definition.version) > version_order(known[0].version):
                declared[name] = (definition, schedule)
    return declared


def version_order(version: str) -> tuple[Any, ...]:
    """Sort key of versions, the newest last: numbers compared as numbers ("10" after "9", "1.10" after
    "1.9", "2025-06-01" after "2025-05-31"), the rest as text."""
    parts = re.split(r"(\d+)", version)
    return tuple((int(part), part) if index % 2 else part for index, part in enumerate(parts)), version
