"""The testing kit, tested by using it: a week-long workflow, retries with backoff, receive timeouts,
deadlines and cron schedules follow the test clock and finish in milliseconds of real time."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sonamu_tasks import (
    ResultTimeout,
    RetryPolicy,
    RunStatus,
    Schedule,
    SonamuTasksError,
    WorkflowFailed,
    WorkflowNotRegistered,
    workflow,
)
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


@dataclasses.dataclass
class Digest:
    day: str
    lines: int


@workflow(version="1")
async def typed_digest(step: Any) -> Digest:
    await step.sleep("wait-a-day", "1d")
    return Digest(day="Tuesday", lines=3)


async def test_result_gives_the_output_as_the_type_the_workflow_declares() -> None:
    async with WorkflowTestEnv(workflows=[typed_digest], start=START) as env:
        handle = await env.run(typed_digest)
        assert await handle.result() == Digest(day="Tuesday", lines=3)


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


# env.register: the same as workflows=[...], which the workflow_env fixture (starting with none) relies on

HOURLY_START = datetime(2030, 1, 6, 0, 30, tzinfo=UTC)


@workflow(version="1", schedules=[Schedule("0 * * * *")])
async def hourly(input: Any) -> Any:
    return "tick"


def _rate_limited() -> Any:
    from sonamu_tasks import Queue

    @workflow(version="1", queue=Queue("one-an-hour", rate_limit="1/1h"))
    async def limited(input: Any) -> Any:
        return input

    return limited


async def test_register_after_the_start_stores_schedules_queue_limits_and_the_workers_record() -> None:
    limited = _rate_limited()
    async with WorkflowTestEnv(start=HOURLY_START) as env:  # what the workflow_env fixture gives
        env.register(hourly, limited)
        handles = [await env.run(limited, i) for i in range(3)]
        await env.advance("3h")
        cron = (await env.manager.list_runs(workflow="hourly")).items
        assert sorted(run.created_at.hour for run in cron) == [1, 2, 3]  # the schedule was stored and fired
        starts = sorted([(await handle.info()).started_at for handle in handles])  # type: ignore[type-var]
        assert starts[2] - starts[0] >= timedelta(hours=2)  # the rate limit was stored and enforced
        [worker] = await env.manager.list_workers()
        assert ("hourly", "1") in worker.workflows and ("limited", "1") in worker.workflows
        assert await env.manager.stranded_runs() == []


async def test_the_fixture_runs_a_registered_cron_workflow(workflow_env: Any) -> None:
    await workflow_env.register(hourly)  # awaited: stored now, for a look at env.manager
    assert [s.workflow_name for s in await workflow_env.manager.list_schedules()] == ["hourly"]
    await workflow_env.advance("2h")
    assert len((await workflow_env.manager.list_runs(workflow="hourly")).items) == 2


# mock_step: by name, including a map's items; a mock that stands in for nothing is reported


def charge(amount: int) -> str:
    raise AssertionError("the real charge must not run in a test")


@workflow(version="1")
async def charge_all(input: Any, step: Any) -> Any:
    return await step.map("charge", charge, [1, 2, 3])


@workflow(version="1")
async def charge_once(input: Any, step: Any) -> Any:
    return await step.define("charge-card", charge).run(1)


async def test_a_mock_stands_for_every_item_of_a_map_of_its_name_unless_the_item_has_its_own() -> None:
    async with WorkflowTestEnv(workflows=[charge_all], start=START) as env:
        env.mock_step("charge", side_effect=lambda amount: f"charged {amount}")
        env.mock_step("charge[1]", return_value="declined")
        assert await (await env.run(charge_all)).result() == ["charged 1", "declined", "charged 3"]


async def test_a_mock_that_stood_in_for_no_step_fails_the_test_at_the_exit_naming_it() -> None:
    with pytest.raises(AssertionError, match=r"mock_step\('charge_card'\) \(did you mean 'charge-card'\?\)"):
        async with WorkflowTestEnv(workflows=[charge_once], start=START) as env:
            env.mock_step("charge-card", return_value="mocked")
            env.mock_step("charge_card", return_value="a typo")
            assert await (await env.run(charge_once)).result() == "mocked"


async def test_an_optional_or_removed_mock_may_go_unused_and_the_tests_own_error_comes_first() -> None:
    async with WorkflowTestEnv(workflows=[charge_once], start=START) as env:
        env.mock_step("charge-card", return_value="mocked")
        env.mock_step("refund", side_effect=AssertionError("must not refund"), optional=True)  # a guard
        env.mock_step("charge-card-2", return_value="unused")
        env.unmock_step("charge-card-2")
        assert await (await env.run(charge_once)).result() == "mocked"
    with pytest.raises(KeyError):  # not the unused mock's AssertionError
        async with WorkflowTestEnv(workflows=[charge_once], start=START) as env:
            env.mock_step("charge_card", return_value="a typo")
            raise KeyError("the test failed on its own")


async def test_a_side_effect_list_that_runs_out_fails_the_run_naming_the_mock() -> None:
    policy = RetryPolicy(max_attempts=3, initial_interval_ms=10)

    @workflow(version="1", retry_policy=policy)
    async def flaky_charge(input: Any, step: Any) -> Any:
        return await step.define("charge-card", charge).run(1)

    async with WorkflowTestEnv(workflows=[flaky_charge], start=START) as env:
        env.mock_step("charge-card", side_effect=[ConnectionError("down")])  # 1 value, a retry calls again
        handle = await env.run(flaky_charge)
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=20)
    assert failed.value.error["type"] == "MockExhausted"
    assert "mock_step('charge-card'): its side_effect list ran out" in failed.value.error["message"]


# events: a run receives the events emitted after it was created, at one test instant too


async def test_an_event_emitted_before_the_run_was_created_is_not_delivered_to_it() -> None:
    @workflow(version="1")
    async def waits_for_payment(input: Any, step: Any) -> Any:
        return await step.wait_for_event("paid", "order.paid", key="7", timeout="1h")

    async with WorkflowTestEnv(workflows=[waits_for_payment], start=START) as env:
        await env.emit("order.paid", {"stale": True}, key="7")  # before the run: not for it
        before = await env.run(waits_for_payment)
        after = await env.run(waits_for_payment)
        await env.until_idle()
        await env.emit("order.paid", {"fresh": True}, key="7")  # at the same test instant, after the runs
        assert await after.result() == {"fresh": True}
        assert await before.result() == {"fresh": True}


# misuse: errors that say what is wrong


async def test_using_the_environment_outside_its_async_with_says_so() -> None:
    env = WorkflowTestEnv(workflows=[weekly_digest], start=START)
    env.mock_step("send", return_value="mocked")  # kept, and used once it starts
    for call in (env.run(weekly_digest), env.advance("1d"), env.until_idle(), env.emit("e", True), env.send("x", True)):
        with pytest.raises(SonamuTasksError, match=r"not running; use it as `async with WorkflowTestEnv"):
            await call
    async with env:
        assert await (await env.run(weekly_digest)).result() == "mocked"
    with pytest.raises(SonamuTasksError, match=r"WorkflowTestEnv.run\(\): the environment is not running"):
        await env.run(weekly_digest)


async def test_running_a_workflow_not_registered_with_the_environment_is_refused_at_run() -> None:
    async with WorkflowTestEnv(workflows=[charge_once], start=START) as env:
        for spec in (weekly_digest, "weekly_digest", {"name": "weekly_digest", "version": "1"}):
            with pytest.raises(WorkflowNotRegistered, match=r"'weekly_digest'.*pass it to WorkflowTestEnv\(workflows"):
                await env.run(spec)
        with pytest.raises(WorkflowNotRegistered, match="registered versions of it: 1"):
            await env.run({"name": "charge_once", "version": "2"})
        assert (await env.manager.list_runs()).items == []


# stranded runs: judged on the test clock


async def test_runs_of_a_live_test_worker_are_not_stranded_whatever_the_test_clock_says() -> None:
    async with WorkflowTestEnv(workflows=[weekly_digest], start=datetime(2020, 1, 1, tzinfo=UTC)) as env:
        handle = await env.run(weekly_digest)
        await env.until_idle()
        assert await env.manager.stranded_runs() == []  # the clock is years behind the machine's
        await env.advance("3d")
        assert await handle.status() is RunStatus.SLEEPING
        assert await env.manager.stranded_runs() == []  # days after the worker's last real-time heartbeat
