"""The behaviour suite: what users rely on, run against every storage backend (see BACKENDS)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest

from sonamu_tasks import (
    BackendClosed,
    InvalidInput,
    InvalidValue,
    NonRetryableError,
    ResultTimeout,
    RetryDecision,
    RetryPolicy,
    RunNotFound,
    RunStatus,
    SerializationError,
    StepStatus,
    WorkflowFailed,
    WorkflowManager,
    workflow,
)
from sonamu_tasks.backends.base import LeaseLost, NewRun, TimedWait
from sonamu_tasks.backends.postgres.backend import COPY_AT_LEAST
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.queue import Queue
from sonamu_tasks.records import CutValue

from .conftest import BACKENDS, PGBOUNCER_BACKENDS, wait_until


@pytest.fixture(params=BACKENDS + PGBOUNCER_BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """This suite runs on every backend, and on PostgreSQL through PgBouncer in session and transaction mode."""
    return str(request.param)


FAST_RETRY = RetryPolicy(max_attempts=3, initial_interval_ms=50, backoff_coefficient=1)


class Calls:
    """Counts how often each step function really ran (replays do not call it)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def hit(self, name: str) -> int:
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts[name]


async def test_workflow_runs_its_steps_in_order_and_returns_output(manager_for: Any) -> None:
    order: list[str] = []

    async def load(order_id: int) -> dict[str, Any]:
        order.append("load")
        return {"id": order_id, "total": 30}

    def render(loaded: dict[str, Any]) -> str:  # sync: runs in the thread pool
        order.append("render")
        return f"invoice-{loaded['id']}"

    @workflow(version="1")
    async def send_invoice(input: Any, step: Any) -> Any:
        loaded = await step.define("load-order", load).run(input["order_id"])
        pdf = await step.define("render", render).run(loaded)
        return {"sent": True, "pdf": pdf}

    manager = await manager_for([send_invoice])
    handle = await manager.run(send_invoice, {"order_id": 7})
    assert await handle.result(timeout=15) == {"sent": True, "pdf": "invoice-7"}
    assert order == ["load", "render"]
    run = await handle.info(with_steps=True)
    assert run.status is RunStatus.COMPLETED
    assert [(s.name, s.status, s.output) for s in run.steps] == [
        ("load-order", StepStatus.COMPLETED, {"id": 7, "total": 30}),
        ("render", StepStatus.COMPLETED, "invoice-7"),
    ]


async def test_result_and_steps_see_the_stored_json_wherever_the_run_finished(manager_for: Any) -> None:
    """A step and result() return what was stored (a tuple comes back a list), whether the run completed in
    the caller's process (whose worker hands the output over) or is read back from the database."""
    seen: list[Any] = []

    async def pair() -> Any:
        return (1, "two")

    @workflow(version="1")
    async def shapes(step: Any) -> Any:
        value = await step.define("pair", pair).run()
        seen.append(value)
        return {"pair": value, "tuple": (3, None), "nested": {"b": 1.5, "a": [True]}}

    manager = await manager_for([shapes])
    handle = await manager.run(shapes)
    expected = {"pair": [1, "two"], "tuple": [3, None], "nested": {"b": 1.5, "a": [True]}}
    assert await handle.result(timeout=15) == expected
    assert seen == [[1, "two"]]
    assert (await manager.wait_until_finished(handle.id, timeout=5)).output == expected
    assert await manager.handle(handle.id).result(timeout=5) == expected


async def test_a_step_value_is_the_same_at_its_first_execution_and_every_replay_on_every_backend(
    manager_for: Any,
) -> None:
    """PostgreSQL's jsonb orders an object's keys (shortest first) and stores numbers as decimals (1e16 comes
    back an int, -0.0 as 0.0). The first execution must see what replays will read back, or a decision on the
    value changes between them: here the first key picks a step, and on PostgreSQL the replay picked another
    and ran a second side effect. Every backend gives the same value, so code tested on SQLite holds on
    PostgreSQL."""
    calls = Calls()
    seen: list[tuple[list[str], Any, Any, list[str]]] = []

    async def contacts() -> dict[str, Any]:
        return {"primary_ops": "ops@example.com", "cto": "cto@example.com", "it": "it@example.com"}

    async def numbers() -> list[Any]:  # not list[float]: a declared type would turn them back to floats
        return [1e16, 2.5e20, -0.0, 1.5e-07, 1.0]

    async def big() -> Any:
        return 1e16

    async def typed_big() -> float:  # declared: a float, though it reads back from JSON as an int
        return 1e16

    async def notify(address: str) -> str:
        calls.hit(address)
        return address

    async def flaky() -> None:
        if calls.hit("flaky") == 1:
            raise RuntimeError("fails once: the run is replayed")

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def notifies_the_first(input: Any, step: Any) -> Any:
        people = await step.define("contacts", contacts).run()
        first = next(iter(people))
        await step.define(f"notify-{first}", notify).run(people[first])
        values = await step.define("numbers", numbers).run()
        scalar = await step.define("big", big).run()
        typed = await step.define("typed-big", typed_big).run()
        assert type(typed) is float and typed == 1e16
        await step.define("flaky", flaky).run()
        seen.append((list(people), values, scalar, list(input)))
        return {"people": people, "values": values, "input": input}

    manager = await manager_for([notifies_the_first])
    handle = await manager.run(notifies_the_first, {"zeta": 1, "alpha": 2, "é": 3, "ab": 4})
    output = await handle.result(timeout=15)
    jsonb_order = ["it", "cto", "primary_ops"]
    input_order = ["ab", "é", "zeta", "alpha"]  # "é" is two bytes in UTF-8, after "ab"
    assert [address for address in calls.counts if "@" in address] == ["it@example.com"]
    assert calls.counts["it@example.com"] == 1 and calls.counts["flaky"] == 2
    assert len(seen) == 1  # the attempt that got past the flaky step: a replay of the others
    people, values, scalar, input_keys = seen[0]
    assert people == jsonb_order and input_keys == input_order
    assert values == [10**16, 25 * 10**19, 0.0, 1.5e-07, 1.0]
    assert [type(v) for v in values] == [int, int, float, float, float]
    assert scalar == 10**16 and type(scalar) is int
    assert list(output["people"]) == jsonb_order and list(output["input"]) == input_order
    assert list((await manager.handle(handle.id).result(timeout=5))["people"]) == jsonb_order


async def test_a_step_is_stored_before_anything_after_it_and_survives_a_failure_between_steps(
    manager_for: Any,
) -> None:
    """A step's checkpoint may travel with the completion when the workflow returns right after it; in every
    other case it is stored before the next step starts, and a failure in the workflow's own code between two
    steps does not lose it (the retry replays it instead of calling it again)."""
    calls = Calls()
    stored_when_second_ran: list[tuple[str, StepStatus]] = []
    holder: dict[str, WorkflowManager] = {}

    async def first() -> str:
        calls.hit("first")
        return "one"

    async def second(run_id: str) -> str:
        calls.hit("second")
        steps = await holder["manager"].backend.load_steps(run_id)
        stored_when_second_ran.extend((name, record.status) for name, record in sorted(steps.items()))
        return "two"

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def careful(step: Any, context: Any) -> Any:
        one = await step.define("first", first).run()
        if context["attempt"] == 1:
            raise RuntimeError("the workflow's own code failed between two steps")
        await asyncio.sleep(0.05)  # not a step: its checkpoint must not wait for the next one
        two = await step.define("second", second).run(context["run_id"])
        return [one, two]

    manager = holder["manager"] = await manager_for([careful])
    handle = await manager.run(careful)
    assert await handle.result(timeout=15) == ["one", "two"]
    assert calls.counts == {"first": 1, "second": 1}
    assert stored_when_second_ran == [("first", StepStatus.COMPLETED)]
    run = await handle.info(with_steps=True)
    assert (run.attempts, [(s.name, s.status, s.output) for s in run.steps]) == (
        1,
        [("first", StepStatus.COMPLETED, "one"), ("second", StepStatus.COMPLETED, "two")],
    )


async def test_completed_steps_are_not_rerun_when_a_later_step_is_retried(manager_for: Any) -> None:
    calls = Calls()

    async def first() -> str:
        calls.hit("first")
        return "one"

    async def second(previous: str) -> str:
        if calls.hit("second") < 3:
            raise ConnectionError("flaky service")
        return previous + "+two"

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def flaky(step: Any) -> Any:
        one = await step.define("first", first).run()
        return await step.define("second", second).run(one)

    manager = await manager_for([flaky])
    handle = await manager.run(flaky)
    assert await handle.result(timeout=15) == "one+two"
    assert calls.counts == {"first": 1, "second": 3}
    run = await handle.info(with_steps=True)
    assert run.attempts == 2  # failed attempts only
    steps = {s.name: s for s in run.steps}
    assert steps["second"].attempts == 3 and steps["first"].attempts == 1


async def test_run_fails_with_stored_error_after_last_attempt(manager_for: Any) -> None:
    calls = Calls()

    def always_broken() -> None:
        calls.hit("broken")
        raise ValueError("the printer is on fire")

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=10))
    async def doomed(step: Any) -> None:
        await step.define("print", always_broken).run()

    manager = await manager_for([doomed])
    handle = await manager.run(doomed)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    assert failure.value.error["type"] == "ValueError"
    assert failure.value.error["message"] == "the printer is on fire"
    assert failure.value.error["step"] == "print"
    assert "always_broken" in failure.value.error["traceback"]
    assert "print" in str(failure.value) and "the printer is on fire" in str(failure.value)
    assert calls.counts == {"broken": 2}
    run = await handle.info(with_steps=True)
    assert run.status is RunStatus.FAILED and run.attempts == 2
    assert run.steps[0].status is StepStatus.FAILED and run.steps[0].error is not None


async def test_dynamic_retry_policy_decides_per_error(manager_for: Any) -> None:
    seen: list[tuple[str, int]] = []

    def decide(error: BaseException, attempt: int) -> RetryDecision:
        seen.append((str(error), attempt))
        return RetryDecision(should_retry=str(error) != "FATAL", delay_ms=10)

    calls = Calls()

    def fails_then_fatal() -> None:
        raise RuntimeError("transient" if calls.hit("step") == 1 else "FATAL")

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=10, should_retry=decide))
    async def picky(step: Any) -> None:
        await step.define("work", fails_then_fatal).run()

    manager = await manager_for([picky])
    handle = await manager.run(picky)
    with pytest.raises(WorkflowFailed, match="FATAL"):
        await handle.result(timeout=15)
    assert seen == [("transient", 1), ("FATAL", 2)]


async def test_runs_failing_together_retry_at_spread_times_with_jitter(manager_for: Any) -> None:
    def down() -> None:
        raise ConnectionError("the payment service is down")

    policy = RetryPolicy(max_attempts=2, initial_interval_ms=600_000, maximum_interval_ms=None, jitter=0.5)

    @workflow(version="1", retry_policy=policy)
    async def pays(step: Any, input: int) -> None:
        await step.define("charge", down).run()

    manager = await manager_for([pays])
    handles = [await manager.run(pays, n) for n in range(6)]

    async def all_waiting() -> list[Any]:
        runs = [await handle.info() for handle in handles]
        return runs if all(run.attempts == 1 for run in runs) else []

    runs = await wait_until(all_waiting, what="every run's first failure")
    delays = sorted((run.available_at - run.updated_at).total_seconds() for run in runs)
    assert all(run.status is RunStatus.PENDING for run in runs)
    assert delays[0] >= 300 - 1 and delays[-1] <= 600 + 1, delays  # within the jitter's half of the backoff
    assert delays[-1] - delays[0] > 1, delays  # not all at once (all six within 1 s: 1 in 10^12)


async def test_durable_sleep_parks_the_run_and_frees_its_slot(manager_for: Any) -> None:
    @workflow(version="1")
    async def napper(step: Any) -> str:
        await step.sleep("nap", "1500ms")
        return "rested"

    @workflow(version="1")
    async def quick(step: Any) -> str:
        return str(await step.define("q", lambda: "quick").run())

    manager = await manager_for([napper, quick], concurrency=1)
    sleeper = await manager.run(napper)
    await wait_until(lambda: _status_is(sleeper, RunStatus.SLEEPING), what="the run to sleep")
    # With one slot, another run still completes while the first sleeps: the sleeper holds no slot.
    assert await (await manager.run(quick)).result(timeout=5) == "quick"
    assert await sleeper.status() is RunStatus.SLEEPING
    assert await sleeper.result(timeout=15) == "rested"
    steps = (await sleeper.info(with_steps=True)).steps
    assert steps[0].kind == "sleep" and steps[0].status is StepStatus.COMPLETED


async def test_sleep_survives_a_restart_of_the_only_worker(make_config: Any) -> None:
    calls = Calls()

    async def before() -> int:
        return calls.hit("before")

    @workflow(version="1")
    async def long_nap(step: Any) -> int:
        await step.define("before", before).run()
        await step.sleep("nap", timedelta(seconds=1))
        return calls.hit("after")

    async with WorkflowManager(make_config(), workflows=[long_nap]) as first:
        handle = await first.run(long_nap)
        await wait_until(lambda: _status_is(handle, RunStatus.SLEEPING), what="the run to sleep")
    async with WorkflowManager(make_config(), workflows=[long_nap]) as second:
        assert await second.handle(handle.id).result(timeout=15) == 1
    assert calls.counts == {"before": 1, "after": 1}


async def test_sync_steps_run_off_the_event_loop(manager_for: Any) -> None:
    loop_thread = threading.get_ident()
    ran_in: list[int] = []

    def blocking() -> str:
        ran_in.append(threading.get_ident())
        return "done"

    @workflow(version="1")
    async def uses_thread(step: Any) -> str:
        return str(await step.define("blocking", blocking).run())

    manager = await manager_for([uses_thread])
    assert await (await manager.run(uses_thread)).result(timeout=15) == "done"
    assert ran_in and ran_in[0] != loop_thread


async def test_a_sync_step_raising_stop_iteration_fails_and_is_retried_like_any_error(manager_for: Any) -> None:
    """`next()` on an empty iterator: asyncio refuses StopIteration in a future, and the run hung, running."""
    calls = Calls()

    def first_line(lines: list[str]) -> str:
        if calls.hit("first_line") == 1:
            return next(iter([]))
        return lines[0]

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=10))
    async def reads(step: Any) -> str:
        return str(await step.define("first-line", first_line).run(["a", "b"]))

    manager = await manager_for([reads])
    handle = await manager.run(reads)
    assert await handle.result(timeout=15) == "a"
    run = await handle.info(with_steps=True)
    assert run.attempts == 1 and calls.counts == {"first_line": 2}


async def test_step_get_wraps_methods_and_names_them_in_underscore_case(manager_for: Any) -> None:
    class InvoiceService:
        def renderPdf(self, order: int) -> str:
            return f"pdf-{order}"

        @staticmethod
        def deliver(pdf: str) -> str:
            return f"sent {pdf}"

    @workflow(version="1")
    async def invoice(step: Any) -> Any:
        pdf = await step.get(InvoiceService, "renderPdf").run(3)
        return await step.get(InvoiceService(), "deliver", name="email").run(pdf)

    manager = await manager_for([invoice])
    handle = await manager.run(invoice)
    assert await handle.result(timeout=15) == "sent pdf-3"
    assert [s.name for s in (await handle.info(with_steps=True)).steps] == ["render_pdf", "email"]


async def test_workflow_receives_logger_version_and_context(manager_for: Any, caplog: Any) -> None:
    @workflow(version="7")
    async def introspective(logger: Any, version: str, context: Any, input: Any) -> Any:
        logger.info("hello from the workflow")
        return {"version": version, "context": context, "input": input}

    manager = await manager_for([introspective], context_provider=lambda default: {**default, "db": "fake-db"})
    with caplog.at_level("INFO", logger="sonamu_tasks.workflow"):
        handle = await manager.run(introspective, [1, 2])
        result = await handle.result(timeout=15)
    assert result["version"] == "7" and result["input"] == [1, 2]
    assert result["context"]["db"] == "fake-db" and result["context"]["run_id"] == handle.id
    record = next(r for r in caplog.records if "hello from the workflow" in r.getMessage())
    assert record.run_id == handle.id and record.workflow == "introspective"  # type: ignore[attr-defined]


async def test_the_engines_lines_about_a_run_name_its_failed_step_under_a_logger_of_their_own(
    manager_for: Any, caplog: Any
) -> None:
    def declines() -> None:
        raise ValueError("card declined")

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=20))
    async def charges(step: Any, logger: Any) -> None:
        logger.info("charging")
        await step.define("charge", declines).run()

    manager = await manager_for([charges])
    with caplog.at_level("INFO", logger="sonamu_tasks"):
        handle = await manager.run(charges)
        with pytest.raises(WorkflowFailed):
            await handle.result(timeout=15)
    engine = [r for r in caplog.records if r.name == "sonamu_tasks.attempt" and r.levelno >= logging.WARNING]
    assert [(r.levelname, r.step, r.run_id) for r in engine] == [  # type: ignore[attr-defined]
        ("WARNING", "charge", handle.id),
        ("ERROR", "charge", handle.id),
    ]
    assert "step=charge] attempt 1 failed: card declined; retrying in" in engine[0].getMessage()
    assert engine[1].exc_info is not None and engine[1].exc_info[0] is ValueError  # the traceback is logged
    workflow_lines = [r.getMessage() for r in caplog.records if r.name == "sonamu_tasks.workflow"]
    assert workflow_lines and all("charging" in line for line in workflow_lines)  # the workflow's own lines only


async def test_idempotency_key_returns_the_existing_run(manager_for: Any) -> None:
    @workflow(version="1")
    async def once(input: Any) -> Any:
        return input

    manager = await manager_for([once])
    first = await manager.run(once, {"n": 1}, idempotency_key="order-7")
    second = await manager.run(once, {"n": 2}, idempotency_key="order-7")
    assert first.id == second.id and first.created and not second.created
    assert await second.result(timeout=15) == {"n": 1}


class Order(pydantic.BaseModel):
    order_id: int
    email: str


@dataclasses.dataclass
class Receipt:
    order_id: int
    amount: float


async def test_schema_refuses_bad_input_at_run_naming_the_field_and_stores_nothing(manager_for: Any) -> None:
    received: list[Any] = []

    @workflow(version="1", schema=Order)
    async def typed(input: Order) -> int:
        received.append(input)
        return input.order_id

    manager = await manager_for([typed])
    with pytest.raises(InvalidInput) as refused:
        await manager.run(typed, {"order_id": "not a number", "email": "a@b.c"}, idempotency_key="k1")
    assert "order_id" in str(refused.value) and "typed" in str(refused.value)
    # Nothing was stored: the same idempotency key starts a new run.
    handle = await manager.run(typed, {"order_id": "12", "email": "a@b.c"}, idempotency_key="k1")
    assert handle.created
    assert await handle.result(timeout=15) == 12
    assert isinstance(received[0], Order)


async def test_type_adapter_and_callable_schemas(manager_for: Any) -> None:
    def positive(value: Any) -> int:
        if not isinstance(value, int) or value <= 0:
            raise ValueError("amount must be a positive integer")
        return value

    @workflow(version="1", schema=pydantic.TypeAdapter(list[int]))
    async def adapted(input: list[int]) -> int:
        return sum(input)

    @workflow(version="1", schema=positive)
    async def checked(input: int) -> int:
        return input

    manager = await manager_for([adapted, checked])
    assert await (await manager.run(adapted, ["1", 2])).result(timeout=15) == 3
    with pytest.raises(InvalidInput, match="0: Input should be a valid integer"):
        await manager.run(adapted, ["x"])
    with pytest.raises(InvalidInput, match="amount must be a positive integer"):
        await manager.run(checked, -1)


async def test_models_and_dataclasses_cross_checkpoints_the_same_on_replay(manager_for: Any) -> None:
    calls = Calls()
    seen: list[Any] = []

    async def make_receipt() -> Receipt:
        calls.hit("receipt")
        return Receipt(order_id=5, amount=9.5)

    async def load_order() -> Order:
        return Order(order_id=5, email="x@y.z")

    def flaky() -> None:
        if calls.hit("flaky") == 1:
            raise ConnectionError("try again")

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def typed_steps(step: Any) -> Any:
        receipt = await step.define("receipt", make_receipt).run()
        order = await step.define("order", load_order).run()
        seen.append((receipt, order))
        await step.define("flaky", flaky).run()
        return {"receipt": receipt, "order": order}

    manager = await manager_for([typed_steps])
    result = await (await manager.run(typed_steps)).result(timeout=15)
    assert result == {"receipt": {"order_id": 5, "amount": 9.5}, "order": {"order_id": 5, "email": "x@y.z"}}
    assert calls.counts["receipt"] == 1
    # First execution and the replay after the retry saw equal, typed values.
    assert seen[0] == seen[1] and isinstance(seen[1][0], Receipt) and isinstance(seen[1][1], Order)


async def test_result_gives_the_output_as_the_type_the_workflow_declares(manager_for: Any) -> None:
    @workflow(version="1")
    async def load(input: int) -> Order:
        return Order(order_id=input, email="x@y.z")

    @workflow(version="1")
    async def pay(input: int) -> list[Receipt]:
        return [Receipt(order_id=input, amount=9.5)]

    @workflow(version="1")
    async def parent(input: int, step: Any) -> int:
        child = await step.start_workflow("load", load, input)
        order = await child.result()
        [receipt] = await step.run_workflow("pay", pay, input)
        assert isinstance(order, Order) and isinstance(receipt, Receipt)  # a child's output is typed too
        return order.order_id + int(receipt.amount)

    manager = await manager_for([load, pay, parent])
    order = await (await manager.run(load, 7)).result(timeout=15)
    assert order == Order(order_id=7, email="x@y.z")
    assert await (await manager.run(pay, 3)).result(timeout=15) == [Receipt(order_id=3, amount=9.5)]
    [batch] = await manager.run_many(load, [8])
    assert await batch.result(timeout=15) == Order(order_id=8, email="x@y.z")
    assert await (await manager.run(parent, 1)).result(timeout=15) == 10
    # Found by id, the run's workflow is not known to the handle: its output comes as stored, JSON.
    assert await manager.handle(batch.id).result(timeout=15) == {"order_id": 8, "email": "x@y.z"}


async def test_a_large_run_many_runs_every_input_and_a_bad_one_far_in_stores_nothing(manager_for: Any) -> None:
    # On PostgreSQL, directly or through PgBouncer in either pool mode, this many runs go by one COPY, streamed
    # while the later inputs are prepared: the bad one is met mid-stream, and the COPY's transaction stores nothing
    @workflow(version="1")
    async def doubled(input: int) -> int:
        return input * 2

    manager = await manager_for([doubled], concurrency=32)
    count = COPY_AT_LEAST + 100
    with pytest.raises(SerializationError, match=rf"inputs\[{count - 1}\]"):
        await manager.run_many(doubled, [*range(count - 1), object()])
    assert (await manager.list_runs()).items == []
    handles = await manager.run_many(doubled, list(range(count)), priority=3)
    assert len({handle.id for handle in handles}) == count and all(handle.created for handle in handles)
    assert await asyncio.gather(*(handle.result(timeout=60) for handle in handles)) == [2 * i for i in range(count)]
    assert {run.priority for run in (await manager.list_runs(limit=count)).items} == {3}


class Total(pydantic.BaseModel):
    total_cents: int


async def test_a_run_found_by_its_key_gives_its_output_as_the_type_its_own_version_declares(manager_for: Any) -> None:
    @workflow(version="1", name="priced")
    async def priced_v1() -> Order:
        return Order(order_id=1, email="x@y.z")

    @workflow(version="2", name="priced")
    async def priced_v2() -> Total:
        return Total(total_cents=100)

    manager = await manager_for([priced_v1, priced_v2])
    first = await manager.run(priced_v1, idempotency_key="k")
    assert await first.result(timeout=15) == Order(order_id=1, email="x@y.z")
    again = await manager.run(priced_v2, idempotency_key="k")  # the key finds version 1's run
    assert again.id == first.id and not again.created
    assert await again.result(timeout=15) == Order(order_id=1, email="x@y.z")
    [batch] = await manager.run_many(priced_v2, [None], idempotency_keys=["k"])
    assert await batch.result(timeout=15) == Order(order_id=1, email="x@y.z")


async def test_result_refuses_an_output_that_does_not_fit_the_declared_type_naming_the_run(manager_for: Any) -> None:
    @workflow(version="1")
    async def mistyped() -> list[int]:
        return ["not a number"]  # type: ignore[list-item]

    manager = await manager_for([mistyped])
    handle = await manager.run(mistyped)
    expected = f"the output of run {handle.id} \\(mistyped\\) does not fit its declared type list\\[int\\]"
    with pytest.raises(SerializationError, match=expected):
        await handle.result(timeout=15)
    assert (await handle.info()).output == ["not a number"]  # the run completed; its output is kept as returned


async def test_unstorable_step_result_fails_the_run_naming_the_step_and_keeps_checkpoints(
    manager_for: Any,
) -> None:
    calls = Calls()

    async def fine() -> str:
        calls.hit("fine")
        return "kept"

    async def returns_a_set() -> set[int]:
        calls.hit("bad")
        return {1, 2}

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def unstorable(step: Any) -> None:
        await step.define("fine", fine).run()
        await step.define("bad-result", returns_a_set).run()

    manager = await manager_for([unstorable])
    handle = await manager.run(unstorable)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    assert failure.value.error["step"] == "bad-result"
    assert "cannot be stored as JSON" in failure.value.error["message"]
    assert "unstorable" in failure.value.error["message"]
    assert calls.counts == {"fine": 1, "bad": 1}  # not retried: it would fail the same way
    steps = {s.name: s for s in (await handle.info(with_steps=True)).steps}
    assert steps["fine"].status is StepStatus.COMPLETED and steps["fine"].output == "kept"


async def test_a_step_result_that_does_not_fit_its_declared_type_fails_the_step_and_is_not_stored(
    manager_for: Any,
) -> None:
    """Checked before its checkpoint is stored: it was stored completed, then failed every replay (and a
    retry after the fix) with pydantic's bare error naming no step."""
    calls = Calls()
    fixed = {"yes": False}

    def load(order_id: int) -> Order:  # declares Order; returns a dict without "email" until fixed
        calls.hit("load")
        return {"order_id": order_id, "email": "a@b.c"} if fixed["yes"] else {"order_id": order_id}  # type: ignore[return-value]

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def typed_step(step: Any) -> str:
        order = await step.define("load", load).run(7)
        return str(order.email)

    manager = await manager_for([typed_step])
    handle = await manager.run(typed_step)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    assert failure.value.error["step"] == "load" and failure.value.error["type"] == "SerializationError"
    message = failure.value.error["message"]
    assert "step 'load'" in message and "typed_step" in message and "Order" in message and "email" in message
    assert calls.counts == {"load": 1}  # not retried: it would fail the same way
    steps = {s.name: s for s in (await handle.info(with_steps=True)).steps}
    assert "load" not in steps or steps["load"].status is not StepStatus.COMPLETED
    fixed["yes"] = True  # the fix deployed: a retry runs the step again
    await handle.retry()
    assert await handle.result(timeout=15) == "a@b.c"
    assert calls.counts == {"load": 2}


async def test_a_stored_step_result_that_no_longer_fits_its_declared_type_fails_naming_the_step(
    manager_for: Any,
) -> None:
    """The code changed between attempts (a deploy): the step's declared type no longer fits what it
    stored. Retrying cannot help; the run fails at once naming the step and how to run it again."""
    calls = Calls()

    def untyped(order_id: int) -> dict[str, Any]:
        calls.hit("load")
        return {"order_id": order_id}

    def typed(order_id: int) -> Order:  # the new code: the stored dict lacks "email"
        calls.hit("load")
        return Order(order_id=order_id, email="a@b.c")

    code = {"load": untyped}

    async def flaky() -> None:
        if calls.hit("flaky") == 1:
            code["load"] = typed  # deployed while the run waits for its retry
            raise RuntimeError("fails once: the run is replayed")

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def deployed(step: Any) -> Any:
        await step.define("load", code["load"]).run(7)
        await step.define("flaky", flaky).run()

    manager = await manager_for([deployed])
    handle = await manager.run(deployed)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    error = failure.value.error
    assert error["step"] == "load" and error["type"] == "SerializationError"
    assert "stored result of step 'load'" in error["message"] and "fork the run from step 'load'" in error["message"]
    assert calls.counts == {"load": 1, "flaky": 1}
    assert (await handle.info()).attempts == 2  # not retried again: it would fail the same way


async def test_the_workflows_log_speaks_again_past_a_step_it_no_longer_reaches(
    manager_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A replay is quiet until the code has passed its recorded steps. A step removed by a deploy between
    attempts is never reached again: the log stayed silent for the rest of the run."""
    calls = Calls()
    code = {"old_step": True}

    async def side() -> None:
        calls.hit("side")

    async def flaky() -> None:
        if calls.hit("flaky") == 1:
            code["old_step"] = False  # deployed while the run waits for its retry: the step is gone
            raise RuntimeError("fails once: the run is replayed")

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def loses_a_step(step: Any, logger: Any, context: Any) -> None:
        if code["old_step"]:
            await step.define("old-step", side).run()
        await step.define("flaky", flaky).run()
        logger.warning("past the flaky step, attempt %d", context["attempt"])
        await step.define("after", side).run()

    manager = await manager_for([loses_a_step])
    with caplog.at_level(logging.WARNING, logger="sonamu_tasks.workflow"):
        handle = await manager.run(loses_a_step)
        await handle.result(timeout=15)
    assert "past the flaky step, attempt 2" in caplog.text


async def test_unstorable_input_is_refused_at_run(manager_for: Any) -> None:
    @workflow(version="1")
    async def anything(input: Any) -> Any:
        return input

    manager = await manager_for([anything])
    with pytest.raises(TypeError, match="input of workflow 'anything' cannot be stored as JSON"):
        await manager.run(anything, {"when": datetime.now(UTC)})


async def test_a_step_name_used_twice_fails_the_run_clearly(manager_for: Any) -> None:
    @workflow(version="1")
    async def repeats(step: Any) -> None:
        for _ in range(2):
            await step.define("same", lambda: 1).run()

    manager = await manager_for([repeats])
    with pytest.raises(WorkflowFailed, match="used the step name 'same' twice"):
        await (await manager.run(repeats)).result(timeout=15)


async def test_a_process_without_the_code_starts_runs_for_a_worker_that_has_it(manager_for: Any) -> None:
    @workflow(version="2")
    async def remote(input: Any) -> Any:
        return {"echo": input}

    web = await manager_for([], enable_worker=False)  # a web server: no worker, no workflow code
    handle = await web.run({"name": "remote", "version": "2"}, {"x": 1})
    unknown_version = await web.run({"name": "remote", "version": "3"}, {"x": 2})
    await manager_for([remote])  # the worker fleet
    assert await handle.result(timeout=15) == {"echo": {"x": 1}}
    # No live worker knows version 3: it waits, visibly, and is not failed.
    with pytest.raises(ResultTimeout, match="pending"):
        await unknown_version.result(timeout=0.5)
    assert (await unknown_version.info()).attempts == 0


class Holders:
    """A workflow whose one step holds until `release` is set, counting the runs holding at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()

        async def hold() -> None:
            self.running += 1
            self.peak = max(self.peak, self.running)
            await self.release.wait()
            self.running -= 1

        @workflow(version="1")
        async def holder(step: Any) -> None:
            await step.define("hold", hold).run()

        self.workflow = holder


async def test_concurrency_bounds_the_runs_executing_at_once(manager_for: Any) -> None:
    holders = Holders()
    manager = await manager_for([holders.workflow], concurrency=2)
    handles = [await manager.run(holders.workflow) for _ in range(5)]
    await wait_until(lambda: holders.running == 2, what="two runs to hold their slots")
    statuses = [await h.status() for h in handles]
    assert statuses.count(RunStatus.RUNNING) == 2 and statuses.count(RunStatus.PENDING) == 3
    holders.release.set()
    for handle in handles:
        await handle.result(timeout=15)
    assert holders.peak == 2


async def test_concurrency_holds_when_runs_start_in_process_during_a_claim(manager_for: Any) -> None:
    """A claim in flight has counted its free slots: run() calls of this process that insert their runs
    already claimed meanwhile must not take those slots too (CI once saw concurrency 2 run 3 at once)."""
    holders = Holders()
    manager = await manager_for([holders.workflow], concurrency=2)
    backend, worker = manager.backend, manager.worker
    real_claim = backend.claim_runs
    in_claim, gate, claim_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        in_claim.set()
        await gate.wait()  # the claim has counted its slots; its query reaches the database later
        try:
            return await real_claim(*args, **kwargs)
        finally:
            claim_done.set()

    backend.claim_runs = slow_claim
    try:
        worker.wake()
        await asyncio.wait_for(in_claim.wait(), 15)
        handles = [await manager.run(holders.workflow) for _ in range(3)]
        gate.set()
        await asyncio.wait_for(claim_done.wait(), 15)
        statuses = [await h.status() for h in handles]
        assert statuses.count(RunStatus.RUNNING) == 2 and statuses.count(RunStatus.PENDING) == 1
        await wait_until(lambda: holders.running == 2, what="two runs to hold their slots")
    finally:
        gate.set()
        backend.claim_runs = real_claim
        holders.release.set()
    for handle in handles:
        await handle.result(timeout=15)
    assert holders.peak == 2


async def test_stop_lets_a_run_call_inserting_its_run_claimed_finish_first(manager_for: Any, make_config: Any) -> None:
    @workflow(version="1")
    async def quick() -> str:
        return "done"

    manager = await manager_for([quick])
    real_insert = manager.backend.create_claimed_run
    inserting = asyncio.Event()

    async def slow_insert(*args: Any, **kwargs: Any) -> Any:
        inserting.set()
        await asyncio.sleep(0.3)  # a pool wait, a busy file: stop() comes meanwhile
        return await real_insert(*args, **kwargs)

    manager.backend.create_claimed_run = slow_insert
    starting = asyncio.create_task(manager.run(quick))
    await asyncio.wait_for(inserting.wait(), 15)
    await manager.stop()
    # The insert landed before the connections closed; the run, handed back, completes once elsewhere.
    assert starting.done() and not starting.cancelled() and starting.exception() is None
    handle = starting.result()
    # A call after the stop is refused at once, not retried for 30 s against closed connections.
    with pytest.raises(BackendClosed, match="the manager was stopped"):
        await manager.run(quick)
    async with WorkflowManager(make_config(), workflows=[quick]) as other:
        assert await other.handle(handle.id).result(timeout=15) == "done"
        assert (await other.get_run(handle.id)).attempts == 0


async def test_stop_does_not_wait_out_a_claim_stuck_waiting_for_the_database(manager_for: Any) -> None:
    """A claim waiting for a connection the database does not give (an outage: the pool waits 30 s) is cut
    short at stop(), which keeps to its grace; stop() waited for the claim's whole wait."""
    manager = await manager_for([], shutdown_grace_ms=500)
    in_claim, never = asyncio.Event(), asyncio.Event()

    async def stuck_claim(*args: Any, **kwargs: Any) -> Any:
        in_claim.set()
        await never.wait()

    manager.backend.claim_runs = stuck_claim
    manager.worker.wake()
    await asyncio.wait_for(in_claim.wait(), 15)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(manager.stop(), 30)
    assert loop.time() - began < 10, f"stop() took {loop.time() - began:.1f}s"


async def test_start_at_delays_the_first_claim(manager_for: Any) -> None:
    @workflow(version="1")
    async def later() -> str:
        return "on time"

    manager = await manager_for([later])
    handle = await manager.run(later, start_at="1s")
    await asyncio.sleep(0.3)  # well inside the delay: must not have started
    assert await handle.status() is RunStatus.PENDING
    assert await handle.result(timeout=15) == "on time"
    run = await handle.info()
    assert run.started_at is not None and run.started_at - run.created_at >= timedelta(seconds=0.9)


async def test_deadline_fails_a_run_instead_of_starting_it_late(manager_for: Any) -> None:
    @workflow(version="1")
    async def too_late() -> str:
        return "ran"

    web = await manager_for([], enable_worker=False)
    handle = await web.run({"name": "too_late", "version": "1"}, deadline=timedelta(milliseconds=200))
    await asyncio.sleep(0.4)  # the deadline passes before any worker exists
    await manager_for([too_late])
    with pytest.raises(WorkflowFailed, match="deadline exceeded"):
        await handle.result(timeout=15)


async def test_a_start_not_before_the_deadline_is_refused_at_run_naming_both(manager_for: Any) -> None:
    web = await manager_for([], enable_worker=False)
    spec = {"name": "too_late", "version": "1"}
    in_an_hour = datetime.now(UTC) + timedelta(hours=1)
    for start_at, deadline in (("5s", "1s"), (in_an_hour, in_an_hour - timedelta(minutes=1)), (in_an_hour, "10m")):
        with pytest.raises(InvalidValue, match=r"start_at \(.+\) is not before deadline \(.+\)") as refused:
            await web.run(spec, start_at=start_at, deadline=deadline)
        assert refused.value.field == "start_at"
    assert (await web.list_runs()).items == []  # nothing stored
    await web.run(spec, start_at="1s", deadline="1h")  # a start before the deadline is fine


async def test_result_timeout_leaves_the_run_going(manager_for: Any) -> None:
    gate = asyncio.Event()

    @workflow(version="1")
    async def slow(step: Any) -> str:
        await step.define("wait", gate.wait).run()
        return "finished"

    manager = await manager_for([slow])
    handle = await manager.run(slow)
    with pytest.raises(ResultTimeout, match="it goes on"):
        await handle.result(timeout=0.2)
    gate.set()
    assert await handle.result(timeout=15) == "finished"


async def test_definition_run_uses_the_active_manager(manager_for: Any) -> None:
    @workflow(version="1")
    async def shortcut(input: Any) -> Any:
        return input * 2

    await manager_for([shortcut])
    assert await (await shortcut.run(21)).result(timeout=15) == 42


async def test_many_managers_migrating_at_once_agree(make_config: Any) -> None:
    managers = [WorkflowManager(make_config(enable_worker=False)) for _ in range(4)]
    await asyncio.gather(*(m.start() for m in managers))
    try:
        for manager in managers:
            assert manager.backend is not None
        handle = await managers[0].run({"name": "x", "version": "1"})
        assert (await managers[3].handle(handle.id).info()).status is RunStatus.PENDING
    finally:
        await asyncio.gather(*(m.stop() for m in managers))


async def test_a_stale_lease_cannot_write_checkpoints_or_the_outcome(manager_for: Any) -> None:
    """Fencing at the storage seam: once another worker re-claims, the old token writes nothing."""
    manager = await manager_for([], enable_worker=False)
    backend = manager.backend
    run_id, _ = await backend.create_run(NewRun(new_run_id(), "fenced", "1", "null"))
    (old,) = await backend.claim_runs("worker-a", [("fenced", "1")], 1, timedelta(milliseconds=100))
    await asyncio.sleep(0.2)  # the lease expires
    (new,) = await backend.claim_runs("worker-b", [("fenced", "1")], 1, timedelta(seconds=30))
    assert new.id == run_id and new.recoveries == 1 and new.lease_token != old.lease_token
    now = datetime.now(UTC)
    with pytest.raises(LeaseLost):
        await backend.save_step(run_id, old.lease_token, "s", '"stale"', now, now)
    with pytest.raises(LeaseLost):
        await backend.complete_run(run_id, old.lease_token, '"stale"')
    with pytest.raises(LeaseLost):
        await backend.fail_attempt(run_id, old.lease_token, {"type": "X", "message": "stale"}, None, None)
    with pytest.raises(LeaseLost):
        await backend.park_run(run_id, old.lease_token, [TimedWait("nap", "sleep", now, timedelta(seconds=1))], [])
    with pytest.raises(LeaseLost):
        await backend.start_children(run_id, old.lease_token, "kid", now, "{}", [])
    assert await backend.heartbeat("worker-a", [(run_id, old.lease_token)], timedelta(seconds=1)) == {}
    await backend.save_step(run_id, new.lease_token, "s", '"fresh"', now, now)
    await backend.complete_run(run_id, new.lease_token, '"done"')
    run = await backend.get_run(run_id, with_steps=True)
    assert run is not None and run.status is RunStatus.COMPLETED and run.output == "done"
    assert run.steps[0].output == "fresh"


async def test_a_notified_new_run_is_taken_by_its_id_only_where_a_claim_would_take_it(manager_for: Any) -> None:
    """take_run, what a worker with a free slot does on the notification of one new run: the same run a claim
    would take, leased and fenced the same way, and nothing that only a claim may weigh."""
    manager = await manager_for([], enable_worker=False)
    backend = manager.backend
    lease = timedelta(seconds=30)
    mine = [("taken", "1")]
    run_id, _ = await backend.create_run(NewRun(new_run_id(), "taken", "1", '"x"'))
    # Not this worker's: another workflow, another version, a queue it does not serve
    assert await backend.take_run("worker-a", run_id, [("other", "1")], lease) is None
    assert await backend.take_run("worker-a", run_id, [("taken", "2")], lease) is None
    assert await backend.take_run("worker-a", run_id, mine, lease, queues=["elsewhere"]) is None
    taken = await backend.take_run("worker-a", run_id, [("other", "1"), *mine], lease)
    assert taken is not None and (taken.id, taken.input, taken.attempts) == (run_id, "x", 0)
    assert taken.first_claim and not taken.taken_over
    # Taken once: neither another worker's take nor a claim finds it
    assert await backend.take_run("worker-b", run_id, mine, lease) is None
    assert await backend.claim_runs("worker-b", mine, 10, lease) == []
    stored = await backend.get_run(run_id)
    assert stored is not None and stored.status is RunStatus.RUNNING and stored.started_at is not None
    # Only a claim takes a run not due yet, or one of a queue with limits (weighed against them)
    later, _ = await backend.create_run(NewRun(new_run_id(), "taken", "1", "null", start_delay=timedelta(hours=1)))
    assert await backend.take_run("worker-a", later, mine, lease) is None
    await backend.register_queues([Queue("limited", concurrency=1)], [])
    limited, _ = await backend.create_run(NewRun(new_run_id(), "taken", "1", "null", queue="limited"))
    assert await backend.take_run("worker-a", limited, mine, lease, queues=["limited"]) is None
    assert [run.id for run in await backend.claim_runs("worker-a", mine, 10, lease, queues=["limited"])] == [limited]
    # The lease fences as a claim's does
    with pytest.raises(LeaseLost):
        await backend.complete_run(run_id, "00000000-0000-4000-8000-000000000000", '"stale"')
    await backend.complete_run(run_id, taken.lease_token, '"done"')
    stored = await backend.get_run(run_id)
    assert stored is not None and stored.status is RunStatus.COMPLETED and stored.output == "done"


async def _status_is(handle: Any, status: RunStatus) -> bool:
    return bool(await handle.status() is status)


async def test_synchronous_code_starts_a_run_and_waits_for_its_result(manager_for: Any, make_config: Any) -> None:
    @workflow(version="1")
    async def from_a_view(input: Any) -> Any:
        if input == "boom":
            raise NonRetryableError("refused")
        return {"ok": input}

    from sonamu_tasks import SyncClient

    await manager_for([from_a_view])  # the worker fleet

    def view() -> tuple[Any, str]:
        with SyncClient(make_config()) as client:  # what a Flask/Django process holds
            ok = client.run({"name": "from_a_view", "version": "1"}, 5).result(timeout=15)
            failing = client.run({"name": "from_a_view", "version": "1"}, "boom")
            with pytest.raises(WorkflowFailed, match="refused"):
                failing.result(timeout=15)
            later = client.run({"name": "nobody_serves_this", "version": "1"}, None, start_at="1h")
            steering = [later.pause(), later.resume(), later.cancel(), later.retry(), later.cancel()]
            return ok, failing.status().value, [status.value for status in steering]

    statuses = ["paused", "pending", "canceled", "pending", "canceled"]
    assert await asyncio.to_thread(view) == ({"ok": 5}, "failed", statuses)


async def test_lines_logged_between_steps_are_not_repeated_by_replays(manager_for: Any, caplog: Any) -> None:
    calls = Calls()

    def flaky() -> None:
        if calls.hit("flaky") < 3:
            raise ConnectionError("again")

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def chatty(step: Any, logger: Any) -> None:
        await step.define("first", lambda: 1).run()
        logger.info("between the steps")
        await step.define("flaky", flaky).run()
        logger.info("after the flaky step")

    manager = await manager_for([chatty])
    with caplog.at_level("INFO", logger="sonamu_tasks.workflow"):
        await (await manager.run(chatty)).result(timeout=15)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("between the steps" in m for m in messages) == 1  # three attempts, logged once
    assert sum("after the flaky step" in m for m in messages) == 1


async def test_cancel_stops_a_pending_run_at_once(manager_for: Any) -> None:
    client = await manager_for([], enable_worker=False)
    handle = await client.run({"name": "nobody_runs_this", "version": "1"})
    assert await handle.cancel() is RunStatus.CANCELED
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=5)
    assert failure.value.status == "canceled"
    assert await handle.cancel() is RunStatus.CANCELED  # again: nothing changes


async def test_cancel_from_another_process_stops_a_running_run_at_its_next_step(manager_for: Any) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls = Calls()

    async def slow() -> str:
        calls.hit("slow")
        started.set()
        await release.wait()
        return "slow done"

    async def never() -> None:
        calls.hit("never")

    @workflow(version="1")
    async def cancellable(step: Any) -> None:
        await step.define("slow", slow).run()
        await step.define("never", never).run()

    worker = await manager_for([cancellable])
    client = await manager_for([], enable_worker=False)  # the request travels through the database
    handle = await client.run({"name": "cancellable", "version": "1"})
    await asyncio.wait_for(started.wait(), 15)
    assert await client.cancel(handle.id) is RunStatus.RUNNING  # asked; it is inside a step
    await wait_until(lambda: _request_reached(worker, handle.id), what="the worker to hear of the cancel")
    release.set()
    with pytest.raises(WorkflowFailed, match="canceled"):
        await handle.result(timeout=15)
    run = await handle.info(with_steps=True)
    assert run.status is RunStatus.CANCELED and [s.name for s in run.steps] == ["slow"]
    assert calls.counts == {"slow": 1}


async def test_pause_keeps_checkpoints_and_resume_continues(manager_for: Any) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls = Calls()

    async def first() -> None:
        calls.hit("first")
        started.set()
        await release.wait()

    async def second() -> str:
        calls.hit("second")
        return "finished"

    @workflow(version="1")
    async def pausable(step: Any) -> str:
        await step.define("first", first).run()
        return str(await step.define("second", second).run())

    manager = await manager_for([pausable])
    handle = await manager.run(pausable)
    await asyncio.wait_for(started.wait(), 15)
    await handle.pause()
    release.set()
    await wait_until(lambda: _status_is(handle, RunStatus.PAUSED), what="the pause at the step boundary")
    assert calls.counts == {"first": 1}
    await asyncio.sleep(0.3)  # paused: nothing claims it
    assert await handle.status() is RunStatus.PAUSED
    assert await handle.resume() is RunStatus.PENDING
    assert await handle.result(timeout=1.5) == "finished"  # at once: not after the old lease's expiry (2 s)
    assert calls.counts == {"first": 1, "second": 1}


async def test_a_paused_sleeper_keeps_its_wake_time(manager_for: Any) -> None:
    @workflow(version="1")
    async def dozer(step: Any) -> str:
        await step.sleep("doze", "1500ms")
        return "awake"

    manager = await manager_for([dozer])
    handle = await manager.run(dozer)
    await wait_until(lambda: _status_is(handle, RunStatus.SLEEPING), what="the sleep")
    assert await handle.pause() is RunStatus.PAUSED
    assert await handle.resume() is RunStatus.PENDING  # claimable again at its own wake time, not before
    assert await handle.status() is RunStatus.PENDING
    assert await handle.result(timeout=15) == "awake"
    run = await handle.info()
    assert run.finished_at is not None and run.started_at is not None
    assert run.finished_at - run.created_at >= timedelta(seconds=1.4)


async def test_retry_restarts_a_failed_run_from_its_failed_step(manager_for: Any) -> None:
    calls = Calls()
    broken = True

    def prepare() -> str:
        calls.hit("prepare")
        return "prepared"

    def deliver(value: str) -> str:
        calls.hit("deliver")
        if broken:
            raise ConnectionError("courier down")
        return value + " and delivered"

    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=10))
    async def delivery(step: Any) -> str:
        value = await step.define("prepare", prepare).run()
        return str(await step.define("deliver", deliver).run(value))

    manager = await manager_for([delivery])
    handle = await manager.run(delivery)
    with pytest.raises(WorkflowFailed, match="courier down"):
        await handle.result(timeout=15)
    broken = False
    assert await handle.retry() is RunStatus.PENDING
    assert await handle.result(timeout=15) == "prepared and delivered"
    assert calls.counts == {"prepare": 1, "deliver": 3}
    assert (await handle.info()).attempts == 0


async def test_workers_are_listed_with_their_workflows_queues_and_slots_in_use(manager_for: Any) -> None:
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    @workflow(version="3")
    async def listed(step: Any) -> None:
        await step.define("held", held).run()

    @workflow(version="1", queue="emails")
    async def mailed() -> None: ...

    manager = await manager_for([listed, mailed])
    workers = await manager.list_workers()
    assert [(w.workflows, w.queues) for w in workers] == [([("listed", "3"), ("mailed", "1")], ["default", "emails"])]
    assert manager.worker is not None and workers[0].id == manager.worker.id
    assert (workers[0].running, workers[0].concurrency) == (0, 4)
    handles = [await manager.run(listed) for _ in range(2)]
    await wait_until(lambda: _running_here(manager, 2), what="two runs in the worker's slots")
    gate.set()
    for handle in handles:
        await handle.result(timeout=15)
    assert [w.running for w in await manager.list_workers()] == [0]
    # chosen queues are recorded as chosen, in the order given
    chosen = await manager_for([listed], queues=["emails", "default"])
    assert chosen.worker is not None
    (record,) = [w for w in await manager.list_workers() if w.id == chosen.worker.id]
    assert record.queues == ["emails", "default"]


async def _running_here(manager: WorkflowManager, count: int) -> bool:
    return [w.running for w in await manager.list_workers()] == [count]


async def _request_reached(manager: WorkflowManager, run_id: str) -> bool:
    worker = manager.worker
    return worker is not None and any(
        attempt.claimed.id == run_id and attempt._stop_requested for _, attempt in worker._active.values()
    )


async def test_an_id_no_run_can_have_is_run_not_found_everywhere(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)
    bad = "not-a-uuid"
    calls = {
        "get_run": lambda: manager.get_run(bad),
        "cancel": lambda: manager.cancel(bad),
        "pause": lambda: manager.pause(bad),
        "resume": lambda: manager.resume(bad),
        "retry": lambda: manager.retry(bad),
        "fork": lambda: manager.fork(bad, "a-step"),
        "send": lambda: manager.send(bad, "hi"),
        "get_event": lambda: manager.get_event(bad, "progress", timeout=1),
        "list_messages": lambda: manager.list_messages(bad),
        "list_events": lambda: manager.list_events(bad),
        "count_children": lambda: manager.count_children(bad),
        "wait_for_result": lambda: manager.wait_for_result(bad, timeout=1),
        "wait_until_finished": lambda: manager.wait_until_finished(bad, timeout=1),
        "handle.result": lambda: manager.handle(bad).result(timeout=1),
        "handle.status": lambda: manager.handle(bad).status(),
    }
    for name, call in calls.items():
        try:
            await call()
        except RunNotFound as error:
            assert "no run with id 'not-a-uuid'" in str(error), name
        else:
            pytest.fail(f"{name} raised nothing")


async def test_a_run_id_in_capitals_finds_the_run_on_every_backend(manager_for: Any) -> None:
    client = await manager_for([], enable_worker=False)
    handle = await client.run({"name": "nobody_runs_this", "version": "1"})
    assert (await client.get_run(handle.id.upper())).id == handle.id
    assert await client.send(handle.id.upper(), "hi") is True
    assert [m.payload for m in await client.list_messages(handle.id)] == ["hi"]
    assert await client.cancel(handle.id.upper()) is RunStatus.CANCELED


async def test_a_list_with_a_value_limit_cuts_a_huge_input_in_the_database(manager_for: Any) -> None:
    """With `value_limit` a listed run's long input comes as an excerpt of that many characters and its length,
    cut by the database (the whole input is not sent over), as `get_run`'s capped read; shorter ones come
    whole, and without `value_limit` everything does."""
    manager = await manager_for(enable_worker=False)
    spec = {"name": "listed", "version": "1"}
    huge = await manager.run(spec, {"blob": "y" * 300_000})
    small = await manager.run(spec, {"n": 1})

    capped = {run.id: run for run in (await manager.list_runs(workflow="listed", value_limit=1000)).items}
    cut = capped[huge.id].input
    assert isinstance(cut, CutValue) and len(cut.excerpt) == 1000 and cut.length > 300_000
    assert cut.excerpt.startswith('{"blob"') and set(cut.excerpt[-100:]) == {"y"}
    assert capped[small.id].input == {"n": 1} and capped[huge.id].output is None  # short ones come whole

    # 0: a list that shows no value reads none; each is only said to be there (not even measured).
    nothing = (await manager.list_runs(workflow="listed", value_limit=0)).items
    assert [(run.id, run.input, run.output) for run in nothing] == [
        (small.id, CutValue("", None), None),
        (huge.id, CutValue("", None), None),
    ]
    assert (await manager.get_run(huge.id, value_limit=0)).input == CutValue("", None)

    whole = {run.id: run for run in (await manager.list_runs(workflow="listed")).items}
    assert whole[huge.id].input == {"blob": "y" * 300_000}
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(InvalidValue, match="value_limit"):
            await manager.list_runs(value_limit=bad)
