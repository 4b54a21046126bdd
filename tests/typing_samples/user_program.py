"""A user's program written against the public API: `mypy --strict` must accept it as it is, and infer the
types `assert_type` states (tests/test_typing.py). Async and sync steps, step.map, handles, SyncClient, the
testing kit."""

from __future__ import annotations

import functools
from typing import Any, assert_type

from sonamu_tasks import (
    ChildHandle,
    RetryPolicy,
    RunHandle,
    Step,
    StepWrapper,
    SyncClient,
    SyncRunHandle,
    WorkflowManager,
    define_config,
    workflow,
)
from sonamu_tasks.testing import WorkflowTestEnv


async def load_order(order_id: int) -> dict[str, int]:
    return {"id": order_id, "total": 30}


def price(order: dict[str, int], *, discount: int = 0) -> int:
    return order["total"] - discount


async def charge(amount: int) -> str:
    return f"receipt for {amount}"


def tax(amount: int) -> float:
    return amount * 0.2


class Ledger:
    async def record(self, receipt: str) -> bool:
        return True


@workflow(version="1")
async def send_invoice(input: dict[str, int], step: StepWrapper) -> dict[str, Any]:
    order = await step.define("load-order", load_order).run(input["order_id"])  # an async step
    assert_type(order, dict[str, int])
    amount = await step.define("price", price, timeout="1m").run(order, discount=2)  # a sync step
    assert_type(amount, int)
    again: Step[[int], dict[str, int]] = step.define("load-again", load_order)
    assert_type(await again.run(7), dict[str, int])
    receipts = await step.map("charge", charge, [amount, amount])  # an async function per item
    assert_type(receipts, list[str])
    taxes = await step.map("tax", tax, range(3), concurrency=2)  # a sync function per item
    assert_type(taxes, list[float])
    retry = RetryPolicy(max_attempts=3)
    recorded = await step.define("record", Ledger().record, retry_policy=retry).run(receipts[0])
    assert_type(recorded, bool)
    bonus = await step.define("bonus", functools.partial(charge, 5)).run()
    assert_type(bonus, str)
    return {"receipts": receipts, "taxes": sum(taxes), "recorded": recorded, "bonus": bonus}


@workflow(version="1")
async def invoice_total(input: int, step: StepWrapper) -> int:
    child = await step.start_workflow("invoice", send_invoice, {"order_id": input})  # a handle of its output
    assert_type(child, ChildHandle[dict[str, Any]])
    children = await step.start_workflows("more", send_invoice, [{"order_id": 1}])
    assert_type(await children[0].result(), dict[str, Any])
    output = await step.run_workflow("again", send_invoice, {"order_id": input})
    assert_type(output, dict[str, Any])
    by_name = await step.start_workflow("by-name", {"name": "send_invoice", "version": "1"})
    assert_type(await by_name.result(), Any)
    return len((await child.result())["receipts"]) + len(output)


async def start(manager: WorkflowManager) -> int:
    handle = await manager.run(send_invoice, {"order_id": 7}, idempotency_key="order-7", priority=1)
    assert_type(handle, RunHandle[dict[str, Any]])  # result() gives what the workflow returns
    handles: list[RunHandle] = await manager.run_many(send_invoice, [{"order_id": 1}], idempotency_keys=["a"])
    typed_handles = await manager.run_many(send_invoice, [{"order_id": 1}])
    assert_type(typed_handles, list[RunHandle[dict[str, Any]]])
    later = await send_invoice.run({"order_id": 8}, start_at="5m", deadline="1h")
    assert_type(later, RunHandle[dict[str, Any]])
    by_name = await manager.run("send_invoice", {"order_id": 9})  # by name: the output is JSON, typed Any
    assert_type(by_name, RunHandle[Any])
    assert_type(manager.handle(by_name.id), RunHandle[Any])
    output = await handle.result(timeout=30)
    assert_type(output, dict[str, Any])
    return len(handles) + len(output["receipts"]) + int(later.created)


def from_a_view(database_url: str) -> Any:
    with SyncClient(define_config(database_url=database_url)) as client:
        handle = client.run(send_invoice, {"order_id": 7}, idempotency_key="order-7", start_at="5m")
        assert_type(handle, SyncRunHandle[dict[str, Any]])
        batch = client.run_many(send_invoice, [{"order_id": 1}, {"order_id": 2}], concurrency_keys=["a", "b"])
        assert_type(batch, list[SyncRunHandle[dict[str, Any]]])
        assert_type(client.run("send_invoice", 7), SyncRunHandle[Any])
        assert_type(handle.result(timeout=30), dict[str, Any])
        return handle.result(timeout=30)


async def in_a_test() -> None:
    async with WorkflowTestEnv(workflows=[send_invoice]) as env:
        handle = await env.run(send_invoice, {"order_id": 7}, queue="default")
        assert_type(await handle.result(), dict[str, Any])
        await env.send(handle.id, {"approved": True}, topic="approval")
        assert (await handle.result())["bonus"] == "receipt for 5"
