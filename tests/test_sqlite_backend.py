"""What only the SQLite backend has to promise: its URLs, exact UTC times in integer columns, a busy file
reported as unavailable without blocking the event loop, and worker processes sharing one file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sonamu_tasks.backends.base import NewRun, RunQuery
from sonamu_tasks.backends.sqlite import SqliteBackend
from sonamu_tasks.backends.sqlite.backend import QUERIES
from sonamu_tasks.errors import BackendUnavailable, ConfigError
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.status import RunStatus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    backend = SqliteBackend(str(tmp_path / "tasks.db"))
    await backend.migrate()
    yield backend
    await backend.close()


def test_urls_name_a_path_relative_to_the_working_directory_or_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert SqliteBackend.from_url("sqlite:///data/tasks.db").path == str(tmp_path / "data" / "tasks.db")
    assert SqliteBackend.from_url("sqlite:////var/lib/tasks.db").path == "/var/lib/tasks.db"
    for wrong in ("sqlite://", "sqlite:///", "sqlite://host/tasks.db", "sqlite:///tasks.db?mode=ro"):
        with pytest.raises(ConfigError, match="no host, no query"):
            SqliteBackend.from_url(wrong)


async def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    backend = SqliteBackend(str(tmp_path / "missing" / "tasks.db"))
    with pytest.raises(ConfigError, match="does its directory exist"):
        await backend.migrate()
    await backend.close()


async def test_migrations_apply_once(backend: SqliteBackend) -> None:
    assert await backend.migrate() == []
    assert backend.pushes_notifications is False


async def test_times_are_utc_and_exact_to_the_microsecond(backend: SqliteBackend) -> None:
    seoul = timezone(timedelta(hours=9))
    start_at = datetime(2030, 5, 17, 9, 30, 15, 123457, tzinfo=seoul)
    new_run = NewRun(new_run_id(), "later", "1", '{"a": [1, null]}', start_at=start_at)
    run_id, created = await backend.create_run(new_run)
    run = await backend.get_run(run_id)
    assert created and run is not None
    assert run.available_at == start_at and run.available_at.utcoffset() == timedelta(0)
    assert run.created_at.tzinfo is not None and abs(run.created_at - datetime.now(UTC)) < timedelta(seconds=5)
    assert run.input == {"a": [1, None]} and run.output is None and run.error is None
    assert run.status is RunStatus.PENDING and run.deadline_at is None and run.started_at is None
    assert await backend.seconds_until_due([("later", "1")]) == pytest.approx(
        (start_at - datetime.now(UTC)).total_seconds(), abs=5
    )


async def test_list_runs_pages_newest_first(backend: SqliteBackend) -> None:
    ids = [(await backend.create_run(NewRun(new_run_id(), "listed", "1", "null")))[0] for _ in range(5)]
    first = await backend.list_runs(RunQuery(workflow="listed", limit=3))
    second = await backend.list_runs(RunQuery(workflow="listed", before_id=first[-1].id.upper(), limit=3))
    assert [r.id for r in first + second] == sorted(ids, reverse=True)  # ids made in one millisecond: any order
    assert await backend.list_runs(RunQuery(statuses=("completed",))) == []


async def test_a_file_locked_by_another_process_is_unavailable_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    backend = SqliteBackend(str(path), busy_timeout_s=0.5)
    await backend.migrate()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer that does not let go
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(BackendUnavailable, match="busy"):
            await backend.create_run(NewRun(new_run_id(), "w", "1", "null"))
        assert ticks >= 20  # the loop kept running while the backend's thread waited for the lock
        holder.execute("ROLLBACK")
        _, created = await backend.create_run(NewRun(new_run_id(), "w", "1", "null"))
        assert created
    finally:
        ticker.cancel()
        holder.close()
        await backend.close()


# The ranges each query must read: a claim and a worker's poll one stream per (workflow, version) it serves (the
# poll walks each stream's priority levels, then reads each level's first run), a retention batch the expired end
# of its workflow's finished runs, and the list of workflows to delete from one probe per name. Any other read of
# runs is a lookup by key.
NEXT_LEVEL = "runs_claim_queue (queue=? AND workflow_name=? AND version=? AND priority>?)"
SEEKS = {
    "next_level": [NEXT_LEVEL],
    "due_runs": ["runs_claim_queue (queue=? AND workflow_name=? AND version=? AND priority=? AND available_at<?)"],
    "next_due_at": [NEXT_LEVEL, "runs_claim_queue (queue=? AND workflow_name=? AND version=? AND priority=?)"],
    "delete_finished_runs": ["runs_finished_by_workflow (workflow_name=? AND finished_at<?)"],
    "count_finished_runs": ["runs_finished_by_workflow (workflow_name=? AND finished_at<?)"],
    "finished_workflows": ["runs_finished_by_workflow", "runs_finished_by_workflow (workflow_name>?)"],
}
# The sorts allowed: of the worker's own (workflow, version) list, and due_runs' merge of its streams (at most
# :limit runs of each). Never one of the runs a range reads.
SORTS = {
    "next_level": ["USE TEMP B-TREE FOR DISTINCT"],
    "due_runs": ["USE TEMP B-TREE FOR DISTINCT", "USE TEMP B-TREE FOR ORDER BY"],
    "next_due_at": ["USE TEMP B-TREE FOR DISTINCT"],
    "delete_finished_runs": [],
    "count_finished_runs": [],
    "finished_workflows": [],
}
PLAN_PARAMETERS = {
    "queue": "default",
    "workflows": '[["served", "1"], ["also_served", "2"]]',
    "after": -(2**31) - 1,
    "level": 0,
    "now": 0,
    "limit": 4,
    "older_than": 0,
    "statuses": '["completed", "failed", "canceled"]',
    "workflow": "w",
    "held_tokens": '["a lease token", "another"]',
}


@pytest.mark.parametrize("query", sorted(SEEKS))
async def test_claims_polls_and_retention_batches_seek_their_index_and_never_scan_runs(
    backend: SqliteBackend, query: str
) -> None:
    """A claim and a worker's poll never read the runs of workflow versions the worker does not serve, and a
    retention batch reads only expired finished runs, oldest first, up to its limit. Without statistics SQLite's
    planner walked the whole queue for the first (50,000 runs nobody served: 10 ms a claim instead of 0.1), and
    read and sorted every finished run for the second (0.2 s a batch with 100,000), both under the write lock."""
    with contextlib.closing(sqlite3.connect(backend.path)) as conn:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {QUERIES[query]}", PLAN_PARAMETERS)]
    reads = [step for step in plan if re.match(r"(SEARCH|SCAN) (runs|r|d|p)\b", step)]  # runs and its aliases
    ranges = [step.partition(" INDEX ")[2] for step in reads if not step.endswith(("(id=?)", "(rowid=?)"))]
    # finished_workflows' first probe reads the first entry of the index (ORDER BY ... LIMIT 1): a SCAN that stops.
    scans = [step for step in reads if not step.startswith("SEARCH")]
    assert scans == (["SCAN runs USING INDEX runs_finished_by_workflow"] if query == "finished_workflows" else []), plan
    assert ranges == SEEKS[query], plan
    assert [step for step in plan if "TEMP B-TREE" in step] == SORTS[query], plan


# Each process migrates the fresh file at the same moment, then claims and completes runs until none is due.
CLAIMER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from datetime import timedelta
    from pathlib import Path
    from sonamu_tasks.backends.sqlite import SqliteBackend

    async def main(path, name, go):
        backend = SqliteBackend(path)
        await backend.migrate()
        while not Path(go).exists():
            time.sleep(0.005)
        mine = []
        while claimed := await backend.claim_runs(name, [("race", "1")], 3, timedelta(seconds=60)):
            for run in claimed:
                await backend.complete_run(run.id, run.lease_token, json.dumps(name))
                mine.append(run.id)
        await backend.close()
        print(json.dumps(mine))

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_processes_sharing_one_file_claim_and_complete_each_run_once(tmp_path: Path) -> None:
    path, go = str(tmp_path / "shared.db"), str(tmp_path / "go")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, path, f"worker-{i}", go], stdout=subprocess.PIPE, text=True, env=env
        )
        for i in range(4)
    ]
    try:
        backend = SqliteBackend(path)
        await backend.migrate()
        ids = {(await backend.create_run(NewRun(new_run_id(), "race", "1", "null")))[0] for _ in range(200)}
        Path(go).touch()
        outputs = [await asyncio.to_thread(claimer.communicate, timeout=60) for claimer in claimers]
        assert [claimer.returncode for claimer in claimers] == [0, 0, 0, 0]
        claimed = [run_id for stdout, _ in outputs for run_id in json.loads(stdout)]
        assert sorted(claimed) == sorted(ids)  # every run once: none lost, none claimed twice
        for run_id in ids:
            run = await backend.get_run(run_id)
            assert run is not None and run.status is RunStatus.COMPLETED and run.recoveries == 0
        await backend.close()
    finally:
        for claimer in claimers:
            if claimer.poll() is None:
                claimer.kill()
                claimer.wait()


def test_a_sync_client_closed_from_an_atexit_handler_exits_cleanly(tmp_path: Any) -> None:
    """By the time atexit handlers run, Python's thread pools take no more work; closing must not raise."""
    script = tmp_path / "close_at_exit.py"
    script.write_text(
        "import atexit\n"
        "from sonamu_tasks import SyncClient\n"
        f"client = SyncClient({{'database_url': 'sqlite:///{tmp_path}/x.db'}})\n"
        "atexit.register(client.close)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


async def test_a_start_on_an_up_to_date_file_does_not_wait_for_another_processs_write_lock(tmp_path: Path) -> None:
    """Every process migrates and stores its queues as it starts, the CLI's `runs` too: both took the write
    lock even with nothing to change, so a reading command waited for a long write (30 s, then failed)."""
    from sonamu_tasks import Queue, WorkflowManager, define_config, workflow

    @workflow(version="1", queue=Queue("reports", concurrency=2))
    async def report(input: Any) -> Any:
        return input

    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    config = define_config(database_url=url, tasks={"enable_worker": False})
    async with WorkflowManager(config, workflows=[report]) as first:
        await first.run(report, 1)
    writer = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process in a long write transaction
    try:
        async with asyncio.timeout(5):  # the busy timeout is 10 s: waiting for the lock would show
            async with WorkflowManager(config, workflows=[report]) as reader:
                assert len((await reader.list_runs()).items) == 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()


async def test_a_read_only_database_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    from sonamu_tasks.backends.sqlite.database import Database

    database = Database(str(tmp_path / "tasks.db"), busy_timeout_s=1)
    refused = sqlite3.OperationalError("attempt to write a readonly database")
    refused.sqlite_errorcode = sqlite3.SQLITE_READONLY_DBMOVED  # an extended code of SQLITE_READONLY
    with pytest.raises(ConfigError, match=r"tasks\.db is read-only .* must be writable"), database._translated_errors():
        raise refused


def test_a_schema_given_with_a_sqlite_url_is_said_to_be_ignored(tmp_path: Path, caplog: Any) -> None:
    from sonamu_tasks import define_config
    from sonamu_tasks.backends.factory import backend_for

    config = define_config(database_url=f"sqlite:///{tmp_path / 'shared.db'}", schema="app_b")
    backend_for(config)
    backend_for(config)
    said = [r.getMessage() for r in caplog.records if "is ignored on SQLite" in r.getMessage()]
    assert len(said) == 1 and "'app_b'" in said[0] and "shared.db" in said[0]
