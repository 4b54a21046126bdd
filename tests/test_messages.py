"""Messages to runs, events runs publish, and broadcast events, on every backend (see BACKENDS)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sonamu_tasks import InvalidValue, RunNotFound, RunStatus, StepStatus, WorkflowFailed, workflow

from .conftest import wait_until


async def _status_is(handle: Any, status: RunStatus) -> bool:
    return bool(await handle.status() is status)


@workflow(version="1")
async def approval(step: Any) -> Any:
    decision = await step.receive("wait-approval", topic="approval", timeout="1h")
    return {"decision": decision}


async def test_a_message_wakes_a_waiting_run_and_is_consumed_once(manager_for: Any) -> None:
    manager = await manager_for([approval])
    handle = await manager.run(approval)
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run waiting")
    run = await handle.info(with_steps=True)
    (wait,) = run.steps
    assert wait.status is StepStatus.WAITING and wait.waits_for == {"topic": "approval"}
    assert await manager.send(handle.id, {"approved": True}, topic="approval", idempotency_key="mail-1") is True
    assert await manager.send(handle.id, {"approved": False}, topic="approval", idempotency_key="mail-1") is False
    assert await handle.result(timeout=15) == {"decision": {"approved": True}}
    assert await manager.list_messages(handle.id) == []  # consumed; the duplicate was never stored


async def test_a_message_sent_before_the_receive_is_delivered_in_order(manager_for: Any) -> None:
    gate = asyncio.Event()

    async def wait_gate() -> None:
        await gate.wait()

    @workflow(version="1")
    async def late(step: Any) -> Any:
        await step.define("gate", wait_gate).run()
        first = await step.receive("first", topic="t")
        second = await step.receive("second", topic="t")
        other = await step.receive("other", topic="u")
        return [first, second, other]

    manager = await manager_for([late])
    handle = await manager.run(late)
    for message, topic in [("a", "t"), ("x", "u"), ("b", "t")]:
        await manager.send(handle.id, message, topic=topic)
    assert [m.payload for m in await manager.list_messages(handle.id)] == ["a", "x", "b"]
    gate.set()
    assert await handle.result(timeout=15) == ["a", "b", "x"]


async def test_receive_returns_none_after_its_timeout_and_the_timeout_survives_replays(manager_for: Any) -> None:
    @workflow(version="1")
    async def impatient(step: Any) -> Any:
        first = await step.receive("first", timeout="300ms")
        await step.sleep("nap", "50ms")  # a replay after this must not wait again
        return first

    manager = await manager_for([impatient])
    handle = await manager.run(impatient)
    assert await handle.result(timeout=15) is None
    steps = {s.name: s for s in (await handle.info(with_steps=True)).steps}
    assert steps["first"].status is StepStatus.COMPLETED and steps["first"].output is None


async def test_send_to_an_unknown_run_raises_run_not_found(manager_for: Any) -> None:
    manager = await manager_for([])
    with pytest.raises(RunNotFound):
        await manager.send("01234567-89ab-7def-8123-456789abcdef", "hi")


async def test_a_message_no_receive_could_tell_apart_or_take_is_refused_and_nothing_is_stored(
    manager_for: Any,
) -> None:
    @workflow(version="1")
    async def quick() -> str:
        return "done"

    manager = await manager_for([approval, quick])
    waiting = await manager.run(approval)
    await wait_until(lambda: _status_is(waiting, RunStatus.WAITING), what="the run waiting")
    # None is what receive and wait_for_event return at their timeout: sent, it would read as "no answer".
    refused = rf"the message to run {waiting.id} on topic 'approval' is None, which step\.receive"
    with pytest.raises(InvalidValue, match=refused):
        await manager.send(waiting.id, None, topic="approval")
    with pytest.raises(InvalidValue, match=r"the payload of event 'order\.paid' is None, which step\.wait_for_event"):
        await manager.emit("order.paid", None, key="7")
    assert await manager.list_messages(waiting.id) == [] and await waiting.status() is RunStatus.WAITING
    # A completed run: no receive would ever take it.
    done = await manager.run(quick)
    assert await done.result(timeout=15) == "done"
    with pytest.raises(InvalidValue, match=f"run {done.id} is completed: no step.receive would ever take"):
        await manager.send(done.id, {"approved": True}, topic="approval")
    assert await manager.list_messages(done.id) == []
    # A repeat of a message the run took before it completed is answered as a repeat, not refused.
    assert await manager.send(waiting.id, {"approved": True}, topic="approval", idempotency_key="mail-1") is True
    assert await waiting.result(timeout=15) == {"decision": {"approved": True}}
    assert await manager.send(waiting.id, {"approved": True}, topic="approval", idempotency_key="mail-1") is False


async def test_a_waiting_run_frees_its_slot_for_other_runs(manager_for: Any) -> None:
    @workflow(version="1")
    async def quick(input: Any) -> Any:
        return input

    manager = await manager_for([approval, quick], concurrency=1)
    waiting = await manager.run(approval)
    await wait_until(lambda: _status_is(waiting, RunStatus.WAITING), what="the run waiting")
    assert await (await manager.run(quick, 5)).result(timeout=15) == 5  # the only slot is free
    await manager.send(waiting.id, "ok", topic="approval")
    assert await waiting.result(timeout=15) == {"decision": "ok"}


async def test_a_waiting_run_can_be_canceled(manager_for: Any) -> None:
    manager = await manager_for([approval])
    handle = await manager.run(approval)
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run waiting")
    assert await handle.cancel() is RunStatus.CANCELED
    with pytest.raises(WorkflowFailed, match="canceled"):
        await handle.result(timeout=5)


async def test_set_event_is_read_from_outside_latest_wins_and_get_event_waits(manager_for: Any) -> None:
    @workflow(version="1")
    async def progress(step: Any) -> Any:
        await step.set_event("progress", {"done": 40})
        await step.receive("go", topic="go")
        await step.set_event("progress", {"done": 100})
        await step.sleep("nap", "50ms")  # the replay after it must not publish 40 again
        return "done"

    manager = await manager_for([progress])
    handle = await manager.run(progress)
    assert await handle.get_event("progress", timeout=15) == {"done": 40}
    waiter = asyncio.create_task(handle.get_event("never-set", timeout=15))
    await manager.send(handle.id, True, topic="go")
    assert await handle.result(timeout=15) == "done"
    assert await handle.get_event("progress") == {"done": 100}
    assert await asyncio.wait_for(waiter, 10) is None  # the run finished without setting it: None at once
    assert await handle.get_event("never-set") is None
    assert [(e.key, e.value) for e in await manager.list_events(handle.id)] == [("progress", {"done": 100})]


async def test_get_event_times_out_with_none(manager_for: Any) -> None:
    manager = await manager_for([approval])
    handle = await manager.run(approval)
    assert await handle.get_event("nothing", timeout=0.3) is None
    await handle.cancel()


async def test_an_event_emitted_before_the_wait_is_not_missed_and_many_runs_wait_for_one(manager_for: Any) -> None:
    gate = asyncio.Event()

    async def wait_gate() -> None:
        await gate.wait()

    @workflow(version="1")
    async def late_waiter(input: Any, step: Any) -> Any:
        await step.define("gate", wait_gate).run()
        return await step.wait_for_event("paid", "order.paid", key=input)

    @workflow(version="1")
    async def waiter(input: Any, step: Any) -> Any:
        return await step.wait_for_event("paid", "order.paid", key=input, timeout="1h")

    manager = await manager_for([late_waiter, waiter], concurrency=8)
    late = await manager.run(late_waiter, "7")
    early = [await manager.run(waiter, "7") for _ in range(3)]
    other = await manager.run(waiter, "8")
    for handle in early:
        await wait_until(lambda h=handle: _status_is(h, RunStatus.WAITING), what="waiters parked")
    assert await manager.emit("order.paid", {"order_id": 7, "amount": 10.5}, key="7") == 3
    gate.set()  # the late one reaches its wait after the emit
    for handle in [late, *early]:
        assert await handle.result(timeout=15) == {"order_id": 7, "amount": 10.5}
    assert await other.status() is RunStatus.WAITING  # another key
    await manager.emit("order.paid", "eight", key="8")
    assert await other.result(timeout=15) == "eight"


async def test_an_event_emitted_before_the_run_was_created_does_not_count(manager_for: Any) -> None:
    @workflow(version="1")
    async def waiter(step: Any) -> Any:
        return await step.wait_for_event("e", "ping", timeout="300ms")

    manager = await manager_for([waiter])
    await manager.emit("ping", "too early")
    handle = await manager.run(waiter)
    assert await handle.result(timeout=15) is None


async def test_a_run_waiting_past_its_deadline_fails_at_the_deadline(manager_for: Any) -> None:
    manager = await manager_for([approval])
    handle = await manager.run(approval, deadline="500ms")
    with pytest.raises(WorkflowFailed, match="deadline exceeded"):
        await handle.result(timeout=15)


async def test_a_take_made_again_after_a_lost_answer_returns_what_the_first_took(manager_for: Any) -> None:
    """A reconnect repeats a call whose commit went through: the repeat must not take the next message."""
    from datetime import UTC, datetime, timedelta

    from sonamu_tasks.backends.base import NewRun
    from sonamu_tasks.ids import new_run_id

    manager = await manager_for([], enable_worker=False)
    backend = manager.backend
    await backend.create_run(NewRun(new_run_id(), "inbox", "1", "null"))
    (run,) = await backend.claim_runs("w", [("inbox", "1")], 1, timedelta(seconds=30))
    for message in ('"a"', '"b"'):
        await backend.send_message(run.id, "t", message, None)
    now = datetime.now(UTC)
    assert await backend.take_message(run.id, run.lease_token, "first", "t", now) == (True, "a")
    assert await backend.take_message(run.id, run.lease_token, "first", "t", now) == (True, "a")  # again
    assert [m.payload for m in await backend.list_messages(run.id, 10)] == ["b"]  # "b" is still there
    assert await backend.take_message(run.id, run.lease_token, "second", "t", now) == (True, "b")


@pytest.mark.parametrize("backend_name", ["postgres"])
async def test_a_receive_reads_its_run_and_topic_by_index_whatever_waits_for_other_runs(
    manager_for: Any, postgres_url: str, schema: str
) -> None:
    import psycopg

    manager = await manager_for([approval])
    handle = await manager.run(approval)
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run waiting")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        other = conn.execute(
            "INSERT INTO runs (id, workflow_name, version, status) VALUES "
            "(gen_random_uuid(), 'other', '1', 'waiting') RETURNING id"
        ).fetchone()
        conn.execute(
            "INSERT INTO messages (run_id, topic, payload) SELECT %s, 'approval', to_jsonb(i) "
            "FROM generate_series(1, 20000) AS i",
            [other[0]],
        )
        conn.execute("ANALYZE messages")
        # The engine's own take statement (EXPLAIN runs nothing), for a run waiting among 20,000 messages of another.
        from sonamu_tasks.backends.postgres.queries import QUERIES

        params = {
            "run_id": handle.id,
            "lease_token": "00000000-0000-0000-0000-000000000000",
            "name": "wait-approval",
            "topic": "approval",
            "started_at": None,
            "waits_for": "{}",
        }
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + QUERIES["take_message"], params))
    # Found through an index on the run (not by walking every unconsumed message, as a join once made it do).
    messages = [line for line in plan.splitlines() if "Scan" in line and " on messages" in line]
    assert messages and all("Index Scan using messages" in line for line in messages), plan
    assert "Join Filter" not in plan, plan
    await manager.send(handle.id, "yes", topic="approval")
    assert await handle.result(timeout=15) == {"decision": "yes"}
