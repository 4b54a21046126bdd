"""Input schemas are applied once, to the caller's value: the input is stored as given, validated at run()
(a bad one is refused, nothing stored) and again before each attempt. So an alias, a normalizing validator
and a callable that reshapes the input all see the caller's value, never their own output."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from sonamu_tasks import InvalidInput, RetryPolicy, WorkflowFailed, workflow

RETRY_ONCE = RetryPolicy(max_attempts=2, initial_interval_ms=20, backoff_coefficient=1)


class Order(pydantic.BaseModel):
    order_id: int = pydantic.Field(alias="orderId")


class Greeting(pydantic.BaseModel):
    name: str

    @pydantic.field_validator("name")
    @classmethod
    def exclaim(cls, value: str) -> str:
        return value + "!"


def to_cents(value: Any) -> dict[str, int]:
    """A callable schema that reshapes: {"amount": "12.50"} -> {"cents": 1250}."""
    return {"cents": round(float(value["amount"]) * 100)}


@workflow(version="1", schema=Order)
async def ship(input: Order) -> Any:
    assert isinstance(input, Order)
    return {"order_id": input.order_id}


@workflow(version="1", schema=Greeting, retry_policy=RETRY_ONCE)
async def greet(input: Greeting, context: Any) -> Any:
    if context["attempt"] == 1:
        raise RuntimeError("first attempt fails: the retry validates the stored input again")
    return input.name


@workflow(version="1", schema=to_cents)
async def charge(input: Any) -> Any:
    return input


async def test_a_model_with_an_alias_receives_the_aliased_field(manager_for: Any) -> None:
    manager = await manager_for([ship])
    handle = await manager.run(ship, {"orderId": 7})
    assert await handle.result(timeout=15) == {"order_id": 7}
    assert (await handle.info()).input == {"orderId": 7}  # stored as given


async def test_a_normalizing_validator_runs_once_per_attempt_not_on_its_own_output(manager_for: Any) -> None:
    manager = await manager_for([greet])
    handle = await manager.run(greet, {"name": "bob"})
    assert await handle.result(timeout=15) == "bob!"  # not "bob!!", on the retry either
    run = await handle.info()
    assert (run.input, run.attempts) == ({"name": "bob"}, 1)


async def test_a_callable_schema_that_reshapes_the_input_sees_the_callers_value(manager_for: Any) -> None:
    manager = await manager_for([charge])
    handle = await manager.run(charge, {"amount": "12.50"})
    assert await handle.result(timeout=15) == {"cents": 1250}
    with pytest.raises(InvalidInput, match="charge"):
        await manager.run(charge, {"amount": "a lot"})


async def test_a_model_instance_passed_as_input_is_stored_by_alias_and_validates_back(manager_for: Any) -> None:
    manager = await manager_for([ship])
    handle = await manager.run(ship, Order(orderId=9))
    assert await handle.result(timeout=15) == {"order_id": 9}
    assert (await handle.info()).input == {"orderId": 9}


async def test_a_bad_input_is_refused_at_run_and_nothing_is_stored(manager_for: Any) -> None:
    manager = await manager_for([ship])
    with pytest.raises(InvalidInput, match="orderId: Input should be a valid integer"):
        await manager.run(ship, {"orderId": "seven"})
    assert (await manager.list_runs()).items == []


async def test_a_child_with_a_bad_input_fails_its_parent_naming_which_child_and_starts_none(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=RetryPolicy(max_attempts=1))
    async def fan_out(input: Any, step: Any) -> Any:
        handles = await step.start_workflows("ships", ship, input)
        return [await handle.result() for handle in handles]

    manager = await manager_for([ship, fan_out])
    handle = await manager.run(fan_out, [{"orderId": 1}, {"orderId": "two"}])
    with pytest.raises(WorkflowFailed) as failed:
        await handle.result(timeout=15)
    message = failed.value.error["message"]
    assert "invalid input for workflow 'ship'" in message
    assert "child 'ships[1]' of workflow 'fan_out': orderId: Input should be a valid integer" in message
    assert (await manager.list_runs(parent_id=handle.id)).items == []  # one statement: no child started
