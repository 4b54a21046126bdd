"""Guarantee 7: PostgreSQL restarting under a busy worker is survived; nothing is failed because of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from sonamu_tasks import ResultTimeout, RunStatus, WorkflowManager, define_config, workflow
from sonamu_tasks.backends.postgres import backend as postgres_backend
from sonamu_tasks.testing import PostgresCluster, PostgresNotInstalled

from .conftest import wait_until

executions: dict[str, int] = {}


async def slow_step(key: str) -> str:
    executions[key] = executions.get(key, 0) + 1
    await asyncio.sleep(0.05)
    return key


@workflow(version="1")
async def many_steps(input: Any, step: Any) -> int:
    for index in range(input["steps"]):
        await step.define(f"step-{index}", slow_step).run(f"{input['tag']}-{index}")
    return int(input["steps"])


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: restarting the shared one would disturb the other tests.

    Durable commits (the shared test cluster turns them off for speed): an immediate stop is a crash, and a
    checkpoint acknowledged by an asynchronous commit may be lost in one.
    """
    try:
        cluster = PostgresCluster(fsync=True)
    except PostgresNotInstalled as error:
        if os.environ.get("SONAMU_TASKS_TEST_DATABASE_URL"):
            pytest.skip(f"restarting a server needs local PostgreSQL binaries: {error}")
        raise
    with cluster:
        yield cluster


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_runs_finish_across_a_postgres_restart(own_cluster: PostgresCluster, mode: str) -> None:
    def config(enable_worker: bool) -> Any:
        return define_config(
            database_url=own_cluster.url,
            schema=f"restart_{mode}",
            tasks={
                "enable_worker": enable_worker,
                # A long poll interval: after the restart, new runs are found only if LISTEN came back.
                "worker_options": {
                    "concurrency": 4,
                    "listen_delay": 0,
                    "lease_ms": 10_000,
                    "poll_interval_ms": 60_000,
                },
            },
        )

    async with (
        WorkflowManager(config(True), workflows=[many_steps]) as worker,
        WorkflowManager(config(False)) as client,
    ):
        handles = [await client.run(many_steps, {"steps": 30, "tag": f"{mode}{i}"}) for i in range(4)]
        await wait_until(lambda: len([k for k in executions if k.startswith(mode)]) >= 8, what="steps to run")

        await asyncio.to_thread(own_cluster.restart, mode)

        results = [await h.result(timeout=60) for h in handles]
        assert results == [30, 30, 30, 30]
        for handle in handles:
            run = await handle.info()
            assert run.status is RunStatus.COMPLETED and run.attempts == 0
        # Every step of every run executed exactly once: no checkpoint was lost to the restart.
        mine = {k: v for k, v in executions.items() if k.startswith(mode)}
        assert len(mine) == 120 and set(mine.values()) == {1}

        # Started after the restart from another process: the worker hears of it through NOTIFY.
        after = await client.run(many_steps, {"steps": 1, "tag": f"{mode}-after"})
        assert await after.result(timeout=20) == 1
        assert worker.worker is not None


@contextlib.asynccontextmanager
async def server_down(cluster: PostgresCluster) -> AsyncIterator[None]:
    """The cluster stopped for the block; started again afterwards, whatever the block raised."""
    await asyncio.to_thread(cluster.stop, "fast")
    try:
        yield
    finally:
        if not await asyncio.to_thread(cluster.is_running):
            await asyncio.to_thread(cluster.start)


async def test_calls_go_through_soon_after_a_long_outage(
    own_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool tries to reconnect every 2 s at most, however long the outage: a call waiting all along goes
    through within seconds of the server's return. (psycopg_pool's attempt doubles its gaps with no cap: after an
    8 s outage its next try came 5-8 s after the server was back, after 40 s some 20 s after.) The LISTEN
    connection's loss is said once, and its return once (it was said at every reconnection attempt, over two
    lines each, and its return never)."""
    config = define_config(database_url=own_cluster.url, schema="restart_outage", tasks={"enable_worker": False})
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.WARNING, logger="sonamu_tasks")
    async with WorkflowManager(config) as client:
        await client.run(many_steps, {"steps": 1, "tag": "outage-before"})
        async with server_down(own_cluster):
            waiting = asyncio.create_task(client.run(many_steps, {"steps": 1, "tag": "outage-during"}))
            # The length of the outage, not a wait for something to happen: the call waits all along.
            await asyncio.sleep(8)
            assert not waiting.done()
            await asyncio.to_thread(own_cluster.start)
        back = loop.time()
        await asyncio.wait_for(waiting, 30)
        assert loop.time() - back < 3.5, f"run() went through {loop.time() - back:.1f}s after the server was back"
        await wait_until(lambda: "LISTEN connection back" in caplog.text, what="the LISTEN connection back")
    lost = [r.getMessage() for r in caplog.records if "LISTEN connection lost" in r.getMessage()]
    assert len(lost) == 1 and "\n" not in lost[0], lost


stuck_steps_started: list[str] = []


async def stuck_step() -> None:
    stuck_steps_started.append("started")
    await asyncio.sleep(600)


@workflow(version="1")
async def stuck(input: Any, step: Any) -> None:
    await step.define("stuck", stuck_step).run()


async def test_stop_keeps_its_grace_while_the_database_is_down(own_cluster: PostgresCluster) -> None:
    """stop() with the database down gives up handing back (5 s) and deregistering (2 s) in time: the wait
    for a pooled connection is bounded by the caller's deadline, not the pool's 30 s timeout (it returned after
    62 s, past a supervisor's SIGKILL)."""
    grace_s = 1.0
    config = define_config(
        database_url=own_cluster.url,
        schema="restart_stop",
        tasks={"worker_options": {"listen_delay": 0, "lease_ms": 2000, "shutdown_grace_ms": int(grace_s * 1000)}},
    )
    manager = WorkflowManager(config, workflows=[stuck])
    await manager.start()
    try:
        await manager.run(stuck, None)
        await wait_until(lambda: stuck_steps_started, what="the step to start")
        async with server_down(own_cluster):
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.wait_for(manager.stop(), 30)
            took = loop.time() - began
    finally:
        await manager.stop()
    # The grace, then at most 5 s for the hand-back and 2 s for deregistering, and a little for the rest.
    assert took < grace_s + 5 + 2 + 3, f"stop() took {took:.1f}s"


async def test_result_and_get_event_keep_their_timeout_while_the_database_is_down(own_cluster: PostgresCluster) -> None:
    """result(timeout=2) with the database down raises ResultTimeout (status unknown) by its timeout, and
    get_event(timeout=2) returns None by it; both waited 30 s for a pooled connection and raised
    BackendUnavailable."""
    config = define_config(database_url=own_cluster.url, schema="restart_waits", tasks={"enable_worker": False})
    loop = asyncio.get_running_loop()
    async with WorkflowManager(config) as client:
        handle = await client.run(many_steps, {"steps": 1, "tag": "waits"})  # pending: no worker
        async with server_down(own_cluster):
            began = loop.time()
            with pytest.raises(ResultTimeout, match="status unknown: the database did not answer") as raised:
                await asyncio.wait_for(handle.result(timeout=2), 10)
            assert raised.value.status == "unknown"
            assert loop.time() - began < 3.5, f"result(timeout=2) took {loop.time() - began:.1f}s"
            began = loop.time()
            assert await asyncio.wait_for(handle.get_event("progress", timeout=2), 10) is None
            assert loop.time() - began < 3.5, f"get_event(timeout=2) took {loop.time() - began:.1f}s"
        # The database back, the normal path's message says the real status.
        with pytest.raises(ResultTimeout, match="it is pending"):
            await asyncio.wait_for(handle.result(timeout=3), 40)


def listener_pids(url: str, schema: str) -> set[int]:
    """The server processes of the LISTEN connections on `schema`'s channel (their last statement is the LISTEN
    or a probe; no other connection of the engine runs either)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query IN (%s, 'SELECT 1') AND pid <> pg_backend_pid()",
            [f'LISTEN "sonamu_tasks:{schema}"'],
        ).fetchall()
    return {pid for (pid,) in rows}


async def test_a_silent_listen_connection_is_replaced(
    own_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The LISTEN connection's server process frozen (SIGSTOP: what a dropped NAT entry or a dead host looks
    like from the client) is noticed by the probe's timeout, said in the log, and replaced within seconds. (The
    probe had no timeout: wake-ups stopped, with no log line, until TCP gave up, 15 min or more.)"""
    monkeypatch.setattr(postgres_backend, "LISTEN_IDLE_S", 0.5)
    monkeypatch.setattr(postgres_backend, "LISTEN_ANSWER_S", 1)
    schema = "restart_listen"
    config = define_config(database_url=own_cluster.url, schema=schema, tasks={"worker_options": {"listen_delay": 0}})
    async with WorkflowManager(config, workflows=[many_steps]):
        frozen = await wait_until(lambda: listener_pids(own_cluster.url, schema), what="the LISTEN connection")
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            # The probe's timeout, psycopg's wait for the cancelled probe (5 s), the reconnect.
            await wait_until(
                lambda: listener_pids(own_cluster.url, schema) - frozen, timeout=15, what="a new LISTEN connection"
            )
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
    assert "LISTEN connection silent" in caplog.text
