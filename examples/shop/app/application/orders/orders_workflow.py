"""Orders: a workflow started on demand (`sonamu-tasks run confirm_order --input '{"order_id": 7}' --wait`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sonamu_tasks import RetryPolicy, workflow

from .orders_model import OrderModel


class ConfirmOrder(BaseModel):
    order_id: int


@workflow(version="1", schema=ConfirmOrder, retry_policy=RetryPolicy(max_attempts=3, initial_interval_ms=500))
async def confirmOrder(input: ConfirmOrder, step: Any, context: Any, logger: Any) -> dict[str, Any]:  # noqa: N802
    order = await step.get(OrderModel, "findOrder").run(input.order_id)  # step "find_order"
    total = await step.get(OrderModel, "total").run(order)
    await step.sleep("settle", "1s")
    logger.info("order %s confirmed: %s %s", input.order_id, total, context["currency"])
    return {"order_id": input.order_id, "total": total, "currency": context["currency"]}
