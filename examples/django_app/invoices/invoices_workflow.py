"""The example's workflow, found by the worker's syncer (SONAMU_TASKS["workflows"] = ["invoices"]).

It imports nothing from Django: the worker and the web process both load it, and it could run under a
plain `sonamu-tasks worker` as well.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from sonamu_tasks import RetryPolicy, workflow


class InvoiceRequest(BaseModel):
    order_id: int = Field(gt=0)
    email: str = Field(min_length=3, max_length=200)


def render_invoice(order_id: int) -> dict[str, Any]:
    """A sync step (runs in the worker's thread pool): render the PDF, say."""
    return {"number": f"INV-{order_id:06d}", "pages": 1}


def deliver_invoice(email: str, invoice: dict[str, Any]) -> str:
    return f"sent {invoice['number']} to {email}"


@workflow(version="1", schema=InvoiceRequest, retry_policy=RetryPolicy(max_attempts=5, initial_interval_ms=500))
async def send_invoice(input: InvoiceRequest, step: Any) -> dict[str, Any]:
    invoice = await step.define("render", render_invoice).run(input.order_id)
    delivery = await step.define("deliver", deliver_invoice).run(input.email, invoice)
    return {"invoice": invoice["number"], "delivery": delivery}
