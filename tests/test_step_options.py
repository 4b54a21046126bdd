"""A step's own retry policy and timeout, on every backend (see BACKENDS)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from sonamu_tasks import InvalidValue, RetryPolicy, RunStatus, StepStatus, WorkflowFailed, workflow

ONCE = RetryPolicy(max_attempts=1)


async def test_a_steps_own_policy_replaces_the_workflows(manager_for: Any) -> None:
    calls = {"flaky": 0}

    async def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 4:
            raise ConnectionError(f"attempt {calls['flaky']}")
        return "fine"

    # The workflow allows one attempt; the step allows five, quickly.
    @workflow(version="1", retry_policy=ONCE)
    async def patient(step: Any) -> Any:
        policy = {"max_attempts": 5, "initial_interval_ms": 20, "backoff_coefficient": 1}
        return await step.define("flaky", flaky, retry_policy=policy).run()

    manager = await manager_for([patient])
    handle = await manager.run(patient)
    assert await handle.result(timeout=15) == "fine"
    assert calls["flaky"] == 4
    assert (await handle.info()).attempts == 3


async def test_a_steps_own_policy_counts_that_steps_failures_and_can_give_up_sooner(manager_for: Any) -> None:
    calls = {"n": 0}

    async def broken() -> None:
        calls["n"] += 1
        raise ValueError("never works")

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=10, initial_interval_ms=20))
    async def strict(step: Any) -> Any:
        await step.define("broken", broken, retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=20)).run()

    manager = await manager_for([strict])
    handle = await manager.run(strict)
    with pytest.raises(WorkflowFailed, match="never works"):
        await handle.result(timeout=15)
    assert calls["n"] == 2
    run = await handle.info(with_steps=True)
    assert run.steps[0].status is StepStatus.FAILED and run.steps[0].attempts == 2


async def test_failures_a_steps_own_policy_counted_leave_the_workflows_budget_whole(manager_for: Any) -> None:
    """The docs: a flaky call retried ten times while the rest of the workflow keeps its own budget. The
    step's seven failures used to count against the workflow's two attempts: the next step's first failure
    failed the run."""
    calls = {"charge": 0, "notify": 0}

    async def charge() -> str:
        calls["charge"] += 1
        if calls["charge"] <= 7:
            raise ConnectionError(f"gateway busy ({calls['charge']})")
        return "charged"

    async def notify() -> str:
        calls["notify"] += 1
        if calls["notify"] == 1:
            raise ConnectionError("mail server busy")
        return "sent"

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=20))
    async def checkout(step: Any) -> Any:
        own = RetryPolicy(max_attempts=10, initial_interval_ms=10, backoff_coefficient=1)
        charged = await step.define("charge", charge, retry_policy=own).run()
        return [charged, await step.define("notify", notify).run()]

    manager = await manager_for([checkout])
    handle = await manager.run(checkout)
    assert await handle.result(timeout=20) == ["charged", "sent"]
    assert calls == {"charge": 8, "notify": 2}
    assert (await handle.info()).attempts == 8  # every failed attempt is still counted on the run


async def test_a_manual_retry_gives_a_step_with_its_own_policy_a_fresh_budget(manager_for: Any) -> None:
    calls = {"n": 0}

    async def broken() -> None:
        calls["n"] += 1
        raise ValueError("never works")

    @workflow(version="1", retry_policy=ONCE)
    async def strict(step: Any) -> Any:
        await step.define("broken", broken, retry_policy=RetryPolicy(max_attempts=3, initial_interval_ms=10)).run()

    manager = await manager_for([strict])
    handle = await manager.run(strict)
    with pytest.raises(WorkflowFailed, match="never works"):
        await handle.result(timeout=15)
    assert calls["n"] == 3
    assert await handle.retry() is RunStatus.PENDING
    with pytest.raises(WorkflowFailed, match="never works"):
        await handle.result(timeout=15)
    assert calls["n"] == 6  # three more, not one
    run = await handle.info(with_steps=True)
    assert run.steps[0].attempts == 3  # counted since the retry


async def test_a_hanging_async_step_is_cancelled_at_its_timeout_and_retried(manager_for: Any, caplog: Any) -> None:
    calls = {"n": 0}
    cancelled = asyncio.Event()

    async def hangs_once() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            try:
                await asyncio.Event().wait()  # a call that never answers
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return "answered"

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=3, initial_interval_ms=20))
    async def guarded(step: Any) -> Any:
        return await step.define("call", hangs_once, timeout="200ms").run()

    manager = await manager_for([guarded])
    handle = await manager.run(guarded)
    assert await handle.result(timeout=15) == "answered"
    assert cancelled.is_set() and calls["n"] == 2
    run = await handle.info(with_steps=True)
    assert run.attempts == 1 and run.steps[0].attempts == 2  # one failed execution, then the completed one
    assert "took longer than its timeout of 0.2s" in caplog.text


async def test_a_hanging_sync_step_times_out_its_late_result_is_discarded_and_a_warning_names_it(
    manager_for: Any, caplog: Any
) -> None:
    release = threading.Event()
    finished = threading.Event()

    def stuck() -> str:
        release.wait(30)
        finished.set()
        return "late"

    @workflow(version="1", retry_policy=ONCE)
    async def guarded(step: Any) -> Any:
        return await step.define("stuck", stuck, timeout=0.2).run()

    @workflow(version="1")
    async def other(step: Any) -> Any:
        return await step.define("quick", lambda: "quick").run()

    @workflow(version="1")
    async def two_at_once(step: Any) -> Any:
        return await asyncio.gather(step.define("a", time.sleep).run(0.05), step.define("b", time.sleep).run(0.05))

    manager = await manager_for([guarded, other, two_at_once], concurrency=1)
    caplog.set_level(logging.WARNING, logger="sonamu_tasks.threads")
    # A step that queued for the only thread first (the pool once miscounted its idle threads after that,
    # and the step after the stuck one queued behind it, its run 'running' until the stuck step returned).
    await (await manager.run(two_at_once)).result(timeout=15)
    handle = await manager.run(guarded)
    with pytest.raises(WorkflowFailed, match="StepTimeout"):
        await handle.result(timeout=15)
    assert "step 'stuck' of run" in caplog.text and "timed out" in caplog.text
    # The only slot's thread is still stuck: the pool grew, so other sync steps still run.
    assert await (await manager.run(other)).result(timeout=5) == "quick"
    release.set()
    assert finished.wait(5)
    run = await handle.info(with_steps=True)
    assert run.status is RunStatus.FAILED and run.steps[0].output is None  # "late" was never stored


async def test_a_sync_steps_timeout_counts_its_execution_not_its_wait_for_a_thread(manager_for: Any) -> None:
    executions: list[str] = []

    def work(name: str) -> str:
        executions.append(name)
        time.sleep(0.4)
        return name

    # Two threads, six steps of 0.4 s: the last two wait 0.8 s for a thread, then run well within 1 s.
    @workflow(version="1", retry_policy=ONCE)
    async def wide(step: Any) -> Any:
        return await asyncio.gather(*(step.define(f"w{i}", work, timeout="1s").run(f"w{i}") for i in range(6)))

    manager = await manager_for([wide], concurrency=2)
    handle = await manager.run(wide)
    names = [f"w{i}" for i in range(6)]
    assert await handle.result(timeout=15) == names
    assert sorted(executions) == names  # each ran once: none was abandoned and run again


async def test_a_queued_sync_step_given_up_on_never_runs(manager_for: Any) -> None:
    gave_up = threading.Event()
    executions: list[str] = []

    def busy() -> str:
        gave_up.wait(15)  # holds the only thread until the other branch gave up on its queued step
        return "busy"

    def queued() -> str:
        executions.append("queued")
        return "queued"

    @workflow(version="1", retry_policy=ONCE)
    async def impatient(step: Any) -> Any:
        async def give_up() -> str:
            try:
                return await asyncio.wait_for(step.define("queued", queued).run(), 0.2)
            except TimeoutError:
                gave_up.set()
                return "gave up"

        outcome = await asyncio.gather(step.define("busy", busy).run(), give_up())
        # The pool's one thread takes work in order: had the given-up step stayed queued, it would run first.
        await step.define("after", lambda: executions.append("after")).run()
        return outcome

    manager = await manager_for([impatient], concurrency=1)
    handle = await manager.run(impatient)
    assert await handle.result(timeout=15) == ["busy", "gave up"]
    assert executions == ["after"]
    run = await handle.info(with_steps=True)
    assert [s.name for s in run.steps] == ["busy", "after"]


async def test_a_cancelled_error_raised_by_the_users_own_code_is_a_failure_retried_by_the_policy(
    manager_for: Any,
) -> None:
    calls = {"step": 0, "workflow": 0}

    async def awaits_what_it_cancelled() -> None:
        calls["step"] += 1
        task = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        await task  # raises CancelledError into the step, though nothing cancelled the run

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=10))
    async def in_a_step(step: Any) -> None:
        await step.define("bad", awaits_what_it_cancelled).run()

    @workflow(version="1", retry_policy=ONCE)
    async def in_the_workflow() -> None:
        calls["workflow"] += 1
        task = asyncio.create_task(asyncio.sleep(10))
        task.cancel()
        await task

    manager = await manager_for([in_a_step, in_the_workflow], lease_ms=1000)
    step_run = await manager.run(in_a_step)
    with pytest.raises(WorkflowFailed, match="step 'bad' raised CancelledError"):
        await step_run.result(timeout=15)
    run = await step_run.info()
    # Failed by its retry policy (2 attempts), not taken over again and again as a run whose worker vanished.
    assert (run.attempts, run.recoveries, calls["step"]) == (2, 0, 2)
    assert run.error is not None and run.error["step"] == "bad"
    workflow_run = await manager.run(in_the_workflow)
    with pytest.raises(WorkflowFailed, match="workflow 'in_the_workflow' raised CancelledError"):
        await workflow_run.result(timeout=15)
    assert (await workflow_run.info()).recoveries == 0 and calls["workflow"] == 1


async def test_bad_step_options_fail_the_run_naming_the_step(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=5, initial_interval_ms=20))
    async def wrong(step: Any) -> Any:
        return await step.define("s", str, retry_policy={"max_attempt": 3}).run()

    manager = await manager_for([wrong])
    handle = await manager.run(wrong)
    with pytest.raises(WorkflowFailed, match="retry_policy of step 's' has unknown field"):
        await handle.result(timeout=15)
    assert (await handle.info()).attempts == 1  # InvalidValue is not retried
    assert issubclass(InvalidValue, ValueError)


async def test_a_sync_wrapper_around_an_async_call_keeps_the_steps_timeout(manager_for: Any) -> None:
    """`step.define("fetch", lambda: fetch(url), timeout=...)`: the lambda is sync, so it runs in a thread and
    hands back a coroutine, which was awaited with no timeout (a 4 s call "timed out at 500 ms" after 4 s, and
    a hanging one never did)."""
    cancelled = asyncio.Event()

    async def fetch(url: str) -> str:
        try:
            await asyncio.Event().wait()  # a call that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return url

    @workflow(version="1", retry_policy=ONCE)
    async def wrapped(step: Any) -> Any:
        return await step.define("fetch", lambda: fetch("https://example.com"), timeout="300ms").run()

    manager = await manager_for([wrapped])
    handle = await manager.run(wrapped)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    assert failure.value.error["type"] == "StepTimeout" and failure.value.error["step"] == "fetch"
    assert cancelled.is_set()


async def test_a_retry_cut_off_by_the_deadline_fails_the_run_as_deadline_exceeded(manager_for: Any) -> None:
    async def down() -> None:
        raise ConnectionError("down")

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=5, initial_interval_ms=60_000))
    async def due_soon(step: Any) -> Any:
        return await step.define("call", down).run()

    manager = await manager_for([due_soon])
    handle = await manager.run(due_soon, deadline="30s")
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    error = failure.value.error
    assert error["type"] == "DeadlineExceeded"  # as a run failed by the claim or the sweep at its deadline is
    assert error["message"] == "deadline exceeded before the next attempt; last error: ConnectionError: down"


async def test_a_timeout_of_zero_fails_the_run_at_once_naming_the_step(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=3, initial_interval_ms=20))
    async def instant(step: Any) -> Any:
        return await step.define("s", str, timeout="0s").run()

    manager = await manager_for([instant])
    handle = await manager.run(instant)
    with pytest.raises(WorkflowFailed, match="the timeout of step 's' must be more than 0"):
        await handle.result(timeout=15)
    assert (await handle.info()).attempts == 1


def test_a_thread_added_for_an_abandoned_step_leaves_once_that_step_ends() -> None:
    """A timed-out sync step cannot be stopped: the pool grows by a thread while it runs on, so the others keep
    their slots. Once it has ended the pool must be back to its size, or more sync steps than `concurrency`
    run at once for the rest of the process (4 at concurrency 2 after four timeouts)."""
    from sonamu_tasks.threads import StepThreads

    pool = StepThreads(max_workers=1)
    release = threading.Event()
    stuck = pool.submit(release.wait, 30)
    pool.abandon(stuck, "step 'stuck'")
    assert pool.submit(lambda: "ran beside it").result(timeout=5) == "ran beside it"
    release.set()
    assert stuck.result(timeout=5) is True
    running, most = 0, 0
    lock = threading.Lock()

    def counted() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    for future in [pool.submit(counted) for _ in range(6)]:
        future.result(timeout=10)
    pool.shutdown()
    assert most == 1


def test_a_should_retry_mistake_is_refused_where_it_is_made() -> None:
    from sonamu_tasks import RetryDecision

    async def decides(error: BaseException, attempt: int) -> RetryDecision:
        return RetryDecision(should_retry=False)

    with pytest.raises(TypeError, match="not an async one"):
        RetryPolicy(should_retry=decides)  # type: ignore[arg-type]
    said_no = RetryPolicy(max_attempts=3, should_retry=lambda error, attempt: RetryDecision("no"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"RetryDecision\.should_retry must be a bool, got 'no'"):
        said_no.decide(ValueError("x"), 1)
