"""Failover: the primary dies (kill -9 of its postmaster) mid-load and its synchronous standby is promoted.

Worker processes and a producer connected with a multi-host URL (`target_session_attrs=read-write`) follow it
to the new primary, LISTEN there again and carry on: no run lost, no completed step run again, and a `run()`
in flight at the crash returns soon after the promotion. A replica given as `read_url` serves the lists.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sonamu_tasks import RunStatus, WorkflowManager, define_config, workflow
from sonamu_tasks.testing import PostgresCluster, PostgresNotInstalled, StandbyCluster
from sonamu_tasks.testing.postgres_cluster import failover_url

from .conftest import wait_until
from .support import process_workflows
from .support.processes import WorkerProcess

OUTAGE_S = 1.0  # between the primary's death and the promotion (an orchestrator's reaction time)


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[PostgresCluster, StandbyCluster]]:
    """A primary with durable commits and a synchronous streaming standby, both stopped afterwards."""
    try:
        primary = PostgresCluster(fsync=True)
    except PostgresNotInstalled as error:
        if os.environ.get("SONAMU_TASKS_TEST_DATABASE_URL"):
            pytest.skip(f"a standby needs local PostgreSQL binaries: {error}")
        raise
    with primary, StandbyCluster(primary, synchronous=True) as standby:
        yield primary, standby


def executions(directory: Path) -> list[tuple[str, float, int]]:
    path = directory / "executions.log"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        key, at, pid = line.split()
        rows.append((key, float(at), int(pid)))
    return rows


@pytest.mark.timeout(180)
async def test_promoted_synchronous_standby_loses_no_run_and_reruns_no_completed_step(
    primary_and_standby: tuple[PostgresCluster, StandbyCluster], tmp_path: Path
) -> None:
    primary, standby = primary_and_standby
    url = failover_url(primary, standby)
    schema = "failover"
    config = define_config(
        database_url=url, schema=schema, tasks={"enable_worker": False, "worker_options": {"listen_delay": 0}}
    )
    chain = process_workflows.audited_chain
    work = {"steps": 4, "work_ms": 30, "dir": str(tmp_path)}
    async with WorkflowManager(config) as producer:
        # A 60 s poll: after the failover, new runs reach the workers only if they LISTEN again.
        workers = [
            WorkerProcess(url, schema, tmp_path, f"w{i}", workflows="audited_chain", lease_ms=2000, poll_ms=60_000)
            for i in range(2)
        ]
        try:
            ids = [(await producer.run(chain, work)).id for _ in range(60)]
            await wait_until(lambda: len(executions(tmp_path)) >= 40, timeout=60, what="steps before the crash")

            calls: list[tuple[float, float]] = []  # (began, returned) of each run() of the producer
            stop = asyncio.Event()

            async def produce() -> None:
                while not stop.is_set():
                    began = time.monotonic()
                    ids.append((await producer.run(chain, work)).id)
                    calls.append((began, time.monotonic()))
                    await asyncio.sleep(0.02)

            producing = asyncio.create_task(produce())
            await wait_until(lambda: len(calls) >= 3, what="the producer to be producing")
            died = time.monotonic()
            killed_at = await asyncio.to_thread(primary.kill_postmaster)
            await asyncio.sleep(OUTAGE_S)  # the outage an orchestrator takes to decide (not a wait on a condition)
            await asyncio.to_thread(standby.promote)
            promoted = time.monotonic()
            await wait_until(lambda: any(began > promoted for began, _ in calls), timeout=30, what="run() after")
            stop.set()
            await producing

            for run_id in ids:
                assert await producer.handle(run_id).result(timeout=90) == 4
        finally:
            for worker in workers:
                worker.stop()

        # Every run (those acknowledged before the crash and those started across it) completed once.
        runs = await producer.list_runs(limit=1000)
        assert sorted(run.id for run in runs.items) == sorted(ids)
        assert {run.status for run in runs.items} == {RunStatus.COMPLETED}

        with psycopg.connect(standby.url, autocommit=True) as conn:
            steps = conn.execute(
                f"SELECT run_id::text || '/' || name, finished_at FROM {schema}.steps WHERE status = 'completed'"
            ).fetchall()
            (first_done,) = conn.execute(
                f"SELECT min(finished_at) FROM {schema}.runs WHERE finished_at > to_timestamp(%s)", [killed_at]
            ).fetchone() or (None,)
        finished = {key: at.timestamp() for key, at in steps}
        seen = executions(tmp_path)
        rerun_after_checkpoint = [(key, at) for key, at, _ in seen if at > finished[key]]
        assert rerun_after_checkpoint == []
        assert set(finished) == {key for key, _, _ in seen}

    # The run() in flight at the crash returned soon after the promotion, not after the pool's 30 s timeout.
    stalled = [returned - promoted for began, returned in calls if began < promoted < returned]
    assert all(wait < 10 for wait in stalled), stalled
    assert first_done is not None
    to_first_completed = first_done.timestamp() - killed_at
    interrupted = len(seen) - len(finished)
    print(
        f"failover: primary death -> first completed run on the new primary {to_first_completed:.1f}s "
        f"(outage {OUTAGE_S}s, promotion {promoted - died - OUTAGE_S:.1f}s); run() in flight returned "
        f"{max(stalled, default=0):.1f}s after the promotion; interrupted steps re-run {interrupted}"
    )
    assert to_first_completed < OUTAGE_S + 15


@workflow(version="1")
async def quick(input: Any, step: Any) -> int:
    return int(await step.define("one", lambda: 1).run())


async def test_read_url_serves_the_lists_from_the_replica_and_never_the_claim(
    primary_and_standby: tuple[PostgresCluster, StandbyCluster], tmp_path: Path
) -> None:
    primary, standby = primary_and_standby
    config = define_config(
        database_url=primary.url,
        read_url=standby.url,
        tasks={"worker_options": {"listen_delay": 0, "concurrency": 2}},
    )
    env = {**os.environ, "SONAMU_TASKS_DATABASE_URL": primary.url, "SONAMU_TASKS_READ_URL": standby.url}

    def cli_lists() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "sonamu_tasks", "runs", "--json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    async def listed() -> set[str]:
        return {run.id for run in (await manager.list_runs(limit=100)).items}

    async with WorkflowManager(config, workflows=[quick]) as manager:
        first = await manager.run(quick, None)
        assert await first.result(timeout=15) == 1
        await wait_until(lambda: first.id in cli_lists(), what="the first run on the replica")

        # Replay paused on the replica: what the primary commits now is not readable there.
        with psycopg.connect(standby.url, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            # Claimed, executed and completed on the primary while the replica stands still.
            second = await manager.run(quick, None)
            assert await second.result(timeout=15) == 1
            run = await manager.get_run(second.id)  # a run's own reads: the primary
            assert run is not None and run.status is RunStatus.COMPLETED
            assert await listed() == {first.id}  # the lists: the replica
            output = cli_lists()
            assert first.id in output and second.id not in output
            conn.execute("SELECT pg_wal_replay_resume()")

        async def second_listed() -> bool:
            return second.id in await listed()

        await wait_until(second_listed, timeout=15, what="the replica to catch up")
        await wait_until(lambda: second.id in cli_lists(), what="the second run on the replica")
