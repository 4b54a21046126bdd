"""The example's workflow: an order reserves its stock, waits for the payment provider's webhook (a message
on topic "payment"), then charges; without a payment within 15 minutes it releases the stock."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from sonamu_tasks import workflow

PAYMENT_TOPIC = "payment"


class Order(BaseModel):
    item: str = Field(min_length=1, max_length=100)
    quantity: int = Field(gt=0, le=100)
    email: str = Field(min_length=3, max_length=200)


class Payment(BaseModel):
    transaction: str = Field(min_length=1, max_length=100)
    amount: float = Field(gt=0)


def reserve_stock(item: str, quantity: int) -> str:
    """A sync step: it runs in the worker's thread pool, so a blocking inventory client is fine here."""
    return f"reservation-{item}-{quantity}"


async def charge(reservation: str, payment: dict[str, Any]) -> str:
    return f"receipt-{payment['transaction']}"


async def release_stock(reservation: str) -> str:
    return f"released {reservation}"


@workflow(version="1", schema=Order)
async def place_order(input: Order, step: Any, logger: Any) -> dict[str, Any]:
    reservation = await step.define("reserve-stock", reserve_stock).run(input.item, input.quantity)
    await step.set_event("state", {"waiting_for": "payment", "reservation": reservation})
    payment = await step.receive("wait-for-payment", topic=PAYMENT_TOPIC, timeout="15m")  # no slot held
    if payment is None:
        released = await step.define("release-stock", release_stock).run(reservation)
        return {"status": "expired", "detail": released}
    receipt = await step.define("charge", charge).run(reservation, payment)
    logger.info("order of %d %s paid: %s", input.quantity, input.item, receipt)
    await step.set_event("state", {"paid": receipt})
    return {"status": "paid", "receipt": receipt, "reservation": reservation}
