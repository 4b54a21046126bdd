"""One run's bad data never harms another, and a write the database refuses is not retried as an outage."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sonamu_tasks import RetryPolicy, RunStatus, StorageError, workflow
from sonamu_tasks.backends.base import NewRun
from sonamu_tasks.backends.group_commit import GroupCommit
from sonamu_tasks.errors import BackendUnavailable
from sonamu_tasks.ids import new_run_id


async def test_a_batch_refused_for_one_item_is_written_item_by_item() -> None:
    batches: list[list[str]] = []

    async def flush(batch: list[str]) -> list[bool]:
        batches.append(batch)
        await asyncio.sleep(0.005)
        if "bad" in batch:
            raise StorageError("refused: bad")
        return [True] * len(batch)

    commit: GroupCommit[str, bool] = GroupCommit(flush, in_flight=1)
    outcomes = await asyncio.gather(*(commit.submit(key) for key in ["a", "bad", "b"]), return_exceptions=True)
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], StorageError)
    assert batches[0] == ["a", "bad", "b"] and ["a"] in batches and ["b"] in batches


async def test_an_outage_is_not_split_into_single_writes() -> None:
    calls = 0

    async def flush(batch: list[str]) -> list[bool]:
        nonlocal calls
        calls += 1
        raise BackendUnavailable("server went away")

    commit: GroupCommit[str, bool] = GroupCommit(flush, in_flight=1)
    outcomes = await asyncio.gather(*(commit.submit(k) for k in "abc"), return_exceptions=True)
    assert all(isinstance(o, BackendUnavailable) for o in outcomes)
    assert calls == 1  # every submitter retries on its own; the batch is not hammered item by item


@pytest.mark.parametrize("backend_name", ["postgres"])
async def test_postgres_refusing_one_runs_checkpoint_fails_only_that_run(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)
    backend = manager.backend
    for name in ("good", "bad"):
        await backend.create_run(NewRun(new_run_id(), name, "1", "null"))
    claimed = await backend.claim_runs("w", [("good", "1"), ("bad", "1")], 2, timedelta(seconds=30))
    runs = {run.workflow_name: run for run in claimed}
    now = datetime.now(UTC)
    # JSON text PostgreSQL's jsonb refuses (a NUL escape), bypassing the engine's own check: both writes are
    # submitted in one event-loop step, so they share a batch.
    good, bad = await asyncio.gather(
        backend.save_step(runs["good"].id, runs["good"].lease_token, "s", '"fine"', now, now),
        backend.save_step(runs["bad"].id, runs["bad"].lease_token, "s", '"a\\u0000b"', now, now),
        return_exceptions=True,
    )
    assert good is None
    assert isinstance(bad, StorageError)
    stored = await backend.get_run(runs["good"].id, with_steps=True)
    assert stored is not None and [s.output for s in stored.steps] == ["fine"]


@pytest.mark.parametrize("backend_name", ["postgres"])  # SQLite stores that JSON as text
async def test_a_run_the_database_refuses_fails_only_its_own_caller_among_concurrent_calls(manager_for: Any) -> None:
    # On PostgreSQL concurrent run() calls share one insert statement (backend.create_run batches them); the
    # one the database refuses must not take the others down with it.
    manager = await manager_for([], enable_worker=False)
    backend = manager.backend
    good = [NewRun(new_run_id(), "w", "1", f'{{"n": {n}}}') for n in range(20)]
    bad = NewRun(new_run_id(), "w", "1", '"a\\u0000b"')  # jsonb refuses a NUL escape; the engine's check is bypassed
    outcomes = await asyncio.gather(
        *(backend.create_run(run) for run in [*good[:10], bad, *good[10:]]), return_exceptions=True
    )
    assert isinstance(outcomes[10], StorageError)
    assert [outcome for index, outcome in enumerate(outcomes) if index != 10] == [(run.id, True) for run in good]
    stored = {run.id: run.input for run in (await manager.list_runs(limit=100)).items}
    assert stored == {run.id: {"n": n} for n, run in enumerate(good)}


@pytest.mark.parametrize("backend_name", ["postgres"])
async def test_postgres_data_errors_fail_at_once_instead_of_being_retried(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)
    backend = manager.backend
    await backend.create_run(NewRun(new_run_id(), "w", "1", "null"))
    (run,) = await backend.claim_runs("w", [("w", "1")], 1, timedelta(seconds=30))
    now = datetime.now(UTC)
    started = time.monotonic()
    with pytest.raises(StorageError, match="SQLSTATE 54000"):  # index row size exceeded
        await backend.save_step(run.id, run.lease_token, os.urandom(5_000).hex(), "1", now, now)
    with pytest.raises(StorageError, match="SQLSTATE 54000"):  # incompressible: too large for the unique index
        await backend.create_run(NewRun(new_run_id(), "w", "1", "null", idempotency_key=os.urandom(50_000).hex()))
    assert time.monotonic() - started < 5


async def test_a_failure_the_database_refuses_is_still_recorded_under_the_retry_policy(manager_for: Any) -> None:
    """Were the failure not recordable, the run would stay 'running' until its lease expired and loop through
    take-overs up to the recovery limit. The attempt records a plain account instead."""

    async def breaks() -> None:
        raise ValueError("the real error")

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=1))
    async def fails(step: Any) -> Any:
        await step.define("s", breaks).run()

    manager = await manager_for([fails])
    original = manager.backend.fail_attempt
    refused: list[Any] = []

    async def refuse_step_records(run_id: str, token: str, error: Any, step: Any, delay: Any) -> None:
        if step is not None:
            refused.append(step)
            raise StorageError("refused (simulated): the step record cannot be stored")
        await original(run_id, token, error, step, delay)

    manager.backend.fail_attempt = refuse_step_records  # type: ignore[method-assign]
    handle = await manager.run(fails)
    with pytest.raises(Exception, match="the real error"):
        await handle.result(timeout=15)
    run = await handle.info()
    assert refused and run.status is RunStatus.FAILED and run.attempts == 1 and run.recoveries == 0
    assert run.error is not None and run.error["type"] == "ValueError"
    assert "could not be stored" in run.error["message"]
