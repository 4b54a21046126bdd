"""Steering a run (cancel, pause, resume, retry) wherever it stands: a request meets the run at whatever it
does next (a step boundary, a failed attempt's retry, a park, a hand-back, its end), and never waits there."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sonamu_tasks import RetryPolicy, RunStatus, WorkflowFailed, WorkflowManager, workflow
from sonamu_tasks.backends.base import LeaseLost, NewRun
from sonamu_tasks.ids import new_run_id

from .conftest import wait_until


async def _status_is(manager: WorkflowManager, run_id: str, status: RunStatus) -> bool:
    return bool((await manager.get_run(run_id)).status is status)


def _failing_once(started: asyncio.Event, release: asyncio.Event) -> Any:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            await release.wait()
            raise ConnectionError("first attempt fails")
        return "ok"

    return flaky


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_a_request_met_by_a_failing_step_applies_at_the_failure_not_after_the_backoff(
    manager_for: Any, action: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    flaky = _failing_once(started, release)

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=3, initial_interval_ms=3000))
    async def backs_off(step: Any) -> str:
        return str(await step.define("flaky", flaky).run())

    await manager_for([backs_off])
    client = await manager_for([], enable_worker=False)  # the request travels through the database
    handle = await client.run({"name": "backs_off", "version": "1"})
    await asyncio.wait_for(started.wait(), 15)
    assert await getattr(client, action)(handle.id) is RunStatus.RUNNING  # asked; it is inside a step
    release.set()  # the step fails: the attempt would be retried in 3 s
    if action == "cancel":
        with pytest.raises(WorkflowFailed, match="canceled"):
            await handle.result(timeout=2)  # at the failure, not after the backoff
        run = await client.get_run(handle.id)
        assert run.status is RunStatus.CANCELED and run.requested_action is None and run.attempts == 1
        return
    await wait_until(lambda: _status_is(client, handle.id, RunStatus.PAUSED), timeout=2, what="paused at the failure")
    paused = await client.get_run(handle.id)
    assert paused.requested_action is None and paused.attempts == 1
    assert paused.error is not None and "first attempt fails" in paused.error["message"]
    assert await client.resume(handle.id) is RunStatus.PENDING
    resumed = await client.get_run(handle.id)
    assert resumed.available_at == paused.available_at  # the retry time is kept: the backoff still holds
    assert await handle.result(timeout=15) == "ok"
    assert (await client.get_run(handle.id)).finished_at >= paused.available_at  # type: ignore[operator]


async def test_resume_withdraws_a_pause_an_older_release_left_on_a_run_that_is_not_running(manager_for: Any) -> None:
    client = await manager_for([], enable_worker=False)
    handle = await client.run({"name": "nobody_runs_this", "version": "1"}, start_at="1h")
    backend: Any = client.backend
    if hasattr(backend, "_db"):
        await backend._db.write(
            lambda conn, now: conn.execute("UPDATE runs SET requested_action = 'pause' WHERE id = ?", (handle.id,))
        )
    else:
        async with backend._connection() as conn:
            await conn.execute("UPDATE runs SET requested_action = 'pause' WHERE id = %s", (handle.id,))
    assert await client.resume(handle.id) is RunStatus.PENDING
    assert (await client.get_run(handle.id)).requested_action is None


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_a_request_stored_while_the_run_parks_applies_at_once_not_at_the_wake_time(
    manager_for: Any, action: str
) -> None:
    @workflow(version="1")
    async def napper(step: Any) -> str:
        await step.define("a", lambda: "a").run()
        await step.sleep("nap", "1h")
        return "awake"

    worker = await manager_for([napper])
    client = await manager_for([], enable_worker=False)
    # Widen the window between the attempt's last look at its requests and the park's commit: the park waits
    # until the request is stored (a slow round trip, or a notification not delivered yet).
    parking, stored = asyncio.Event(), asyncio.Event()
    park = worker.backend.park_run

    async def slow_park(*args: Any, **kwargs: Any) -> Any:
        parking.set()
        await stored.wait()
        return await park(*args, **kwargs)

    worker.backend.park_run = slow_park  # type: ignore[method-assign]
    handle = await client.run({"name": "napper", "version": "1"})
    await asyncio.wait_for(parking.wait(), 15)
    assert await getattr(client, action)(handle.id) is RunStatus.RUNNING  # still running: asked for
    stored.set()
    if action == "cancel":
        with pytest.raises(WorkflowFailed, match="canceled"):
            await handle.result(timeout=5)  # not in an hour
        assert (await client.get_run(handle.id)).requested_action is None
        return
    await wait_until(lambda: _status_is(client, handle.id, RunStatus.PAUSED), what="paused as it parked")
    run = await client.get_run(handle.id, with_steps=True)
    assert run.requested_action is None
    assert run.available_at > datetime.now(UTC) + timedelta(minutes=50)  # its wake time is kept
    assert {s.name for s in run.steps} == {"a", "nap"}
    assert await client.resume(handle.id) is RunStatus.PENDING  # and it sleeps on until then
    assert (await client.get_run(handle.id)).available_at == run.available_at


async def test_a_parent_canceled_as_it_parks_on_its_child_cancels_the_child(manager_for: Any) -> None:
    @workflow(version="1")
    async def slow_child(step: Any) -> None:
        await step.sleep("long", "1h")

    @workflow(version="1")
    async def waiting_parent(step: Any) -> Any:
        return await step.run_workflow("kid", slow_child)

    worker = await manager_for([waiting_parent, slow_child])
    client = await manager_for([], enable_worker=False)
    parking, stored = asyncio.Event(), asyncio.Event()
    park = worker.backend.park_run

    async def slow_park(run_id: str, *args: Any) -> Any:
        if run_id == handle.id:
            parking.set()
            await stored.wait()
        return await park(run_id, *args)

    worker.backend.park_run = slow_park  # type: ignore[method-assign]
    handle = await client.run({"name": "waiting_parent", "version": "1"})
    await asyncio.wait_for(parking.wait(), 15)
    assert await client.cancel(handle.id) is RunStatus.RUNNING
    stored.set()
    with pytest.raises(WorkflowFailed, match="canceled"):
        await handle.result(timeout=5)
    (kid,) = (await client.list_runs(parent_id=handle.id)).items
    await wait_until(lambda: _status_is(client, kid.id, RunStatus.CANCELED), what="the child canceled with it")


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_a_run_left_running_by_a_dead_worker_is_steered_at_once(manager_for: Any, action: str) -> None:
    """No worker serves its version: nothing would ever honour a request at a step boundary."""
    client = await manager_for([], enable_worker=False)
    backend = client.backend
    run_id, _ = await backend.create_run(NewRun(new_run_id(), "orphaned", "1", "null"))
    (dead,) = await backend.claim_runs("dead-worker", [("orphaned", "1")], 1, timedelta(milliseconds=50))
    await asyncio.sleep(0.2)  # its worker never heartbeats again: the lease expires
    expected = RunStatus.CANCELED if action == "cancel" else RunStatus.PAUSED
    assert await getattr(client, action)(run_id) is expected
    run = await client.get_run(run_id)
    assert run.status is expected and run.requested_action is None and run.worker_id is None
    now = datetime.now(UTC)
    with pytest.raises(LeaseLost):  # a worker that was only stalled is shut out, as after a take-over
        await backend.save_step(run_id, dead.lease_token, "s", '"late"', now, now)
    with pytest.raises(LeaseLost):
        await backend.complete_run(run_id, dead.lease_token, '"late"')
    if action == "pause":
        assert await client.resume(run_id) is RunStatus.PENDING


async def test_canceling_a_parent_cancels_at_once_a_child_a_dead_worker_left_running(manager_for: Any) -> None:
    """The cancel cascade acts as cancel_run does: a child whose worker's lease expired is canceled now (no worker
    of its version may be left to honour a request), while a child under a live lease is only asked."""
    client = await manager_for([], enable_worker=False)
    backend = client.backend
    parent_id, _ = await backend.create_run(NewRun(new_run_id(), "parent", "1", "null"))
    orphan_id, _ = await backend.create_run(NewRun(new_run_id(), "orphaned", "1", "null", parent_id=parent_id))
    held_id, _ = await backend.create_run(NewRun(new_run_id(), "held", "1", "null", parent_id=parent_id))
    (dead,) = await backend.claim_runs("dead-worker", [("orphaned", "1")], 1, timedelta(milliseconds=50))
    await backend.claim_runs("live-worker", [("held", "1")], 1, timedelta(seconds=30))
    await asyncio.sleep(0.2)  # the dead worker never heartbeats again: its lease expires
    assert await client.cancel(parent_id) is RunStatus.CANCELED
    orphan = await client.get_run(orphan_id)
    assert orphan.status is RunStatus.CANCELED and orphan.requested_action is None and orphan.worker_id is None
    assert orphan.error is not None and orphan.error["message"] == f"canceled with its parent run {parent_id}"
    now = datetime.now(UTC)
    with pytest.raises(LeaseLost):  # a worker that was only stalled is shut out, as after a take-over
        await backend.save_step(orphan_id, dead.lease_token, "s", '"late"', now, now)
    with pytest.raises(LeaseLost):
        await backend.complete_run(orphan_id, dead.lease_token, '"late"')
    held = await client.get_run(held_id)
    assert held.status is RunStatus.RUNNING and held.requested_action == "cancel"


async def test_a_run_under_a_live_lease_is_still_only_asked(manager_for: Any) -> None:
    client = await manager_for([], enable_worker=False)
    backend = client.backend
    run_id, _ = await backend.create_run(NewRun(new_run_id(), "held", "1", "null"))
    await backend.claim_runs("live-worker", [("held", "1")], 1, timedelta(seconds=30))
    assert await client.cancel(run_id) is RunStatus.RUNNING
    assert (await client.get_run(run_id)).requested_action == "cancel"


@pytest.mark.parametrize("ending", ["completes", "fails"])
async def test_a_request_that_meets_the_run_s_end_is_not_left_on_the_finished_run(
    manager_for: Any, ending: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def last() -> str:
        started.set()
        await release.wait()
        if ending == "fails":
            raise ConnectionError("last step fails")
        return "done"

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=1))
    async def short(step: Any) -> str:
        return str(await step.define("last", last).run())

    await manager_for([short])
    client = await manager_for([], enable_worker=False)
    handle = await client.run({"name": "short", "version": "1"})
    await asyncio.wait_for(started.wait(), 15)
    assert await client.cancel(handle.id) is RunStatus.RUNNING
    release.set()
    if ending == "completes":
        assert await handle.result(timeout=15) == "done"  # no step boundary left: it completes
    else:
        with pytest.raises(WorkflowFailed, match="last step fails"):
            await handle.result(timeout=15)
    run = await client.get_run(handle.id)
    assert run.status is (RunStatus.COMPLETED if ending == "completes" else RunStatus.FAILED)
    assert run.requested_action is None  # `show` and the dashboard do not say "(cancel requested)"


async def test_retrying_a_canceled_parent_restarts_the_children_canceled_with_it(manager_for: Any) -> None:
    @workflow(version="1")
    async def approval(step: Any) -> Any:
        return await step.receive("answer", topic="answer")

    @workflow(version="1")
    async def asks(step: Any) -> Any:
        attached = await step.start_workflow("ask", approval)
        await step.start_workflow("aside", approval, detached=True)
        return {"answer": await attached.result()}

    manager = await manager_for([asks, approval])
    handle = await manager.run(asks)

    async def children_waiting() -> Any:
        page = await manager.list_runs(parent_id=handle.id)
        return len(page.items) == 2 and all(c.status is RunStatus.WAITING for c in page.items) and page.items

    await wait_until(children_waiting, what="both children waiting")
    await wait_until(lambda: _status_is(manager, handle.id, RunStatus.WAITING), what="the parent waiting")
    assert await handle.cancel() is RunStatus.CANCELED
    by_step = {c.parent_step: c for c in (await manager.list_runs(parent_id=handle.id)).items}
    assert by_step["ask"].status is RunStatus.CANCELED
    assert await manager.cancel(by_step["aside"].id) is RunStatus.CANCELED  # detached: not the parent's to restart

    assert await handle.retry() is RunStatus.PENDING
    await wait_until(lambda: _status_is(manager, by_step["ask"].id, RunStatus.WAITING), what="the child restarted")
    await manager.send(by_step["ask"].id, "yes", topic="answer")
    assert await handle.result(timeout=15) == {"answer": "yes"}
    assert (await manager.get_run(by_step["aside"].id)).status is RunStatus.CANCELED


async def test_retrying_a_canceled_parent_at_once_withdraws_the_cancel_of_a_child_still_stopping(
    manager_for: Any,
) -> None:
    in_step, release = asyncio.Event(), asyncio.Event()
    calls = {"slow": 0}

    async def slow() -> str:
        calls["slow"] += 1
        in_step.set()
        await release.wait()
        return "s"

    @workflow(version="1")
    async def kid(step: Any) -> str:
        await step.define("slow", slow).run()
        return await step.define("after", lambda: "kid done").run()  # a step boundary, where a cancel stops it

    @workflow(version="1")
    async def parent(step: Any) -> str:
        return await step.run_workflow("kid", kid)

    manager = await manager_for([parent, kid])
    handle = await manager.run(parent)
    await asyncio.wait_for(in_step.wait(), 15)
    await wait_until(lambda: _status_is(manager, handle.id, RunStatus.WAITING), what="the parent waiting")
    assert await handle.cancel() is RunStatus.CANCELED
    [child] = (await manager.list_runs(parent_id=handle.id)).items
    assert (child.status, child.requested_action) == (RunStatus.RUNNING, "cancel")  # stops at its next boundary
    # Retried before the child stopped: the child's cancel is withdrawn, so the replayed parent waits for it
    # instead of reading a cancel that settles later as the child's outcome, for good.
    assert await handle.retry() is RunStatus.PENDING
    release.set()
    assert await handle.result(timeout=15) == "kid done"
    assert (await manager.get_run(child.id)).status is RunStatus.COMPLETED


@pytest.mark.parametrize("steer", ["pause", "cancel"])
async def test_a_debounced_run_resumed_or_retried_after_its_key_was_taken_runs_on_its_own(
    manager_for: Any, steer: str
) -> None:
    client = await manager_for([], enable_worker=False)
    spec = {"name": "debounced", "version": "1"}
    first = await client.run(spec, {"n": 1}, debounce="1h", debounce_key="k")
    await getattr(client, steer)(first.id)  # before it started: it leaves the key's window
    second = await client.run(spec, {"n": 2}, debounce="1h", debounce_key="k")
    assert second.id != first.id  # a new run took the key
    again = client.resume if steer == "pause" else client.retry
    assert await again(first.id) is RunStatus.PENDING  # no unique-index error
    third = await client.run(spec, {"n": 3}, debounce="1h", debounce_key="k")
    assert third.id == second.id  # later calls collapse into the run that holds the key
    assert (await client.get_run(second.id)).input == {"n": 3}
    assert (await client.get_run(first.id)).input == {"n": 1}
