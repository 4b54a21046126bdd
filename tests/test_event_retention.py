"""Broadcast events (`manager.emit`) no stored run can read any more are deleted by the retention pass and by
`purge`, on every backend: those emitted before the creation of the oldest run that is not completed (failed and
canceled runs count: a retry starts them again), less the hour's margin (retention.EVENT_MARGIN). An event a run
may still read is kept, and the run reads it after the pass; nothing else is deleted.

The tests make rows old by writing their times directly (`Database.age_*`), as tests/test_retention.py does."""

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

from sonamu_tasks import NonRetryableError, RunStatus, WorkflowManager, define_config, workflow
from sonamu_tasks.cli import main as cli_main

from .conftest import wait_until

HOUR_US = 3_600 * 1_000_000
TABLES = ("runs", "steps", "messages", "run_events", "event_waits")

FAILING: set[str] = set()
"""Inputs (keys) for which `flaky`'s first step fails, until the test takes them out."""


def _check(key: str) -> str:
    if key in FAILING:
        raise NonRetryableError(f"failing for {key} on purpose")
    return key


@workflow(version="1", name="evr_late_listener")
async def late_listener(input: Any, step: Any) -> Any:
    """Publishes an event of its own, then waits for a message before it waits for the broadcast event: it reads
    the event only when told to, after the retention pass."""
    await step.set_event("stage", "before")
    await step.receive("go", topic="go", timeout="1h")
    return await step.wait_for_event("paid", "order.paid", key=input, timeout="1h")


@workflow(version="1", name="evr_flaky")
async def flaky(input: Any, step: Any) -> Any:
    await step.define("check", _check).run(input)
    return await step.wait_for_event("paid", "order.paid", key=input, timeout="1h")


@workflow(version="1", name="evr_quick")
async def quick(step: Any) -> Any:
    return 1


class Database:
    """Direct access to the test's tables: to make events and runs look old, and to count rows."""

    def __init__(self, backend_name: str, url: str, schema: str) -> None:
        self.backend_name = backend_name
        self.url = url
        self.schema = schema

    def _execute(self, postgres: str, sqlite: str, params: dict[str, Any]) -> list[Any]:
        if self.backend_name == "postgres":
            with psycopg.connect(self.url, autocommit=True, options=f"-c search_path={self.schema}") as conn:
                cursor = conn.execute(postgres, params)
                return cursor.fetchall() if cursor.description else []
        with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sqlite, {**params, "now": time.time_ns() // 1000}).fetchall()

    def age_events(self, key: str, hours: float) -> None:
        """Make the events of this key look emitted `hours` ago."""
        self._execute(
            "UPDATE events SET emitted_at = now() - make_interval(secs => %(hours)s * 3600) WHERE key = %(key)s",
            "UPDATE events SET emitted_at = :now - :delta WHERE key = :key",
            {"hours": hours, "delta": int(hours * HOUR_US), "key": key},
        )

    def age_run(self, run_id: str, hours: float) -> None:
        """Make this run look created `hours` ago."""
        self._execute(
            "UPDATE runs SET created_at = now() - make_interval(secs => %(hours)s * 3600) WHERE id = %(id)s",
            "UPDATE runs SET created_at = :now - :delta WHERE id = :id",
            {"hours": hours, "delta": int(hours * HOUR_US), "id": run_id},
        )

    def event_keys(self) -> list[str]:
        rows = self._execute("SELECT key FROM events ORDER BY key", "SELECT key FROM events ORDER BY key", {})
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        """How many rows each table but events holds."""
        return {
            table: int(self._execute(f"SELECT count(*) FROM {table}", f"SELECT count(*) FROM {table}", {})[0][0])
            for table in TABLES
        }


@pytest.fixture
def db(backend_name: str, database_url: str, schema: str) -> Database:
    return Database(backend_name, database_url, schema)


Start = Callable[..., Awaitable[WorkflowManager]]


@pytest.fixture
async def start(connection_settings: dict[str, Any], schema: str) -> AsyncIterator[Start]:
    """`await start(workflows, interval=...)` -> a started manager (no retention of runs), stopped afterwards."""
    started: list[WorkflowManager] = []

    async def make(workflows: list[Any], *, interval: str = "1h") -> WorkflowManager:
        config = define_config(
            **connection_settings,
            schema=schema,
            tasks={
                "worker_options": {"listen_delay": 0, "lease_ms": 2000, "concurrency": 8},
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


async def _sweep(manager: WorkflowManager) -> int:
    assert manager.retention is not None, "a manager with a worker runs the retention loop"
    return await manager.retention.sweep()


async def _status(manager: WorkflowManager, run_id: str, status: RunStatus) -> bool:
    return (await manager.get_run(run_id)).status is status


async def test_the_background_loop_deletes_events_no_run_can_read_without_any_retention_configured(
    start: Start, db: Database
) -> None:
    manager = await start([quick], interval="100ms")
    # Given events emitted two hours ago, and runs that all completed since (none may wait any more)
    for n in range(5):
        await manager.emit("order.paid", {"n": n}, key="old")
    db.age_events("old", hours=2)
    for _ in range(2):
        await (await manager.run(quick)).result(timeout=15)
    await manager.emit("order.paid", "fresh", key="fresh")  # within the margin: kept
    before = db.counts()

    # When the loop makes its passes, then the old events go, the one within the margin stays, and nothing else
    await wait_until(lambda: db.event_keys() == ["fresh"], what="the retention loop deleting the old events")
    assert db.counts() == before


async def test_an_event_newer_than_the_oldest_unfinished_run_is_kept_and_that_run_receives_it_after_the_pass(
    start: Start, db: Database
) -> None:
    manager = await start([late_listener])
    # Given an event of key 7 emitted three hours ago, a run created two hours ago, which has not reached its
    # wait yet, and events emitted an hour and a half ago (key 7, the one it will read, and key 8)
    await manager.emit("order.paid", "too early", key="early")
    run = await manager.run(late_listener, "7")
    await wait_until(lambda: _status(manager, run.id, RunStatus.WAITING), what="the run waiting for its message")
    await manager.emit("order.paid", "paid", key="7")
    await manager.emit("order.paid", "another order", key="8")
    db.age_events("early", hours=3)
    db.age_run(run.id, hours=2)
    db.age_events("7", hours=1.5)
    db.age_events("8", hours=1.5)
    before = db.counts()

    # When the retention makes a pass
    assert await _sweep(manager) == 0  # no run deleted

    # Then only the event emitted before the run was created is gone, and the run reads its event afterwards
    assert db.event_keys() == ["7", "8"]
    assert db.counts() == before
    await manager.send(run.id, "go", topic="go")
    assert await run.result(timeout=15) == "paid"


async def test_a_failed_run_retried_after_the_pass_still_reads_the_events_it_could_read_before(
    start: Start, db: Database
) -> None:
    key = f"k-{uuid.uuid4().hex[:8]}"
    FAILING.add(key)
    try:
        manager = await start([flaky])
        # Given an event emitted before the run was created, the run failed, and its event emitted after its
        # creation, all more than the margin ago
        await manager.emit("order.paid", "too early", key="early")
        run = await manager.run(flaky, key)
        await manager.wait_until_finished(run.id, timeout=15)
        assert (await manager.get_run(run.id)).status is RunStatus.FAILED
        await manager.emit("order.paid", "paid", key=key)
        db.age_events("early", hours=4)
        db.age_run(run.id, hours=3)
        db.age_events(key, hours=2)
        before = db.counts()

        # When the retention makes a pass
        await _sweep(manager)

        # Then the failed run keeps its event (a retry may wait for it), and the retried run reads it
        assert db.event_keys() == [key]
        assert db.counts() == before
        FAILING.discard(key)
        await manager.retry(run.id)
        assert await run.result(timeout=15) == "paid"
    finally:
        FAILING.discard(key)


async def test_a_completed_run_keeps_no_event_and_the_horizon_is_the_oldest_run_that_may_still_wait(
    start: Start, db: Database
) -> None:
    manager = await start([quick, late_listener])
    # Given events emitted 5, 4, 3 and 2 hours ago, a completed run created 4.5 hours ago (it never waits again),
    # and a waiting run created 2.5 hours ago
    for key in ("5h", "4h", "3h", "2h"):
        await manager.emit("order.paid", key, key=key)
    done = await manager.run(quick)
    await done.result(timeout=15)
    waiting = await manager.run(late_listener, "2h")
    await wait_until(lambda: _status(manager, waiting.id, RunStatus.WAITING), what="the run waiting")
    for key, hours in (("5h", 5), ("4h", 4), ("3h", 3), ("2h", 2)):
        db.age_events(key, hours=hours)
    db.age_run(done.id, hours=4.5)
    db.age_run(waiting.id, hours=2.5)

    await _sweep(manager)
    # The horizon is the waiting run's creation less the margin of an hour: 3.5 hours ago. The completed run
    # counts for nothing; the event of 3 hours ago, emitted before the waiting run, is within the margin.
    assert db.event_keys() == ["2h", "3h"]
    await manager.send(waiting.id, "go", topic="go")
    assert await waiting.result(timeout=15) == "2h"


# the command line


@pytest.fixture
def config_option(connection_settings: dict[str, Any], schema: str, tmp_path: Path, monkeypatch: Any) -> Iterator[str]:
    """`--config MODULE:config` naming this test's database and schema (a module name of its own)."""
    module = f"event_retention_config_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from sonamu_tasks import define_config\n"
        f"config = define_config(database_url={connection_settings['database_url']!r}, schema={schema!r})\n"
    )
    monkeypatch.chdir(tmp_path)
    yield f"{module}:config"


def test_purge_counts_then_deletes_the_events_no_run_can_read(
    connection_settings: dict[str, Any], schema: str, db: Database, config_option: str
) -> None:
    async def emit() -> None:
        config = define_config(**connection_settings, schema=schema, tasks={"enable_worker": False})
        async with WorkflowManager(config) as manager:
            for n in range(3):
                await manager.emit("order.paid", n, key="old")
            await manager.emit("order.paid", "fresh", key="fresh")

    asyncio.run(emit())
    db.age_events("old", hours=2)
    runner = CliRunner()

    def purge(*args: str) -> Any:
        return runner.invoke(cli_main, ["--config", config_option, "purge", "--older-than", "30d", *args])

    dry = purge("--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines()[-1] == "would delete 3 broadcast events no run can read any more"
    assert json.loads(purge("--dry-run", "--json").stdout)["events"] == 3
    assert db.event_keys() == ["fresh", "old", "old", "old"]

    purged = purge()
    assert purged.exit_code == 0, purged.output
    assert purged.stdout.splitlines()[-1] == "deleted 3 broadcast events no run can read any more"
    assert "purging events" in purged.stderr  # the progress bar
    assert db.event_keys() == ["fresh"]
    again = purge("--json")
    assert json.loads(again.stdout)["events"] == 0  # none left to delete


async def test_manager_purge_events_counts_then_deletes_what_no_run_can_read(
    connection_settings: dict[str, Any], schema: str, db: Database
) -> None:
    config = define_config(**connection_settings, schema=schema, tasks={"enable_worker": False})
    async with WorkflowManager(config) as manager:
        for n in range(2):
            await manager.emit("order.paid", n, key="old")
        await manager.emit("order.paid", "fresh", key="fresh")
        db.age_events("old", hours=2)
        assert await manager.purge_events(dry_run=True) == 2
        assert db.event_keys() == ["fresh", "old", "old"]
        seen: list[tuple[int, int]] = []
        assert await manager.purge_events(progress=lambda done, total: seen.append((done, total))) == 2
        assert db.event_keys() == ["fresh"] and seen[-1] == (2, 2)
