"""Cron schedules: fire times in a timezone (DST included), exactly one run per fire, catch-up, removal."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sonamu_tasks import Schedule, WorkflowDefinitionError, WorkflowManager, workflow
from sonamu_tasks.registry import Registry
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


def test_schedule_expressions_are_checked_at_definition_naming_the_workflow_and_the_schedule() -> None:
    async def report(input: Any) -> Any: ...

    # a plain string, a Schedule made beforehand, the seed's dict: the error names the workflow and the schedule
    with pytest.raises(WorkflowDefinitionError, match=r"workflow 'report': schedule '61 \* \* \* \*' is not a cron"):
        workflow(report, version="1", schedules=["61 * * * *"])
    nightly = Schedule("0 9 * *", name="nightly")
    with pytest.raises(WorkflowDefinitionError, match=r"workflow 'report': schedule 'nightly' \('0 9 \* \*'\) is not"):
        workflow(report, version="1", schedules=[nightly])
    with pytest.raises(WorkflowDefinitionError, match=r"workflow 'report': schedule 'nightly' .* never fires"):
        workflow(report, version="1", schedules=[{"expression": "0 0 31 2 *", "name": "nightly"}])
    assert Schedule("0 9 * * mon-fri").name_for("report") == "report[0 9 * * mon-fri]"
    assert Schedule("0 0 1 jan *", name="yearly").name_for("report") == "yearly"


@pytest.mark.parametrize(
    ("expression", "field"),
    [
        ("5-1 * * * *", "minute"),
        ("0 20-3 * * *", "hour"),
        ("0 0 20-3 * *", "day-of-month"),
        ("0 0 1 nov-feb *", "month"),
        ("0 9 * * fri-mon", "day-of-week"),
        ("50-10 * * * * *", "second"),
        ("5-1/2 * * * *", "minute"),
    ],
)
def test_a_range_that_runs_backwards_is_refused_naming_its_field(expression: str, field: str) -> None:
    # croniter would read 5-1 as wrapping round (5..59, 0, 1), but 5-1/2 as not wrapping; cron refuses both.
    async def report(input: Any) -> Any: ...

    with pytest.raises(WorkflowDefinitionError, match=rf"workflow 'report': .*the {field} range '.*' runs backwards"):
        workflow(report, version="1", schedules=[expression])


@pytest.mark.parametrize(
    "expression", ["0 9 * * mon-sun", "0 9 * * sat-sun", "0 9 * * 5-0", "0 9 * * 5-7", "1-5 * * * *"]
)
def test_a_range_ending_on_sunday_or_going_up_is_accepted(expression: str) -> None:
    async def report(input: Any) -> Any: ...

    assert workflow(report, version="1", schedules=[expression]).schedules[0].expression == expression


def test_two_workflows_cannot_declare_one_schedule_name() -> None:
    async def fn(input: Any) -> Any: ...

    a = workflow(fn, version="1", name="a", schedules=[Schedule("0 9 * * *", name="nightly")])
    b = workflow(fn, version="1", name="b", schedules=[Schedule("0 3 * * *", name="nightly")])
    with pytest.raises(WorkflowDefinitionError, match="schedule 'nightly' is declared by two workflows, 'a' and 'b'"):
        WorkflowManager(workflows=[a, b])
    registry = Registry()
    registry.register(a)
    registry.register(workflow(fn, version="2", name="a", schedules=[Schedule("0 9 * * *", name="nightly")]))
    with pytest.raises(WorkflowDefinitionError, match="'b' and 'a'"):
        registry.replace_all([b, a])
    with pytest.raises(WorkflowDefinitionError, match="workflow 'c' declares schedule 'dup' twice"):
        workflow(
            fn, version="1", name="c", schedules=[Schedule("* * * * *", name="dup"), Schedule("0 * * * *", name="dup")]
        )
    with pytest.raises(WorkflowDefinitionError, match=r"declares schedule 'c\[0 9 \* \* \*\]' twice"):
        workflow(fn, version="1", name="c", schedules=["0 9 * * *", "0 9 * * *"])


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


async def test_a_tick_that_waited_out_an_outage_collapses_the_missed_fires(
    manager_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock is read after the database answered: a tick whose read of the schedules waited 30 s (an
    outage) fires one run for the missed span, not also the long missed time as if it were on time."""

    @workflow(version="1", schedules=[Schedule("* * * * * *", name="every-second")])
    async def ticking(input: Any) -> Any:
        return input

    manager = await manager_for([ticking], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 0, 0, 0, 500_000))
    scheduler = Scheduler(manager.backend, manager.registry, "UTC", clock=clock)
    await scheduler.synchronize()
    list_schedules = manager.backend.list_schedules

    async def after_an_outage() -> Any:
        clock.now += timedelta(seconds=30)  # the database answers 30 s after the tick asked
        monkeypatch.setattr(manager.backend, "list_schedules", list_schedules)
        return await list_schedules()

    monkeypatch.setattr(manager.backend, "list_schedules", after_an_outage)
    clock.now = utc(2026, 5, 1, 0, 0, 1, 200_000)  # 00:00:01 is due
    for _ in range(3):
        await scheduler.tick()
    keys = [run.idempotency_key for run in (await manager.list_runs(workflow="ticking")).items]
    assert len(keys) == 1, keys  # the stale 00:00:01 fired as on time, then the catch-up run
    assert keys[0] != "schedule:every-second@2026-05-01T00:00:01+00:00"


# who fires a schedule: rolling deploys, canaries, several versions (the stored row names one version)


def _job(version: str, *schedules: Schedule | str) -> Any:
    async def job(input: Any, version: str) -> Any:
        return version

    return workflow(job, version=version, name="job", schedules=list(schedules))


def _process(manager: Any, clock: FakeClock, *definitions: Any) -> Scheduler:
    """The scheduler of one worker process, whose code registers `definitions`, on the test's database."""
    registry = Registry()
    for definition in definitions:
        registry.register(definition)
    return Scheduler(manager.backend, registry, "UTC", clock=clock)


async def _runs(manager: Any) -> list[tuple[str | None, str]]:
    runs = (await manager.list_runs(workflow="job", limit=100)).items
    return sorted((run.idempotency_key, run.version) for run in runs)


async def test_a_schedule_keeps_firing_after_an_older_release_started_and_stopped(manager_for: Any) -> None:
    # given a v2 fleet, and a v1 process that starts (a supervisor restart, an old pod) after it, then goes away
    manager = await manager_for([], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 0, 0, 0, 500_000))
    new = _process(manager, clock, _job("2", Schedule("* * * * * *", name="every-second")))
    old = _process(manager, clock, _job("1", Schedule("* * * * * *", name="every-second")))
    await new.synchronize()
    await old.synchronize()  # the stored row now says version 1
    (stored,) = await manager.backend.list_schedules()
    assert stored.version == "1"
    # when only the v2 fleet ticks from then on
    for second in (1, 2, 3):
        clock.now = utc(2026, 5, 1, 0, 0, second, 100_000)
        await new.tick()
    # then every second fired, on version 2, which the stored row now shows
    assert await _runs(manager) == [(f"schedule:every-second@2026-05-01T00:00:0{s}+00:00", "2") for s in (1, 2, 3)]
    (stored,) = await manager.backend.list_schedules()
    assert stored.version == "2"


async def test_a_schedule_keeps_firing_after_a_canary_is_rolled_back(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 8, 30))
    fleet = _process(manager, clock, _job("1", Schedule("0 9 * * *", name="daily")))
    canary = _process(manager, clock, _job("2", Schedule("0 9 * * *", name="daily")))
    await fleet.synchronize()
    await canary.synchronize()  # the canary starts, stores its version, and is stopped again
    clock.now = utc(2026, 5, 1, 9, 0, 1)
    await fleet.tick()
    assert await _runs(manager) == [("schedule:daily@2026-05-01T09:00:00+00:00", "1")]


async def test_a_worker_registering_several_versions_fires_the_newest(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 8, 30))
    # registered in any order; "10" is newer than "9" (numbers compare as numbers)
    worker = _process(manager, clock, *(_job(v, Schedule("0 9 * * *", name="daily")) for v in ("10", "9", "2")))
    await worker.synchronize()
    (stored,) = await manager.backend.list_schedules()
    assert stored.version == "10"
    clock.now = utc(2026, 5, 1, 9, 0, 1)
    await worker.tick()
    assert await _runs(manager) == [("schedule:daily@2026-05-01T09:00:00+00:00", "10")]


async def test_a_schedule_the_new_code_removed_is_not_fired_or_stored_again_by_an_old_worker(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 8, 30))
    old = _process(manager, clock, _job("1", Schedule("0 9 * * *", name="daily")))
    new = _process(manager, clock, _job("1"), _job("2"))  # same workflow: the schedule is gone from the code
    await old.synchronize()
    await new.synchronize()
    assert await manager.backend.list_schedules() == []
    clock.now = utc(2026, 5, 1, 9, 0, 1)
    await old.tick()  # the old process still runs: it stores nothing and fires nothing
    await new.tick()
    assert await manager.backend.list_schedules() == []
    assert await _runs(manager) == []
    # an old release that starts again stores it again; the new code's workers still do not fire it
    await old.synchronize()
    clock.now = utc(2026, 5, 2, 9, 0, 1)
    await new.tick()
    assert await _runs(manager) == []


async def test_a_schedule_stored_for_another_workflow_is_taken_over_with_a_warning(
    manager_for: Any, caplog: Any
) -> None:
    async def fn(input: Any) -> Any:
        return input

    manager = await manager_for([], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 8, 30))
    # two applications on one database, each with a workflow declaring a schedule named "nightly"
    first = _process(
        manager, clock, workflow(fn, version="1", name="a", schedules=[Schedule("0 9 * * *", name="nightly")])
    )
    second = _process(
        manager, clock, workflow(fn, version="1", name="b", schedules=[Schedule("0 9 * * *", name="nightly")])
    )
    await first.synchronize()
    with caplog.at_level("WARNING", logger="sonamu_tasks.scheduler"):
        await second.synchronize()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "sonamu_tasks.scheduler"]
    assert "schedule 'nightly' was stored for workflow 'a'; workflow 'b' declares it here and takes it over" in warning
    (stored,) = await manager.backend.list_schedules()
    assert stored.workflow_name == "b"
    clock.now = utc(2026, 5, 1, 9, 0, 1)
    await first.tick()
    await second.tick()
    runs = (await manager.list_runs(limit=10)).items
    assert [(run.workflow_name, run.idempotency_key) for run in runs] == [
        ("b", "schedule:nightly@2026-05-01T09:00:00+00:00")
    ]


# input callables


async def test_an_async_input_callable_is_awaited_at_each_fire(manager_for: Any) -> None:
    async def today() -> dict[str, str]:
        await asyncio.sleep(0)
        return {"date": "2026-05-01"}

    @workflow(version="1", schedules=[Schedule("0 9 * * *", name="daily", input=today)])
    async def report(input: Any) -> Any:
        return input

    manager = await manager_for([report], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 8, 30))
    scheduler = Scheduler(manager.backend, manager.registry, "UTC", clock=clock)
    await scheduler.synchronize()
    clock.now = utc(2026, 5, 1, 9, 0, 1)
    await scheduler.tick()
    (run,) = (await manager.list_runs(workflow="report")).items
    assert run.input == {"date": "2026-05-01"}


# a fire another worker holds


async def test_a_schedule_held_by_another_worker_does_not_stall_the_other_schedules(
    manager_for: Any, backend_name: str, database_url: str, schema: str
) -> None:
    @workflow(version="1", schedules=[Schedule("* * * * * *", name="a"), Schedule("* * * * * *", name="b")])
    async def ticker(input: Any) -> Any:
        return input

    manager = await manager_for([ticker], enable_worker=False)
    clock = FakeClock(utc(2026, 5, 1, 0, 0, 0, 500_000))
    scheduler = Scheduler(manager.backend, manager.registry, "UTC", clock=clock)
    await scheduler.synchronize()
    clock.now = utc(2026, 5, 1, 0, 0, 1, 100_000)
    if backend_name == "sqlite":
        # SQLite has no row locks: one writer holds the whole file. A fire waits for it (up to the busy timeout,
        # then the tick is retried), then both schedules fire.
        holder = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(1.0, holder.execute, "ROLLBACK")
        await asyncio.wait_for(scheduler.tick(), timeout=8)
        holder.close()
        fired = {"schedule:a@2026-05-01T00:00:01+00:00", "schedule:b@2026-05-01T00:00:01+00:00"}
    else:
        # PostgreSQL: a worker stuck between its fire's update and its commit holds schedule a's row
        async with await psycopg.AsyncConnection.connect(database_url) as holder, holder.transaction():
            await holder.execute(f'SELECT 1 FROM "{schema}".schedules WHERE name = %s FOR UPDATE', ["a"])
            # the tick skips a (its holder is firing it) and fires b at once, instead of waiting on the lock
            await asyncio.wait_for(scheduler.tick(), timeout=3)
        fired = {"schedule:b@2026-05-01T00:00:01+00:00"}
    keys = {run.idempotency_key for run in (await manager.list_runs(workflow="ticker")).items}
    assert keys == fired
    clock.now = utc(2026, 5, 1, 0, 0, 2, 100_000)  # released: both fire on, a catching up its missed second
    await scheduler.tick()
    await scheduler.tick()
    keys = {run.idempotency_key for run in (await manager.list_runs(workflow="ticker")).items}
    assert {f"schedule:{name}@2026-05-01T00:00:0{s}+00:00" for name in "ab" for s in (1, 2)} == keys


# cost


@pytest.mark.parametrize(
    "moment",
    [utc(2026, 5, 1, 12, 0, 0, 250_000), utc(2026, 3, 8, 7, 20), utc(2026, 11, 1, 6, 20)],
    ids=["ordinary", "after-spring-forward", "repeated-hour"],
)
def test_fire_times_of_per_second_and_per_minute_crons_are_cheap(moment: datetime) -> None:
    # Each fire computes the next: it used to walk every match from an hour back (3,600 for a per-second cron,
    # about 70 ms), blocking the event loop, so 20 per-second schedules lost fires.
    for expression in ("* * * * * *", "*/10 * * * * *", "* * * * *"):
        started = time.perf_counter()
        for _ in range(20):
            next_fire_after(expression, NEW_YORK, moment)
            latest_fire_at_or_before(expression, NEW_YORK, moment)
        each = (time.perf_counter() - started) / 40
        assert each < 0.005, f"{expression!r} at {moment}: {each * 1000:.1f} ms a call"
