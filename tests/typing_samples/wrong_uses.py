"""Wrong uses of the public API: `mypy --strict` must report each line marked `# error: <code>`, and nothing
else (tests/test_typing.py)."""

from __future__ import annotations

from sonamu_tasks import StepWrapper, SyncClient, WorkflowManager, workflow
from sonamu_tasks.testing import WorkflowTestEnv


async def load_order(order_id: int) -> dict[str, int]:
    return {"id": order_id}


def price(order: dict[str, int]) -> int:
    return order["id"]


async def charge(amount: int) -> str:
    return str(amount)


@workflow(version="1")
async def send_invoice(input: int, step: StepWrapper) -> int:
    total: int = await step.define("load-order", load_order).run(input)  # error: assignment
    await step.define("load-again", load_order).run(str(input))  # error: arg-type
    await step.define("price", price).run({"id": 1}, discount=2)  # error: call-arg
    receipts: list[int] = await step.map("charge", charge, [1, 2])  # error: arg-type
    return receipts[0] + total


async def output_as_text(manager: WorkflowManager) -> str:
    return await (await manager.run(send_invoice, 7)).result()  # error: return-value


async def start(manager: WorkflowManager) -> None:
    await manager.run(send_invoice, 7, idempotency_kye="order-7")  # error: call-arg
    await send_invoice.run(7, priorty=1)  # error: call-arg
    async with WorkflowTestEnv(workflows=[send_invoice]) as env:
        await env.run(send_invoice, 7, dedline="1h")  # error: call-arg


def from_a_view(client: SyncClient) -> None:
    client.run(send_invoice, 7, idempotency_kye="order-7")  # error: call-arg
    client.run_many(send_invoice, [7, 8], idempotency_key="order-7")  # error: call-arg
