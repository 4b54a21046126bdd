"""A take-over is logged by the worker that takes the run: the run, its workflow, the worker that held it before
and when that lease ran out (observability audit: only `recoveries` and a metric told)."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sonamu_tasks import WorkflowManager, workflow
from sonamu_tasks.backends.base import ClaimedRun, NewRun
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.worker import TAKE_OVERS_LOGGED_PER_CLAIM

from .conftest import wait_until
from .support.attempts import first_attempt_vanishes
from .support.processes import audit_lines
from .test_processes import start_worker  # noqa: F401 - a fixture

THREE_STEPS = {"name": "three_steps", "version": "1"}


@workflow(version="1")
async def quick(input: Any) -> Any:
    return input


async def test_the_worker_taking_over_a_killed_workers_run_logs_the_run_and_the_dead_worker(
    make_config: Any,
    start_worker: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with WorkflowManager(make_config(enable_worker=False)) as client:
        first = start_worker("first", lease_ms=1000)
        handle = await client.run(THREE_STEPS, {"dir": str(tmp_path)})
        await wait_until(lambda: any(name == "two-start" for name, _ in audit_lines(tmp_path)), what="step two")
        dead_worker = (await handle.info()).worker_id
        assert dead_worker is not None and f":{first.pid}:" in dead_worker

        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        (tmp_path / "release").touch()
        second = start_worker("second", lease_ms=1000)
        assert (await handle.result(timeout=30))["finished_in"] == second.pid

    lines = [line for line in second.log().splitlines() if f"took over run {handle.id}" in line]
    assert len(lines) == 1, second.log()
    line = lines[0]
    assert " WARNING " in line and "sonamu_tasks.worker" in line
    assert "(three_steps@1, attempt 1, take-over 1)" in line
    assert f"from worker {dead_worker}, whose lease ran out" in line
    assert "took back" not in second.log()


async def test_a_worker_taking_back_a_run_its_own_attempt_left_says_it_held_it_itself(
    make_config: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its lease ran out with this worker's attempt gone (a database outage outlasted the lease, say): the same
    worker claims it again, and says so rather than naming itself as a dead worker."""
    first_attempt_vanishes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sonamu_tasks.worker"):
        async with WorkflowManager(make_config(lease_ms=1000), workflows=[quick]) as manager:
            assert manager.worker is not None
            handle = await manager.run(quick, "left-behind")
            assert await handle.result(timeout=20) == "left-behind"
            own_id = manager.worker.id

    (record,) = [r for r in caplog.records if getattr(r, "run_id", None) == handle.id]
    assert record.levelno == logging.WARNING and record.name == "sonamu_tasks.worker"
    assert (record.workflow, record.attempt, record.recoveries, record.taken_from) == ("quick", 1, 1, own_id)  # type: ignore[attr-defined]
    message = record.getMessage()
    assert f"worker {own_id} took back run {handle.id}" in message and "which it held itself" in message
    assert "no other worker was involved" in message and "from worker" not in message


async def test_many_runs_taken_over_in_one_claim_are_logged_up_to_a_limit_then_summed_up(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that died holding many runs: the claim that takes them logs TAKE_OVERS_LOGGED_PER_CLAIM of them,
    and one line for the rest, by previous worker; each of the rest is still logged at DEBUG."""
    count = TAKE_OVERS_LOGGED_PER_CLAIM + 5
    async with WorkflowManager(make_config(enable_worker=False), workflows=[quick]) as client:
        handles = [await client.run(quick, n) for n in range(count)]
        claimed = await client.backend.claim_runs("dead-worker", [("quick", "1")], count, timedelta(milliseconds=200))
        assert len(claimed) == count
        await asyncio.sleep(0.3)  # the dead worker's leases run out

        with caplog.at_level(logging.DEBUG, logger="sonamu_tasks.worker"):
            # Concurrency 2 * count: its first claim may take all of them (at most half the slots per claim).
            async with WorkflowManager(make_config(concurrency=2 * count), workflows=[quick]):
                assert [await h.result(timeout=20) for h in handles] == list(range(count))

    taken = [r for r in caplog.records if getattr(r, "taken_from", None) == "dead-worker"]
    assert sorted(r.run_id for r in taken) == sorted(h.id for h in handles)  # type: ignore[attr-defined]
    warned = [r for r in taken if r.levelno == logging.WARNING]
    assert len(warned) == TAKE_OVERS_LOGGED_PER_CLAIM
    (summary,) = [r for r in caplog.records if "more run(s) in the same claim" in r.getMessage()]
    assert summary.levelno == logging.WARNING
    assert "took over 5 more run(s) in the same claim, from worker dead-worker (5)" in summary.getMessage()


async def test_the_claim_names_the_previous_holder_and_lease_of_a_run_it_takes_over_only(make_config: Any) -> None:
    """At the storage seam: taken_from and lease_expired_at are set exactly when the claim takes a run over (and
    counts a recovery); a first claim and a run handed back come without them."""
    streams = [("quick", "1")]
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        backend = manager.backend
        run_id, _ = await backend.create_run(NewRun(new_run_id(), "quick", "1", "null"))
        (first,) = await backend.claim_runs("worker-a", streams, 1, timedelta(milliseconds=100))
        assert (first.taken_from, first.lease_expired_at, first.taken_over) == (None, None, False)
        await asyncio.sleep(0.2)  # worker-a's lease runs out

        (second,) = await backend.claim_runs("worker-b", streams, 1, timedelta(seconds=30))
        assert second.id == run_id and second.recoveries == 1 and second.taken_over
        assert second.taken_from == "worker-a"
        assert second.lease_expired_at is not None
        lease_end = first.claimed_at + timedelta(milliseconds=100)
        assert abs((second.lease_expired_at - lease_end).total_seconds()) < 0.01
        assert second.lease_expired_at < second.claimed_at

        await backend.release_runs([(run_id, second.lease_token)])  # handed back: pending, no take-over
        (third,) = await backend.claim_runs("worker-c", streams, 1, timedelta(seconds=30))
        assert third.id == run_id and third.recoveries == 1 and not third.taken_over and third.taken_from is None


async def test_workers_of_the_previous_release_still_claim_after_0027(
    make_config: Any, postgres_url: str, schema: str, backend_name: str
) -> None:
    """0027 restated the claim with two more result columns under a new name. The previous release's workers
    call claim_runs (both its signatures) and build their ClaimedRun from the twelve columns it returns."""
    if backend_name != "postgres":
        pytest.skip("PostgreSQL's migrations")
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        ids = [(await manager.backend.create_run(NewRun(new_run_id(), "old", "1", "null")))[0] for _ in range(2)]
        await manager.backend.claim_runs("new-worker", [("old", "1")], 2, timedelta(milliseconds=100))
    await asyncio.sleep(0.2)  # the new worker's leases run out
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        streams = (["default"], ["old"], ["1"])
        lease = timedelta(seconds=30)
        with_tokens = conn.execute(
            "SELECT c.* FROM claim_runs(%s, %s, %s, %s, %s, %s, %s::uuid[]) AS c",
            ("old-worker", *streams, 1, lease, []),
        ).fetchall()
        without = conn.execute(
            "SELECT c.* FROM claim_runs(%s, %s, %s, %s, %s, %s) AS c", ("old-worker", *streams, 1, lease)
        ).fetchall()
    claimed = [ClaimedRun(*row) for row in with_tokens + without]  # what the previous release's backend does
    assert sorted(run.id for run in claimed) == sorted(ids)
    assert all(run.recoveries == 1 and run.taken_from is None for run in claimed)
