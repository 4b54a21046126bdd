"""A run's deadline holds whether or not a worker claims the run: every worker fails the pending runs of its
database whose deadline passed (whatever their workflow, version or queue), as a claim would have. Run on every
backend (conftest's BACKENDS)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from sonamu_tasks import ChildWorkflowFailed, Queue, RunStatus, WorkflowFailed, WorkflowManager, workflow

from .conftest import wait_until

UNSERVED = {"name": "nobody_serves_this", "version": "1"}


async def _status_is(manager: WorkflowManager, run_id: str, status: RunStatus) -> bool:
    return bool((await manager.get_run(run_id)).status is status)


async def test_a_run_of_a_version_no_worker_serves_fails_at_its_deadline(manager_for: Any) -> None:
    manager = await manager_for([])  # a worker, serving nothing this run could be claimed by
    handle = await manager.run(UNSERVED, deadline="1s")
    assert await handle.status() is RunStatus.PENDING
    with pytest.raises(WorkflowFailed, match="deadline exceeded"):
        await handle.result(timeout=10)
    run = await handle.info()
    assert run.status is RunStatus.FAILED and run.deadline_at is not None and run.finished_at is not None
    assert run.error is not None and run.error["type"] == "DeadlineExceeded"
    assert run.error["message"].startswith(f"deadline exceeded: run {run.id} was due by ")
    late = run.finished_at - run.deadline_at
    assert timedelta(0) <= late < timedelta(seconds=3)  # soon after it, not whenever a worker comes


async def test_a_run_behind_a_full_queue_fails_at_its_deadline_while_the_slot_is_still_held(
    manager_for: Any,
) -> None:
    single = Queue("single", concurrency=1)
    started, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        started.set()
        await release.wait()

    @workflow(version="1", queue=single)
    async def hog(step: Any) -> str:
        await step.define("hold", hold).run()
        return "done"

    @workflow(version="1", queue=single)
    async def behind() -> str:
        return "ran"

    manager = await manager_for([hog, behind])
    holder = await manager.run(hog)
    await asyncio.wait_for(started.wait(), 15)
    waiting = await manager.run(behind, deadline="1s")
    try:
        with pytest.raises(WorkflowFailed, match="deadline exceeded"):
            await waiting.result(timeout=10)
        assert await holder.status() is RunStatus.RUNNING  # the slot never freed: no claim failed it
        run = await waiting.info()
        assert run.finished_at is not None and run.deadline_at is not None
        assert run.finished_at - run.deadline_at < timedelta(seconds=3)
    finally:
        release.set()
    assert await holder.result(timeout=15) == "done"


async def test_a_run_parked_behind_its_full_key_fails_at_its_deadline_and_leaves_the_parked_set(
    manager_for: Any,
) -> None:
    tenants = Queue("tenants", per_key_concurrency=1)
    started, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        started.set()
        await release.wait()

    @workflow(version="1", queue=tenants)
    async def report(input: Any, step: Any) -> str:
        if input == "first":
            await step.define("hold", hold).run()
        return str(input)

    manager = await manager_for([report])
    first = await manager.run(report, "first", concurrency_key="a")
    await asyncio.wait_for(started.wait(), 15)
    parked = await manager.run(report, "second", concurrency_key="a", deadline="1s")

    async def parked_on_key() -> int:
        stats = {s.name: s for s in await manager.queue_stats()}
        return stats["tenants"].parked_on_key

    try:
        await wait_until(parked_on_key, what="the second run parked behind its key")
        with pytest.raises(WorkflowFailed, match="deadline exceeded"):
            await parked.result(timeout=10)
        assert await parked_on_key() == 0
        assert await first.status() is RunStatus.RUNNING
    finally:
        release.set()
    assert await first.result(timeout=15) == "first"
    # The key's slot is free and nothing of it is parked: a new run of the key runs at once.
    assert await (await manager.run(report, "third", concurrency_key="a")).result(timeout=15) == "third"


async def test_a_child_past_its_deadline_wakes_its_waiting_parent(manager_for: Any) -> None:
    @workflow(version="1")
    async def parent(step: Any) -> Any:
        try:
            await step.run_workflow("kid", UNSERVED, deadline="1s")
        except ChildWorkflowFailed as error:
            return {"status": error.status, "message": error.error["message"]}
        return "not raised"

    manager = await manager_for([parent])
    out = await (await manager.run(parent)).result(timeout=15)
    assert out["status"] == "failed" and out["message"].startswith("deadline exceeded")


async def test_a_paused_run_past_its_deadline_stays_paused_until_resumed(manager_for: Any) -> None:
    """A person paused it: the deadline fails it once it is resumed (pending again), not while paused."""
    manager = await manager_for([])
    paused = await manager.run(UNSERVED, deadline="1s")
    assert await manager.pause(paused.id) is RunStatus.PAUSED
    control = await manager.run(UNSERVED, deadline="1s")  # due later than the paused one's deadline
    with pytest.raises(WorkflowFailed, match="deadline exceeded"):
        await control.result(timeout=10)  # the deadline pass went by after both deadlines
    assert await paused.status() is RunStatus.PAUSED
    assert await manager.resume(paused.id) is RunStatus.PENDING
    with pytest.raises(WorkflowFailed, match="deadline exceeded"):
        await paused.result(timeout=10)
