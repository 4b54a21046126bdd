"""Retention on every backend: finished runs past their workflow's retention (or the default) are deleted with
their steps, messages and events, by the workers' background loop or by `purge`; unfinished runs never, nor a
finished child of an unfinished parent."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from sonamu_tasks import (
    ConfigError,
    NonRetryableError,
    RunNotFound,
    RunStatus,
    WorkflowDefinitionError,
    WorkflowManager,
    define_config,
    workflow,
)
from sonamu_tasks.cli import main as cli_main

from .conftest import wait_until

DAY_US = 86_400 * 1_000_000
# A run's rows in the tables its deletion cascades to.
CHILD_TABLES = ("steps", "messages", "run_events", "event_waits")


def _one() -> int:
    return 1


@workflow(version="1", name="ret_chatty")
async def chatty(step: Any) -> Any:
    """A step, a published event, and a message received: rows in steps, run_events and messages."""
    await step.define("one", _one).run()
    await step.set_event("progress", {"done": 1})
    return await step.receive("go", topic="go", timeout="1h")


@workflow(version="1", name="ret_broken")
async def broken(step: Any) -> Any:
    await step.define("one", _one).run()
    raise NonRetryableError("broken on purpose")


@workflow(version="1", name="ret_listener")
async def listener(step: Any) -> Any:
    """Waits for a broadcast event: an event_waits row while it waits."""
    return await step.wait_for_event("paid", "order.paid", key="7", timeout="1h")


@workflow(version="1", name="ret_sleeper")
async def sleeper(step: Any) -> Any:
    await step.sleep("nap", "1h")


@workflow(version="1", name="ret_kid")
async def kid(step: Any) -> Any:
    return await step.define("one", _one).run()


@workflow(version="1", name="ret_parent")
async def parent(step: Any) -> Any:
    """Starts a child that completes at once, then waits for a message: a finished child, an unfinished parent."""
    child = await step.start_workflow("kid", kid, None)
    await step.receive("go", topic="go", timeout="1h")
    return await child.result()


@workflow(version="1", name="ret_kept", retention="90d")
async def kept(step: Any) -> Any:
    return await step.define("one", _one).run()


@workflow(version="1", name="ret_brief", retention="1d")
async def brief(step: Any) -> Any:
    return await step.define("one", _one).run()


ALL = [chatty, broken, listener, sleeper, kid, parent, kept, brief]


async def _report(step: Any) -> Any:
    return await step.define("one", _one).run()


# One workflow, `ret_report`, in three versions, each with its own retention (or none), served by different workers.
report_brief = workflow(_report, version="1", name="ret_report", retention="1d")
report_kept = workflow(_report, version="2", name="ret_report", retention="90d")
report_plain = workflow(_report, version="3", name="ret_report")


class Database:
    """Direct access to the test's tables: to make runs look old, and to count the rows a run left."""

    def __init__(self, backend_name: str, url: str, schema: str) -> None:
        self.backend_name = backend_name
        self.url = url
        self.schema = schema

    def age(self, run_ids: list[str], days: float) -> None:
        """Make these runs look finished `days` ago: also the unfinished ones (whose status must protect them)."""
        if self.backend_name == "postgres":
            query = (
                "UPDATE runs SET finished_at = COALESCE(finished_at, now()) - make_interval(days => %(days)s)"
                " WHERE id = ANY(%(ids)s::uuid[])"
            )
            with psycopg.connect(self.url, autocommit=True, options=f"-c search_path={self.schema}") as conn:
                conn.execute(query, {"days": days, "ids": run_ids})
            return
        query = (
            "UPDATE runs SET finished_at = COALESCE(finished_at, :now) - :delta"
            " WHERE id IN (SELECT value FROM json_each(:ids))"
        )
        params = {"now": time.time_ns() // 1000, "delta": int(days * DAY_US), "ids": json.dumps(run_ids)}
        with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
            conn.execute(query, params)

    def rows(self, run_ids: list[str]) -> dict[str, int]:
        """How many rows these runs have in each table a run's deletion cascades to."""
        counts = {}
        for table in CHILD_TABLES:
            if self.backend_name == "postgres":
                query = f"SELECT count(*) FROM {table} WHERE run_id = ANY(%(ids)s::uuid[])"
                with psycopg.connect(self.url, autocommit=True, options=f"-c search_path={self.schema}") as conn:
                    row = conn.execute(query, {"ids": run_ids}).fetchone()
            else:
                query = f"SELECT count(*) FROM {table} WHERE run_id IN (SELECT value FROM json_each(:ids))"
                with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
                    row = conn.execute(query, {"ids": json.dumps(run_ids)}).fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts

    def store_retention_by_name_only(self, workflow_name: str, seconds: float) -> None:
        """What a worker of an older release stores: the workflow's retention by name alone (table
        workflow_retention), and no row per version."""
        if self.backend_name == "postgres":
            with psycopg.connect(self.url, autocommit=True, options=f"-c search_path={self.schema}") as conn:
                conn.execute("DELETE FROM workflow_version_retention WHERE workflow_name = %s", [workflow_name])
                conn.execute(
                    "INSERT INTO workflow_retention (workflow_name, seconds) VALUES (%s, %s)", [workflow_name, seconds]
                )
            return
        with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
            conn.execute("DELETE FROM workflow_version_retention WHERE workflow_name = ?", [workflow_name])
            conn.execute(
                "INSERT INTO workflow_retention (workflow_name, seconds, updated_at) VALUES (?, ?, ?)",
                [workflow_name, seconds, time.time_ns() // 1000],
            )


@pytest.fixture
def db(backend_name: str, database_url: str, schema: str) -> Database:
    return Database(backend_name, database_url, schema)


Start = Callable[..., Awaitable[WorkflowManager]]


@pytest.fixture
async def start(database_url: str, schema: str) -> AsyncIterator[Start]:
    """`await start(workflows, retention=..., retention_interval=...)` -> a started manager, stopped afterwards."""
    started: list[WorkflowManager] = []

    async def make(
        workflows: list[Any], *, retention: str | None = None, interval: str = "1h", enable_worker: bool = True
    ) -> WorkflowManager:
        config = define_config(
            database_url=database_url,
            schema=schema,
            tasks={
                "enable_worker": enable_worker,
                "worker_options": {"listen_delay": 0, "lease_ms": 2000, "concurrency": 8},
                "retention": retention,
                "retention_interval": interval,
            },
        )
        manager = WorkflowManager(config, workflows=workflows)
        await manager.start()
        started.append(manager)
        return manager

    yield make
    for manager in reversed(started):
        await manager.stop()


async def _exists(manager: WorkflowManager, run_id: str) -> bool:
    try:
        await manager.get_run(run_id)
    except RunNotFound:
        return False
    return True


async def _status(manager: WorkflowManager, run_id: str, status: RunStatus) -> bool:
    return (await manager.get_run(run_id)).status is status


async def _sweep(manager: WorkflowManager) -> int:
    assert manager.retention is not None, "a manager with a worker runs the retention loop"
    return await manager.retention.sweep()


async def test_retention_deletes_exactly_the_finished_runs_past_it_with_their_steps_messages_and_events(
    start: Start, db: Database
) -> None:
    manager = await start(ALL, retention="30d")
    # Finished: completed (with a consumed and an unconsumed message and a published event), failed, canceled
    # while waiting for an event (its event_waits row stays), and one completed run that finished recently.
    completed = await manager.run(chatty)
    await wait_until(lambda: _status(manager, completed.id, RunStatus.WAITING), what="chatty waiting")
    await manager.send(completed.id, "go", topic="go")
    await manager.send(completed.id, "left over", topic="other")
    await completed.result(timeout=15)
    failed = await manager.run(broken)
    await manager.wait_until_finished(failed.id, timeout=15)
    canceled = await manager.run(listener)
    await wait_until(lambda: _status(manager, canceled.id, RunStatus.WAITING), what="listener waiting")
    await manager.cancel(canceled.id)
    recent = await manager.run(kid)
    await recent.result(timeout=15)
    # Unfinished: pending (a later start), paused, sleeping, waiting.
    pending = await manager.run(kid, start_at="1h")
    paused = await manager.run(kid, start_at="1h")
    await manager.pause(paused.id)
    sleeping = await manager.run(sleeper)
    await wait_until(lambda: _status(manager, sleeping.id, RunStatus.SLEEPING), what="sleeper sleeping")
    waiting = await manager.run(listener)
    await wait_until(lambda: _status(manager, waiting.id, RunStatus.WAITING), what="listener waiting")

    expired = [completed.id, failed.id, canceled.id]
    unfinished = [pending.id, paused.id, sleeping.id, waiting.id]
    assert all(db.rows([run_id])["steps"] for run_id in [completed.id, failed.id])
    assert db.rows([completed.id])["messages"] == 2 and db.rows([completed.id])["run_events"] == 1
    assert db.rows([canceled.id])["event_waits"] == 1
    db.age(expired + unfinished, days=40)  # the unfinished ones get an old finished_at too: status protects them
    db.age([recent.id], days=29)

    assert await _sweep(manager) == 3
    for run_id in expired:
        assert not await _exists(manager, run_id)
    assert db.rows(expired) == dict.fromkeys(CHILD_TABLES, 0)
    for run_id in [recent.id, *unfinished]:
        assert await _exists(manager, run_id)
    assert db.rows([waiting.id])["event_waits"] == 1
    assert await _sweep(manager) == 0


async def test_a_finished_child_stays_while_its_parent_is_unfinished(start: Start, db: Database) -> None:
    manager = await start(ALL, retention="30d")
    handle = await manager.run(parent)
    await wait_until(lambda: _status(manager, handle.id, RunStatus.WAITING), what="the parent waiting")
    page = await manager.list_runs(parent_id=handle.id)
    (child,) = page.items
    await manager.wait_until_finished(child.id, timeout=15)
    db.age([handle.id, child.id], days=40)

    assert await _sweep(manager) == 0
    assert await _exists(manager, child.id)

    await manager.send(handle.id, "go", topic="go")
    assert await handle.result(timeout=15) == 1
    db.age([handle.id], days=10)  # the parent finished 10 days ago: the child stays with it
    assert await _sweep(manager) == 0
    db.age([handle.id], days=30)  # now 40 days: both go
    assert await _sweep(manager) == 2
    assert not await _exists(manager, handle.id) and not await _exists(manager, child.id)


async def test_a_workflows_own_retention_overrides_the_default_even_where_it_is_not_registered(
    start: Start, db: Database
) -> None:
    manager = await start(ALL, retention="30d")
    long_kept, short_kept, default = await asyncio.gather(manager.run(kept), manager.run(brief), manager.run(kid))
    for handle in (long_kept, short_kept, default):
        await handle.result(timeout=15)
    # Another worker that registers none of them (and has another default) still applies their own retention.
    other = await start([], retention="10d")
    db.age([short_kept.id], days=2)
    db.age([long_kept.id, default.id], days=5)
    assert await _sweep(other) == 1  # the 1-day one
    assert not await _exists(manager, short_kept.id)
    db.age([long_kept.id, default.id], days=35)  # now 40 days
    assert await _sweep(manager) == 1  # the default's; 90 days for `kept`
    assert await _exists(manager, long_kept.id) and not await _exists(manager, default.id)
    db.age([long_kept.id], days=60)  # 100 days
    assert await _sweep(other) == 1
    assert not await _exists(manager, long_kept.id)


async def _finished(manager: WorkflowManager, definition: Any) -> str:
    handle = await manager.run(definition)
    await handle.result(timeout=15)
    return handle.id


async def test_the_longest_retention_of_any_version_holds_for_all_runs_of_the_workflow_on_every_worker(
    start: Start, db: Database
) -> None:
    # Given two workers serving two versions of one workflow, version 1 kept a day, version 2 ninety days.
    brief_worker = await start([report_brief])
    kept_worker = await start([report_kept])
    runs = [await _finished(brief_worker, report_brief), await _finished(kept_worker, report_kept)]
    db.age(runs, days=2)
    # When either sweeps (each storing its own version's retention first), then neither deletes a run of either
    # version: version 2's ninety days hold for the workflow.
    assert await _sweep(brief_worker) == 0
    assert await _sweep(kept_worker) == 0
    assert await _sweep(brief_worker) == 0
    assert all([await _exists(brief_worker, run_id) for run_id in runs])
    # Past the longest, both go.
    db.age(runs, days=89)
    assert await _sweep(brief_worker) == 2
    assert not any([await _exists(brief_worker, run_id) for run_id in runs])


async def test_a_version_no_worker_serves_any_more_keeps_its_retention_until_it_is_declared_again(
    start: Start, db: Database
) -> None:
    # Given version 2 (ninety days) served once, then only version 1 (a day): version 2's declaration stays.
    retired = await start([report_kept])
    old_run = await _finished(retired, report_kept)
    await retired.stop()
    worker = await start([report_brief])
    new_run = await _finished(worker, report_brief)
    db.age([old_run, new_run], days=2)
    assert await _sweep(worker) == 0
    # When a worker declares version 2 again, with a day, that replaces it: both runs are past it.
    await start([workflow(_report, version="2", name="ret_report", retention="1d")])
    assert await _sweep(worker) == 2
    assert not await _exists(worker, old_run) and not await _exists(worker, new_run)


async def test_a_version_declaring_no_retention_counts_as_the_default_and_without_one_as_forever(
    start: Start, db: Database
) -> None:
    # Given version 1 with a day of its own and version 3 with none, and no default: kept forever.
    worker = await start([report_brief, report_plain])
    runs = [await _finished(worker, report_brief), await _finished(worker, report_plain)]
    db.age(runs, days=2)
    assert await _sweep(worker) == 0
    # With a default of ten days (the deleting worker's), version 3 counts as ten days: the longest.
    with_default = await start([], retention="10d")
    assert await _sweep(with_default) == 0
    db.age(runs, days=9)
    assert await _sweep(with_default) == 2
    assert not any([await _exists(worker, run_id) for run_id in runs])


async def test_a_retention_an_older_release_stored_by_name_counts_until_a_version_of_it_is_declared(
    start: Start, db: Database
) -> None:
    # Given a run of a workflow whose retention only a worker of an older release stored: ninety days, by name.
    worker = await start([report_plain])
    run_id = await _finished(worker, report_plain)
    await worker.stop()
    db.store_retention_by_name_only("ret_report", 90 * 86_400)
    deleting = await start([], retention="1d")
    db.age([run_id], days=2)
    # Then the deleting worker applies the ninety days, not its default.
    assert await _sweep(deleting) == 0
    # When a worker of this release declares a version of it (a day), that declaration holds instead.
    await start([report_brief])
    assert await _sweep(deleting) == 1
    assert not await _exists(deleting, run_id)


async def test_without_a_retention_runs_are_kept_forever(start: Start, db: Database) -> None:
    manager = await start([kid, chatty])
    handle = await manager.run(kid)
    await handle.result(timeout=15)
    db.age([handle.id], days=36_000)
    assert await _sweep(manager) == 0
    assert await _exists(manager, handle.id)


async def test_the_background_loop_deletes_expired_runs(start: Start, db: Database) -> None:
    manager = await start([kid], retention="1d", interval="100ms")
    handles = [await manager.run(kid) for _ in range(3)]
    for handle in handles:
        await handle.result(timeout=15)
    fresh = await manager.run(kid)
    await fresh.result(timeout=15)
    db.age([h.id for h in handles], days=2)

    async def all_gone() -> bool:
        return not any([await _exists(manager, h.id) for h in handles])

    await wait_until(all_gone, timeout=15, what="the background loop deleting the expired runs")
    assert await _exists(manager, fresh.id)


async def test_only_one_worker_deletes_at_a_time(start: Start, db: Database, backend_name: str) -> None:
    if backend_name != "postgres":
        pytest.skip("SQLite's single writer serializes the deleting batches; there is no lock to hold")
    manager = await start([kid], retention="1d")
    handle = await manager.run(kid)
    await handle.result(timeout=15)
    db.age([handle.id], days=2)
    other = await start([kid], retention="1d")
    async with other.backend.retention_lock() as held:
        assert held
        assert await _sweep(manager) == 0  # another worker holds the lock: this one deletes nothing
        assert await _exists(manager, handle.id)
    assert await _sweep(manager) == 1


async def test_purge_dry_run_counts_and_purge_deletes_by_age_status_and_workflow(start: Start, db: Database) -> None:
    manager = await start(ALL)
    done = [await manager.run(kid) for _ in range(5)]
    for handle in done:
        await handle.result(timeout=15)
    failed = await manager.run(broken)
    await manager.wait_until_finished(failed.id, timeout=15)
    pending = await manager.run(kid, start_at="1h")
    db.age([h.id for h in done] + [failed.id, pending.id], days=40)

    assert await manager.purge("30d", dry_run=True) == 6
    assert await manager.purge("30d", statuses=["failed"], dry_run=True) == 1
    assert await manager.purge("50d", dry_run=True) == 0
    assert all([await _exists(manager, h.id) for h in [*done, failed]])

    assert await manager.purge("30d", workflow="ret_broken") == 1
    assert not await _exists(manager, failed.id)
    calls: list[tuple[int, int]] = []
    assert await manager.purge("30d", batch_size=2, progress=lambda n, total: calls.append((n, total))) == 5
    assert calls[0] == (0, 5) and calls[-1] == (5, 5) and len(calls) == 4  # batches of 2, 2, 1
    assert await _exists(manager, pending.id)


async def test_purge_refuses_bad_arguments(start: Start) -> None:
    manager = await start([], enable_worker=False)
    with pytest.raises(ValueError, match="older_than"):
        await manager.purge("soon")
    with pytest.raises(ValueError, match="'running' is not a finished status"):
        await manager.purge("1d", statuses=["running"])
    with pytest.raises(ValueError, match="batch_size"):
        await manager.purge("1d", batch_size=0)


def test_a_bad_retention_is_refused_where_it_is_written() -> None:
    with pytest.raises(WorkflowDefinitionError, match="retention"):

        @workflow(version="1", retention="a month")
        async def monthly() -> None: ...

    assert workflow(kid.fn, version="2", name="k2", retention="2w").retention is not None
    with pytest.raises(ConfigError, match=r"tasks\.retention"):
        define_config(tasks={"retention": "forever"})
    with pytest.raises(ConfigError, match=r"tasks\.retention_interval"):
        define_config(tasks={"retention_interval": 0})


# the command line


@pytest.fixture
def config_option(database_url: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`--config MODULE:config` naming this test's database and schema (a module name of its own)."""
    module = f"retention_config_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from sonamu_tasks import define_config\n"
        f"config = define_config(database_url={database_url!r}, schema={schema!r})\n"
    )
    monkeypatch.chdir(tmp_path)
    yield f"{module}:config"


def _finished_runs(database_url: str, schema: str, db: Database, count: int, days: float) -> list[str]:
    async def make() -> list[str]:
        config = define_config(
            database_url=database_url, schema=schema, tasks={"worker_options": {"listen_delay": 0, "concurrency": 8}}
        )
        async with WorkflowManager(config, workflows=[kid, broken]) as manager:
            handles = [await manager.run(kid) for _ in range(count)]
            handles.append(await manager.run(broken))
            for handle in handles:
                await manager.wait_until_finished(handle.id, timeout=15)
        return [handle.id for handle in handles]

    ids = asyncio.run(make())
    db.age(ids, days=days)
    return ids


def test_purge_command_dry_run_then_delete_with_a_summary(
    database_url: str, schema: str, db: Database, config_option: str
) -> None:
    ids = _finished_runs(database_url, schema, db, count=4, days=40)
    runner = CliRunner()

    def purge(*args: str) -> Any:
        return runner.invoke(cli_main, ["--config", config_option, "purge", "--older-than", "30d", *args])

    dry = purge("--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines() == [
        "would delete 5 finished runs (completed, failed, canceled) that finished more than 30d ago",
        "(deleting those runs may make more broadcast events unreadable, which the purge deletes too)",
    ]
    as_json = purge("--status", "failed", "--dry-run", "--json")
    assert json.loads(as_json.stdout) == {
        "dry_run": True,
        "runs": 1,
        "older_than": "30d",
        "statuses": ["failed"],
        "workflow": None,
        "events": 0,
    }
    assert db.rows(ids)["steps"] == 5  # nothing deleted

    purged = purge("--workflow", "ret_kid")
    assert purged.exit_code == 0, purged.output
    assert "deleted 4 finished runs of workflow ret_kid (completed, failed, canceled)" in purged.stdout
    assert "purging" in purged.stderr  # the progress bar
    assert db.rows(ids)["steps"] == 1  # the failed run's
    rest = purge("--json")
    assert json.loads(rest.stdout)["runs"] == 1 and json.loads(rest.stdout)["dry_run"] is False


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ([], "--older-than"),
        (["--older-than", "soon"], "--older-than"),
        (["--older-than", "1d", "--status", "running"], "--status"),
        (["--older-than", "1d", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_purge_command_refuses_bad_arguments_on_one_line(args: list[str], complaint: str) -> None:
    result = CliRunner().invoke(cli_main, ["purge", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and complaint in lines[0], result.stderr
