"""The testing kit, tested by using it: a week-long workflow, retries with backoff, receive timeouts,
deadlines and cron schedules follow the test clock and finish in milliseconds of real time."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sonamu_tasks import ResultTimeout, RetryPolicy, RunStatus, Schedule, WorkflowFailed, workflow
from sonamu_tasks.testing import WorkflowTestEnv

START = datetime(2030, 1, 6, 8, 0, tzinfo=UTC)  # a Monday


async def charge_card(order: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError("the real payment provider must not be called from a test")


@workflow(version="1")
async def send_invoice(input: Any, step: Any) -> Any:
    order = await step.define("load-order", lambda order_id: {"id": order_id, "total": 30}).run(input["order_id"])
    await step.define("charge-card", charge_card).run(order)
    await step.sleep("cool-down", "30m")
    return {"sent": True}


@workflow(version="1")
async def weekly_digest(step: Any) -> Any:
    await step.sleep("wait-a-week", "7d")
    return await step.define("send", lambda: "digest sent").run()


async def test_a_sleep_and_a_mocked_step_as_in_the_readme() -> None:
    async with WorkflowTestEnv(workflows=[send_invoice], start=START) as env:
        env.mock_step("charge-card", return_value={"ok": True})
        handle = await env.run(send_invoice, {"order_id": 7})
        await env.until_idle()
        assert await handle.status() is RunStatus.SLEEPING
        await env.advance("29m")
        assert await handle.status() is RunStatus.SLEEPING  # not yet
        await env.advance("1m")
        assert await handle.status() is RunStatus.COMPLETED
        assert await handle.result() == {"sent": True}
        run = await handle.info(with_steps=True)
        assert [s.output for s in run.steps if s.name == "charge-card"] == [{"ok": True}]
        assert run.finished_at is not None and run.finished_at - START >= timedelta(minutes=30)


async def test_a_week_long_workflow_finishes_in_well_under_a_second_and_result_skips_time() -> None:
    began = time.monotonic()
    async with WorkflowTestEnv(workflows=[weekly_digest], start=START) as env:
        handle = await env.run(weekly_digest)
        assert await handle.result() == "digest sent"  # the clock skipped the week by itself
        assert env.now() >= START + timedelta(days=7)
    assert time.monotonic() - began < 5


async def test_retries_wait_their_backoff_on_the_test_clock() -> None:
    attempts: list[datetime] = []

    policy = RetryPolicy(max_attempts=4, initial_interval_ms=60_000, maximum_interval_ms=None)

    @workflow(version="1", retry_policy=policy)
    async def flaky(step: Any) -> Any:
        return await step.define("call", lambda: "ok").run()

    async with WorkflowTestEnv(workflows=[flaky], start=START) as env:
        env.mock_step("call", side_effect=[ConnectionError("down"), ConnectionError("down"), "up"])

        original = env.manager.worker.step_mocks["call"]  # type: ignore[union-attr]

        def record(*args: Any) -> Any:
            attempts.append(env.now())
            return original(*args)

        env.manager.worker.step_mocks["call"] = record  # type: ignore[union-attr]
        handle = await env.run(flaky)
        assert await handle.result() == "up"
    # 1 minute, then 2 minutes of backoff, on the test clock.
    assert [round((a - START).total_seconds()) for a in attempts] == [0, 60, 180]


async def test_receive_timeout_deadline_and_messages_follow_the_test_clock() -> None:
    @workflow(version="1")
    async def approval(step: Any) -> Any:
        return await step.receive("decision", topic="approval", timeout="3d")

    @workflow(version="1")
    async def slow(step: Any) -> Any:
        await step.sleep("long", "2h")

    async with WorkflowTestEnv(workflows=[approval, slow], start=START) as env:
        answered = await env.run(approval)
        unanswered = await env.run(approval)
        late = await env.run(slow, deadline="1h")
        await env.until_idle()
        await env.send(answered.id, {"approved": True}, topic="approval")
        assert await answered.result() == {"approved": True}
        await env.advance("2d")
        assert await unanswered.status() is RunStatus.WAITING
        await env.advance("1d")
        assert await unanswered.result() is None  # timed out at three days
        with pytest.raises(WorkflowFailed, match="deadline exceeded"):
            await late.result()


async def test_cron_schedules_fire_at_each_due_time_on_the_way() -> None:
    @workflow(version="1", schedules=[Schedule("0 9 * * *", name="daily-9am")])
    async def morning(input: Any) -> Any:
        return "good morning"

    async with WorkflowTestEnv(workflows=[morning], start=START) as env:
        await env.advance("3d")  # Monday 08:00 -> Thursday 08:00: Monday, Tuesday and Wednesday at 9
        page = await env.manager.list_runs(workflow="morning")
        fired = sorted(run.created_at for run in page.items)
        assert [moment.isoformat() for moment in fired] == [
            "2030-01-06T09:00:00+00:00",
            "2030-01-07T09:00:00+00:00",
            "2030-01-08T09:00:00+00:00",
        ]
        assert all(run.status is RunStatus.COMPLETED for run in page.items)


async def test_the_pytest_fixture(workflow_env: Any) -> None:
    workflow_env.register(weekly_digest)
    handle = await workflow_env.run(weekly_digest)
    await workflow_env.advance("7d")
    assert await handle.status() is RunStatus.COMPLETED


async def test_a_rate_limited_queue_follows_the_test_clock() -> None:
    from sonamu_tasks import Queue

    @workflow(version="1", queue=Queue("slow-api", rate_limit="2/1h"))
    async def call_api(input: Any) -> Any:
        return input

    began = time.monotonic()
    async with WorkflowTestEnv(workflows=[call_api], start=START) as env:
        handles = [await env.run(call_api, i) for i in range(5)]
        assert [await handle.result() for handle in handles] == list(range(5))  # waits skip to each window
        starts = sorted([(await handle.info()).started_at for handle in handles])  # type: ignore[type-var]
        assert starts[2] - starts[0] >= timedelta(hours=1) and starts[4] - starts[2] >= timedelta(hours=1)
    assert time.monotonic() - began < 10


@workflow(version="1")
async def await_approval(step: Any) -> Any:
    return await step.receive("decision", topic="approval")  # no timeout: parked until a message comes


@pytest.mark.parametrize("microseconds", range(4))
async def test_result_of_a_run_waiting_with_no_timeout_keeps_waiting(microseconds: int) -> None:
    # Such a run is due at FOREVER, which comes back through float seconds a few µs either side of it
    # depending on the clock's microseconds: these four starts cover both sides.
    start = START + timedelta(microseconds=microseconds)
    async with WorkflowTestEnv(workflows=[await_approval], start=start) as env:
        handle = await env.run(await_approval)
        with pytest.raises(ResultTimeout):
            await handle.result(timeout=0.2)
        assert env.now() == start  # no time skipped: only a message can wake the run

        async def approve_soon() -> None:
            await asyncio.sleep(0.1)
            await env.send(handle.id, {"approved": True}, topic="approval")

        sender = asyncio.create_task(approve_soon())
        assert await handle.result(timeout=10) == {"approved": True}
        await sender
