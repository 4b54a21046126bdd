"""Cron schedules: fire times in a timezone (DST included), exactly one run per fire, catch-up, removal."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sonamu_tasks import Schedule, WorkflowDefinitionError, workflow
from sonamu_tasks.schedule import latest_fire_at_or_before, next_fire_after
from sonamu_tasks.scheduler import Scheduler

from .conftest import wait_until
from .support.processes import WorkerProcess

NEW_YORK = "America/New_York"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_fire_times_follow_the_configured_timezone() -> None:
    # 09:00 in Seoul is midnight UTC.
    assert next_fire_after("0 9 * * *", "Asia/Seoul", utc(2026, 1, 1, 12)) == utc(2026, 1, 2, 0)
    assert next_fire_after("0 9 * * mon", "Asia/Seoul", utc(2026, 1, 1)) == utc(2026, 1, 5, 0)  # a Monday
    assert next_fire_after("*/10 * * * * *", "UTC", utc(2026, 1, 1, 0, 0, 5)) == utc(2026, 1, 1, 0, 0, 10)
    assert latest_fire_at_or_before("0 9 * * *", "Asia/Seoul", utc(2026, 1, 2, 0)) == utc(2026, 1, 2, 0)


def test_a_skipped_wall_time_fires_when_the_clock_jumps_past_it() -> None:
    # 2026-03-08 02:00 EST jumps to 03:00 EDT: 02:30 does not exist that day; it fires at 03:30 EDT.
    assert next_fire_after("30 2 * * *", NEW_YORK, utc(2026, 3, 8, 5)) == utc(2026, 3, 8, 7, 30)
    assert next_fire_after("30 2 * * *", NEW_YORK, utc(2026, 3, 8, 8)) == utc(2026, 3, 9, 6, 30)  # EDT after
    hourly = [utc(2026, 3, 8, 5)]
    for _ in range(3):
        hourly.append(next_fire_after("0 * * * *", NEW_YORK, hourly[-1]))
    assert hourly[1:] == [utc(2026, 3, 8, 6), utc(2026, 3, 8, 7), utc(2026, 3, 8, 8)]  # 01:00 EST, 03:00, 04:00 EDT


def test_a_repeated_wall_time_fires_once() -> None:
    # 2026-11-01 02:00 EDT falls back to 01:00 EST: 01:30 happens twice; it fires at the first only.
    first = next_fire_after("30 1 * * *", NEW_YORK, utc(2026, 11, 1, 4))
    assert first == utc(2026, 11, 1, 5, 30)
    assert next_fire_after("30 1 * * *", NEW_YORK, first) == utc(2026, 11, 2, 6, 30)


def test_schedule_expressions_are_checked_at_definition() -> None:
    with pytest.raises(WorkflowDefinitionError, match="not a cron expression"):
        Schedule("61 * * * *")
    with pytest.raises(WorkflowDefinitionError, match="not a cron expression"):
        Schedule("0 9 * *")
    assert Schedule("0 9 * * mon-fri").name_for("report") == "report[0 9 * * mon-fri]"
    assert Schedule("0 0 1 jan *", name="yearly").name_for("report") == "yearly"


async def test_each_fire_time_starts_exactly_one_run_whichever_workers_tick(manager_for: Any) -> None:
    inputs = iter(range(100))

    @workflow(version="1", schedules=[Schedule("0 9 * * *", input=lambda: {"n": next(inputs)})])
    async def morning(input: Any) -> Any:
        return input

    manager = await manager_for([morning], enable_worker=False)
    clock = FakeClock(utc(2026, 1, 1, 23))  # 08:00 in Seoul
    workers = [Scheduler(manager.backend, manager.registry, "Asia/Seoul", clock=clock) for _ in range(3)]
    await workers[0].synchronize()
    (stored,) = await manager.backend.list_schedules()
    assert stored.name == "morning[0 9 * * *]" and stored.next_fire_at == utc(2026, 1, 2, 0)

    for scheduler in workers:
        assert await scheduler.tick() == pytest.approx(3600)
    assert (await manager.list_runs(workflow="morning")).items == []

    clock.now = utc(2026, 1, 2, 0, 0, 0)  # 09:00 in Seoul: all three workers tick at once
    await asyncio.gather(*(scheduler.tick() for scheduler in workers))
    clock.now += timedelta(seconds=30)
    await asyncio.gather(*(scheduler.tick() for scheduler in workers))
    runs = (await manager.list_runs(workflow="morning")).items
    assert len(runs) == 1
    assert runs[0].idempotency_key == "schedule:morning[0 9 * * *]@2026-01-02T00:00:00+00:00"
    assert isinstance(runs[0].input, dict) and "n" in runs[0].input
    (stored,) = await manager.backend.list_schedules()
    assert stored.next_fire_at == utc(2026, 1, 3, 0) and stored.last_run_id == runs[0].id


async def test_missed_fires_catch_up_once_not_in_a_burst(manager_for: Any) -> None:
    @workflow(version="1", schedules=[Schedule("0 * * * *", name="hourly")])
    async def hourly(input: Any) -> Any:
        return input

    manager = await manager_for([hourly], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 0, 30))
    scheduler = Scheduler(manager.backend, manager.registry, "UTC", clock=clock)
    await scheduler.synchronize()
    clock.now = utc(2026, 5, 1, 10, 15)  # every worker was down for ten fire times
    await scheduler.tick()
    runs = (await manager.list_runs(workflow="hourly")).items
    assert [run.idempotency_key for run in runs] == ["schedule:hourly@2026-05-01T10:00:00+00:00"]
    (stored,) = await manager.backend.list_schedules()
    assert stored.next_fire_at == utc(2026, 5, 1, 11)


async def test_a_schedule_removed_from_the_code_stops_firing_after_synchronize(manager_for: Any) -> None:
    async def report(input: Any) -> Any:
        return input

    with_schedules = workflow(report, version="1", schedules=["0 * * * *", Schedule("30 * * * *", name="half")])
    without_half = workflow(report, version="1", schedules=["0 * * * *"])
    manager = await manager_for([with_schedules], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 0, 10))
    scheduler = Scheduler(manager.backend, manager.registry, "UTC", clock=clock)
    await scheduler.synchronize()
    assert sorted(s.name for s in await manager.backend.list_schedules()) == ["half", "report[0 * * * *]"]

    manager.registry.replace_all([without_half])
    await scheduler.synchronize()
    assert [s.name for s in await manager.backend.list_schedules()] == ["report[0 * * * *]"]
    clock.now = utc(2026, 5, 1, 0, 45)
    await scheduler.tick()
    assert (await manager.list_runs(workflow="report")).items == []


async def test_several_worker_processes_fire_each_second_once(
    database_url: str, schema: str, tmp_path: Path, manager_for: Any
) -> None:
    workers = [
        WorkerProcess(database_url, schema, tmp_path, f"cron-{i}", workflows="ticker", lease_ms=5000) for i in range(3)
    ]
    try:
        client = await manager_for([], enable_worker=False)

        async def fired() -> list[Any]:
            return (await client.list_runs(workflow="ticker", limit=1000)).items

        await wait_until(lambda: _at_least(fired, 6), timeout=30, what="six fires")
        # Stopped as a deploy stops them, not killed: a fire committed as a worker goes down is still logged
        # (kill -9 between the commit and the log line would lose the line, not the fire). Once all three are up:
        # SIGTERM is graceful from then on.
        await wait_until(lambda: _at_least(client.list_workers, 3), timeout=30, what="three workers registered")
        assert [worker.terminate() for worker in workers] == [0, 0, 0]
    finally:
        for worker in workers:
            worker.stop()
    runs = await fired()
    keys = [run.idempotency_key or "" for run in runs]
    assert all(count == 1 for count in Counter(keys).values())
    seconds = sorted(datetime.fromisoformat(key.rsplit("@", 1)[1]) for key in keys)
    assert all(moment.microsecond == 0 for moment in seconds)
    assert all(later > earlier for earlier, later in itertools.pairwise(seconds))  # one run per fire second
    # Exactly one worker won each fire: the losers of the race wrote nothing and logged no fire.
    logs = "".join(worker.log() for worker in workers)
    assert logs.count("schedule every-second fired") == len(runs)


async def _at_least(fetch: Any, count: int) -> bool:
    return len(await fetch()) >= count


async def test_a_late_tick_skips_no_fire_time(manager_for: Any) -> None:
    @workflow(version="1", schedules=[Schedule("* * * * * *", name="every-second")])
    async def busy(input: Any) -> Any:
        return input

    manager = await manager_for([busy], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 0, 0, 0, 500_000))
    scheduler = Scheduler(manager.backend, manager.registry, "UTC", clock=clock)
    await scheduler.synchronize()
    clock.now = utc(2026, 5, 1, 0, 0, 3, 700_000)  # the machine was busy: the tick comes 2.7 s late
    waits = [await scheduler.tick() for _ in range(4)]
    keys = sorted(run.idempotency_key or "" for run in (await manager.list_runs(workflow="busy")).items)
    assert keys == [f"schedule:every-second@2026-05-01T00:00:0{s}+00:00" for s in (1, 2, 3)]
    assert waits[-1] == pytest.approx(0.3)  # then on time for 00:00:04
