"""Concurrent steps, step.map and child workflows, on every backend (see BACKENDS)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from sonamu_tasks import (
    ChildWorkflowFailed,
    InvalidValue,
    RetryPolicy,
    RunStatus,
    StepStatus,
    WorkflowFailed,
    workflow,
)

from .conftest import wait_until

FAST_RETRY = RetryPolicy(max_attempts=3, initial_interval_ms=50, backoff_coefficient=1)
ONCE = RetryPolicy(max_attempts=1)


class Calls:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def hit(self, name: str) -> int:
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts[name]


async def test_gathered_steps_are_each_stored_and_never_rerun_after_a_sleep(manager_for: Any) -> None:
    """The issue's example: five steps under gather, then a durable sleep. Every step checkpointed, none re-run."""
    calls = Calls()

    async def work(i: int) -> int:
        calls.hit(f"s{i}")
        await asyncio.sleep(0.01 * (5 - i))  # finish in reverse order
        return i * 10

    @workflow(version="1")
    async def par(step: Any) -> Any:
        r = await asyncio.gather(*(step.define(f"s{i}", work).run(i) for i in range(5)))
        await step.sleep("nap", "200ms")
        return r

    manager = await manager_for([par])
    handle = await manager.run(par)
    assert await handle.result(timeout=15) == [0, 10, 20, 30, 40]
    assert calls.counts == {f"s{i}": 1 for i in range(5)}
    run = await handle.info(with_steps=True)
    assert sorted(s.name for s in run.steps) == ["nap", "s0", "s1", "s2", "s3", "s4"]


async def test_a_failing_sibling_reruns_only_the_steps_that_had_not_completed(manager_for: Any) -> None:
    calls = Calls()

    async def ok(i: int) -> int:
        calls.hit(f"ok{i}")
        await asyncio.sleep(0.05)  # still in flight when the sibling raises
        return i

    async def flaky() -> str:
        if calls.hit("flaky") == 1:
            raise RuntimeError("first time fails")
        return "fine"

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def par(step: Any) -> Any:
        return await asyncio.gather(
            *(step.define(f"ok{i}", ok).run(i) for i in range(4)), step.define("flaky", flaky).run()
        )

    manager = await manager_for([par])
    handle = await manager.run(par)
    assert await handle.result(timeout=15) == [0, 1, 2, 3, "fine"]
    # The siblings in flight when "flaky" raised finished and were stored before the failure was recorded.
    assert calls.counts == {"ok0": 1, "ok1": 1, "ok2": 1, "ok3": 1, "flaky": 2}
    assert (await handle.info()).attempts == 1


async def test_gathered_steps_failing_together_are_each_retried_under_their_own_policy(manager_for: Any) -> None:
    """The first error ends the gather; the sibling that fails while the attempt winds down must not take its
    place: the run retries under the policy of the step whose error ended it, and names that step."""
    calls = Calls()
    quick = RetryPolicy(max_attempts=5, initial_interval_ms=20, backoff_coefficient=1)

    async def first() -> str:
        if calls.hit("first") < 3:
            await asyncio.sleep(0.01)
            raise ConnectionError(f"first, try {calls.counts['first']}")
        return "first"

    async def second() -> str:
        if calls.hit("second") < 2:
            await asyncio.sleep(0.2)  # fails after the first one did
            raise ConnectionError(f"second, try {calls.counts['second']}")
        return "second"

    @workflow(version="1", retry_policy=ONCE)  # only the steps' own policies allow a retry
    async def pair(step: Any) -> Any:
        return await asyncio.gather(
            step.define("first", first, retry_policy=quick).run(),
            step.define("second", second, retry_policy=quick).run(),
        )

    manager = await manager_for([pair])
    handle = await manager.run(pair)
    assert await handle.result(timeout=15) == ["first", "second"]
    assert calls.counts == {"first": 3, "second": 2}


async def test_a_run_failed_by_gathered_steps_names_the_step_whose_error_ended_it(manager_for: Any) -> None:
    async def soon() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("soon broke")

    async def later() -> None:
        await asyncio.sleep(0.2)
        raise KeyError("later broke")

    @workflow(version="1", retry_policy=ONCE)
    async def pair(step: Any) -> Any:
        await asyncio.gather(step.define("soon", soon).run(), step.define("later", later).run())

    @workflow(version="1", retry_policy=ONCE)
    async def grouped(step: Any) -> Any:
        async with asyncio.TaskGroup() as group:
            group.create_task(step.define("soon", soon).run())
            group.create_task(step.define("later", later).run())

    manager = await manager_for([pair, grouped])
    for spec in (pair, grouped):
        handle = await manager.run(spec)
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=15)
        assert failed.value.error["step"] == "soon", spec
        run = await handle.info(with_steps=True)
        soon_record = next(s for s in run.steps if s.name == "soon")
        assert soon_record.status.value == "failed" and soon_record.attempts == 1


async def test_map_runs_one_step_per_item_in_order_within_its_concurrency(manager_for: Any) -> None:
    running = 0
    peak = 0
    calls = Calls()

    async def double(x: int) -> int:
        nonlocal running, peak
        calls.hit(str(x))
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return x * 2

    @workflow(version="1")
    async def mapper(input: Any, step: Any) -> Any:
        doubled = await step.map("double", double, input, concurrency=3)
        await step.sleep("nap", "100ms")
        return doubled

    manager = await manager_for([mapper])
    handle = await manager.run(mapper, list(range(10)))
    assert await handle.result(timeout=15) == [x * 2 for x in range(10)]
    assert peak == 3
    assert calls.counts == {str(x): 1 for x in range(10)}  # after the sleep's replay too
    run = await handle.info(with_steps=True)
    assert {s.name for s in run.steps} == {f"double[{i}]" for i in range(10)} | {"nap"}


async def test_a_failed_map_starts_no_item_waiting_for_its_turn(manager_for: Any) -> None:
    calls = Calls()

    async def item(index: int) -> int:
        calls.hit(f"m{index}")
        if index == 0:
            await asyncio.sleep(0.02)  # item 1 starts meanwhile
            raise ValueError("item 0 broke")
        await asyncio.sleep(0.1)  # in flight when item 0 fails: it finishes and is stored
        return index

    @workflow(version="1", retry_policy=ONCE)
    async def mapped(step: Any) -> Any:
        return await step.map("m", item, range(6), concurrency=2)

    manager = await manager_for([mapped])
    handle = await manager.run(mapped)
    with pytest.raises(WorkflowFailed, match="item 0 broke"):
        await handle.result(timeout=15)
    assert calls.counts == {"m0": 1, "m1": 1}  # m2 had item 0's slot waiting for it: it never started
    stored = {s.name for s in (await handle.info(with_steps=True)).steps if s.status.value == "completed"}
    assert stored == {"m[1]"}


async def test_map_refuses_a_bad_concurrency_at_once(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=FAST_RETRY)  # not retried: the same code would fail the same way
    async def bad(step: Any) -> Any:
        return await step.map("m", str, [1], concurrency=0)

    manager = await manager_for([bad])
    handle = await manager.run(bad)
    with pytest.raises(WorkflowFailed, match="concurrency must be a positive int"):
        await handle.result(timeout=15)
    assert (await handle.info()).attempts == 1


async def test_map_and_a_fan_out_refuse_items_that_are_not_iterable_naming_the_step_and_workflow(
    manager_for: Any,
) -> None:
    @workflow(version="1", retry_policy=FAST_RETRY)
    async def bad_items(step: Any) -> Any:
        return await step.map("m", str, 5)

    @workflow(version="1")
    async def kid(input: Any) -> Any:
        return input

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def bad_inputs(step: Any) -> Any:
        return await step.start_workflows("kids", kid, 5)

    manager = await manager_for([bad_items, kid, bad_inputs])
    for spec, says in (
        (bad_items, r"step.map\('m'\) in workflow 'bad_items': items must be iterable"),
        (bad_inputs, r"step.start_workflows\('kids'\) in workflow 'bad_inputs': inputs must be iterable"),
    ):
        handle = await manager.run(spec)
        with pytest.raises(WorkflowFailed, match=says):
            await handle.result(timeout=15)
        assert (await handle.info()).attempts == 1


async def test_sleeps_in_concurrent_branches_park_the_run_once_and_each_is_kept(manager_for: Any) -> None:
    calls = Calls()

    async def mark(name: str) -> str:
        calls.hit(name)
        return name

    @workflow(version="1")
    async def branches(step: Any) -> Any:
        async def branch(i: int, nap: str) -> str:
            first = await step.define(f"before{i}", mark).run(f"b{i}")
            await step.sleep(f"nap{i}", nap)
            return first + await step.define(f"after{i}", mark).run(f"a{i}")

        return await asyncio.gather(branch(0, "100ms"), branch(1, "300ms"))

    manager = await manager_for([branches])
    handle = await manager.run(branches)
    assert await handle.result(timeout=15) == ["b0a0", "b1a1"]
    assert calls.counts == {"b0": 1, "b1": 1, "a0": 1, "a1": 1}


async def test_a_sleep_or_receive_timeout_in_a_gather_counts_from_its_call_not_from_when_the_run_parks(
    manager_for: Any,
) -> None:
    """The run parks only once every branch is blocked: here after a 0.5 s sibling. The waits end at their
    call plus their durations (1 s), as asyncio's own sleep would."""

    async def slow() -> str:
        await asyncio.sleep(0.5)
        return "slow"

    @workflow(version="1")
    async def gathered(step: Any) -> Any:
        return await asyncio.gather(
            step.sleep("nap", "1s"),
            step.receive("inbox", timeout="1s"),
            step.define("slow", slow).run(),
        )

    manager = await manager_for([gathered])
    handle = await manager.run(gathered)
    assert await handle.result(timeout=15) == [None, None, "slow"]
    steps = {s.name: s for s in (await handle.info(with_steps=True)).steps}
    nap, inbox = steps["nap"], steps["inbox"]
    assert nap.wake_at is not None and nap.started_at is not None
    assert 0.95 < (nap.wake_at - nap.started_at).total_seconds() < 1.3  # parked after 0.5 s: 1.5 s before the fix
    assert inbox.finished_at is not None and inbox.started_at is not None  # timed out: completed on waking
    assert 0.95 < (inbox.finished_at - inbox.started_at).total_seconds() < 1.4


async def test_a_branch_awaiting_outside_a_step_is_not_held_until_a_siblings_wait_ends(manager_for: Any) -> None:
    """A gathered branch inside an await that is not a step (a call outside a step, an asyncio.sleep) keeps
    the run from parking: its next step runs when it gets there, not when a sibling's receive times out."""
    began: dict[str, float] = {}

    async def mark() -> str:
        began["x"] = time.monotonic()
        return "x"

    async def outside_then_step(step: Any) -> str:
        await asyncio.sleep(0.3)  # not a step: the attempt does not see it
        return str(await step.define("x", mark).run())

    @workflow(version="1")
    async def gathered(step: Any) -> Any:
        return await asyncio.gather(step.receive("inbox", timeout="6s"), outside_then_step(step))

    manager = await manager_for([gathered])
    started = time.monotonic()
    handle = await manager.run(gathered)
    await wait_until(lambda: "x" in began, timeout=15, what="step x to run")
    assert began["x"] - started < 3  # about 0.3 s; it ran after the receive's 6 s timeout before the fix
    await wait_until(
        lambda: status_is(manager, handle.id, RunStatus.WAITING), what="the run to park on the receive alone"
    )
    await manager.send(handle.id, "hello")
    assert await handle.result(timeout=15) == ["hello", "x"]


@pytest.mark.parametrize("inner", ["task_group", "wait_for"])
async def test_a_branch_waiting_inside_a_task_group_or_wait_for_lets_the_run_park_at_once(
    manager_for: Any, inner: str
) -> None:
    """A gathered branch inside a TaskGroup or asyncio.wait_for waits for other tasks, not for outside work:
    the run parks as soon as every wait is registered (it stayed running 30 s, holding its slot)."""

    async def branch(step: Any) -> Any:
        if inner == "task_group":
            async with asyncio.TaskGroup() as group:
                task = group.create_task(step.receive("inner", topic="b"))
            return task.result()
        return await asyncio.wait_for(step.receive("inner", topic="b"), 3600)

    @workflow(version="1")
    async def nested(step: Any) -> Any:
        return await asyncio.gather(step.receive("outer", topic="a"), branch(step))

    manager = await manager_for([nested])
    handle = await manager.run(nested)
    await wait_until(lambda: status_is(manager, handle.id, RunStatus.WAITING), timeout=10, what="the run to park")
    await manager.send(handle.id, "one", topic="a")
    await manager.send(handle.id, "two", topic="b")
    assert await handle.result(timeout=15) == ["one", "two"]


async def status_is(manager: Any, run_id: str, status: RunStatus) -> bool:
    return bool((await manager.get_run(run_id)).status is status)


async def test_a_child_runs_once_and_the_parent_waits_without_a_slot(manager_for: Any) -> None:
    calls = Calls()

    async def bill(order: int) -> dict[str, Any]:
        calls.hit(f"bill{order}")
        return {"billed": order}

    @workflow(version="1")
    async def invoice(input: Any, step: Any) -> Any:
        await step.sleep("settle", "100ms")  # the parent parks while the child sleeps too
        return await step.define("bill", bill).run(input["order"])

    @workflow(version="1")
    async def parent(step: Any) -> Any:
        child = await step.start_workflow("invoice", invoice, {"order": 7})
        await step.sleep("nap", "50ms")  # a replay of the parent must not start the child again
        receipt = await child.result()
        again = await child.result()  # the same outcome, read once
        return {"receipt": receipt, "again": again, "child": child.id}

    # One slot: the child can only run if the waiting parent does not hold it.
    manager = await manager_for([parent, invoice], concurrency=1)
    handle = await manager.run(parent)
    out = await handle.result(timeout=20)
    assert out["receipt"] == out["again"] == {"billed": 7}
    assert calls.counts == {"bill7": 1}
    children = await manager.list_runs(parent_id=handle.id)
    assert [c.id for c in children.items] == [out["child"]]
    child = children.items[0]
    assert child.parent_id == handle.id and child.status is RunStatus.COMPLETED and child.workflow_name == "invoice"
    assert (await manager.get_run(handle.id)).parent_id is None


async def test_run_workflow_by_spec_and_a_failed_child_is_caught_by_the_parent(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=ONCE)
    async def breaks(input: Any) -> Any:
        raise ValueError(f"cannot handle {input}")

    @workflow(version="1")
    async def parent(step: Any) -> Any:
        try:
            await step.run_workflow("try", {"name": "breaks", "version": "1"}, "x")
        except ChildWorkflowFailed as error:
            return {"caught": error.error["type"], "status": error.status, "message": error.error["message"]}
        return "not raised"

    manager = await manager_for([parent, breaks])
    out = await (await manager.run(parent)).result(timeout=20)
    assert out == {"caught": "ValueError", "status": "failed", "message": "cannot handle x"}


async def test_a_parents_error_names_the_child_that_failed_and_the_childs_step(manager_for: Any) -> None:
    """In a fan-out of many children, the parent's error says which one (its step, `kids[1]`) and where it
    failed; the parent's record of that child's outcome stays a child step, as checkpointed."""

    async def charge(n: int) -> int:
        if n == 1:
            raise ValueError("card declined")
        return n

    @workflow(version="1", retry_policy=ONCE)
    async def kid(input: Any, step: Any) -> Any:
        return await step.define("charge", charge).run(input)

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def fans_out(step: Any) -> Any:
        handles = await step.start_workflows("kids", kid, [0, 1, 2])
        return [await handle.result() for handle in handles]

    manager = await manager_for([fans_out, kid])
    handle = await manager.run(fans_out)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=20)
    error = failure.value.error
    assert error["type"] == "ChildWorkflowFailed" and error["step"] == "kids[1]"
    assert "(step 'kids[1]') failed in its step 'charge': ValueError: card declined" in error["message"]
    steps = {s.name: s for s in (await handle.info(with_steps=True)).steps}
    assert steps["kids[1]"].kind == "child" and steps["kids[1]"].status is StepStatus.COMPLETED
    assert steps["kids[1]"].output["outcome"]["status"] == "failed"


async def test_an_uncaught_child_failure_fails_the_parent_without_retries(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=ONCE)
    async def breaks() -> Any:
        raise ValueError("boom")

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def parent(step: Any) -> Any:
        return await step.run_workflow("kid", breaks)

    manager = await manager_for([parent, breaks])
    handle = await manager.run(parent)
    with pytest.raises(WorkflowFailed, match="ChildWorkflowFailed"):
        await handle.result(timeout=20)
    assert (await handle.info()).attempts == 1


async def test_canceling_a_parent_cancels_its_children_but_not_detached_ones(manager_for: Any) -> None:
    @workflow(version="1")
    async def slow(step: Any) -> Any:
        await step.sleep("long", "1h")

    @workflow(version="1")
    async def parent(step: Any) -> Any:
        attached = await step.start_workflow("attached", slow)
        await step.start_workflow("detached", slow, detached=True)
        return await attached.result()

    manager = await manager_for([parent, slow])
    handle = await manager.run(parent)

    async def children_asleep() -> Any:
        page = await manager.list_runs(parent_id=handle.id)
        return len(page.items) == 2 and all(c.status is RunStatus.SLEEPING for c in page.items) and page.items

    await wait_until(children_asleep, what="both children sleeping")
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the parent waiting")
    assert await handle.cancel() is RunStatus.CANCELED
    by_step = {c.parent_step: c for c in (await manager.list_runs(parent_id=handle.id)).items}
    assert by_step["attached"].status is RunStatus.CANCELED
    assert by_step["attached"].error is not None and handle.id in by_step["attached"].error["message"]
    assert by_step["detached"].status is RunStatus.SLEEPING and by_step["detached"].detached


async def test_fan_out_of_a_thousand_children_in_one_statement(manager_for: Any) -> None:
    @workflow(version="1")
    async def square(input: Any) -> Any:
        return input * input

    @workflow(version="1")
    async def fan(step: Any) -> Any:
        handles = await step.start_workflows("sq", square, list(range(1000)))
        results = await asyncio.gather(*(h.result() for h in handles))
        return sum(results)

    manager = await manager_for([fan, square], concurrency=16)
    handle = await manager.run(fan)
    assert await handle.result(timeout=90) == sum(i * i for i in range(1000))
    seen = 0
    cursor = None
    while True:
        page = await manager.list_runs(parent_id=handle.id, limit=1000, cursor=cursor)
        seen += len(page.items)
        assert all(c.status is RunStatus.COMPLETED for c in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == 1000


async def _status_is(handle: Any, status: RunStatus) -> bool:
    return bool(await handle.status() is status)


async def test_a_cancel_during_a_gather_lets_the_steps_in_flight_finish_and_starts_no_other(
    manager_for: Any,
) -> None:
    calls = Calls()
    release = asyncio.Event()

    async def slow(name: str) -> str:
        calls.hit(name)
        await release.wait()
        return name

    async def later(name: str) -> str:
        calls.hit(name)
        return name

    @workflow(version="1")
    async def par(step: Any) -> Any:
        await asyncio.gather(step.define("a", slow).run("a"), step.define("b", slow).run("b"))
        return await step.define("after", later).run("after")

    manager = await manager_for([par])
    handle = await manager.run(par)
    await wait_until(lambda: calls.counts.get("a") and calls.counts.get("b"), what="both steps running")
    assert await handle.cancel() is RunStatus.RUNNING  # asked; honoured at the next step boundary
    release.set()
    with pytest.raises(WorkflowFailed, match="canceled"):
        await handle.result(timeout=15)
    run = await handle.info(with_steps=True)
    assert run.status is RunStatus.CANCELED
    assert sorted(s.name for s in run.steps) == ["a", "b"]  # both finished and stored
    assert "after" not in calls.counts


async def test_a_waiting_parent_can_be_paused_and_resumed(manager_for: Any) -> None:
    gate = asyncio.Event()

    async def wait_for_gate() -> str:
        await gate.wait()
        return "opened"

    @workflow(version="1")
    async def gated(step: Any) -> Any:
        return await step.define("gate", wait_for_gate).run()

    @workflow(version="1")
    async def parent(step: Any) -> Any:
        return await step.run_workflow("kid", gated)

    manager = await manager_for([parent, gated])
    handle = await manager.run(parent)
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the parent waiting")
    assert await handle.pause() is RunStatus.PAUSED
    gate.set()
    (child,) = (await manager.list_runs(parent_id=handle.id)).items
    assert await manager.handle(child.id).result(timeout=15) == "opened"
    assert await handle.status() is RunStatus.PAUSED  # the child's end does not wake a paused parent
    assert await handle.resume() is RunStatus.PENDING
    assert await handle.result(timeout=15) == "opened"


async def test_children_are_counted_per_status(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=ONCE)
    async def kid(input: Any) -> Any:
        if input == 2:
            raise ValueError("two")
        return input

    @workflow(version="1")
    async def parent(step: Any) -> Any:
        handles = await step.start_workflows("kids", kid, [0, 1, 2])
        results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
        return [r if not isinstance(r, Exception) else "failed" for r in results]

    manager = await manager_for([parent, kid])
    handle = await manager.run(parent)
    assert await handle.result(timeout=15) == [0, 1, "failed"]
    assert await manager.count_children(handle.id) == {RunStatus.COMPLETED: 2, RunStatus.FAILED: 1}
    assert await manager.count_children(handle.id.replace("0", "1", 1)) == {}


async def test_a_child_handle_is_a_run_handle_that_steers_and_reads_the_child(manager_for: Any) -> None:
    """API.md: start_workflow gives a RunHandle. Its result() is the durable wait; the rest acts at once."""

    @workflow(version="1")
    async def inbox(step: Any) -> Any:
        await step.set_event("ready", True)
        message = await step.receive("wait", topic="go", timeout="1h")
        return {"got": message}

    @workflow(version="1")
    async def parent(step: Any) -> Any:
        child = await step.start_workflow("inbox", inbox)
        ready = await step.define("ready", child.get_event).run("ready", 10)
        sent = await step.define("send", child.send).run({"n": 1}, topic="go")
        info = await child.info()
        out = await child.result()
        return {"ready": ready, "sent": sent, "out": out, "parent_of_child": info.parent_id, "is": child.workflow_name}

    manager = await manager_for([parent, inbox])
    handle = await manager.run(parent)
    out = await handle.result(timeout=20)
    assert out == {"ready": True, "sent": True, "out": {"got": {"n": 1}}, "parent_of_child": handle.id, "is": "inbox"}


async def test_a_child_canceled_through_its_handle_fails_the_parents_wait(manager_for: Any) -> None:
    @workflow(version="1")
    async def slow(step: Any) -> Any:
        await step.sleep("long", "1h")

    @workflow(version="1")
    async def parent(step: Any) -> Any:
        child = await step.start_workflow("slow", slow)
        await step.define("cancel", child.cancel).run()  # at once, or at the child's next step if it is running
        try:
            await child.result()
        except ChildWorkflowFailed as error:
            return {"seen": error.status}
        return "not raised"

    manager = await manager_for([parent, slow])
    out = await (await manager.run(parent)).result(timeout=20)
    assert out == {"seen": "canceled"}


async def test_a_child_deadline_fails_the_child_and_a_child_result_takes_no_timeout(manager_for: Any) -> None:
    @workflow(version="1")
    async def never_claimed_in_time(step: Any) -> Any:
        return "late"

    @workflow(version="1", retry_policy=ONCE)
    async def parent(step: Any) -> Any:
        late = await step.start_workflow("late", never_claimed_in_time, deadline=datetime(2000, 1, 1, tzinfo=UTC))
        try:
            await late.result()
        except ChildWorkflowFailed as error:
            outcome = error.error["message"]
        try:
            await late.result(timeout=5)
        except InvalidValue as error:
            return {"outcome": outcome, "refused": str(error)}
        return "not refused"

    manager = await manager_for([parent, never_claimed_in_time])
    out = await (await manager.run(parent)).result(timeout=20)
    assert out["outcome"].startswith("deadline exceeded")
    assert "'late'" in out["refused"] and "'parent'" in out["refused"] and "no timeout" in out["refused"]


async def test_a_parent_resumes_as_soon_as_its_child_ends_in_the_same_process(manager_for: Any) -> None:
    """A guard: the child's end makes its parent due, and the worker that ran the child claims the parent
    without waiting for a poll (set to 5 s here, so that waiting for one would show)."""

    @workflow(version="1", retry_policy=ONCE)
    async def quick(input: Any) -> Any:
        if input == "fail":
            raise ValueError("no")
        return input

    @workflow(version="1")
    async def waits(step: Any) -> Any:
        done = await step.run_workflow("ok", quick, "fine")
        try:
            await step.run_workflow("bad", quick, "fail")
        except ChildWorkflowFailed:
            return done
        return "not raised"

    manager = await manager_for([waits, quick], poll_interval_ms=5000)
    handle = await manager.run(waits)
    assert await handle.result(timeout=30) == "fine"
    parent = await handle.info()
    children = (await manager.list_runs(parent_id=handle.id)).items
    assert parent.finished_at is not None and all(child.finished_at is not None for child in children)
    assert (parent.finished_at - parent.created_at).total_seconds() < 3, "the parent waited for a poll"
