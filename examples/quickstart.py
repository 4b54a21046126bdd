"""A real workflow end to end on the embedded default (a SQLite file, no server to set up).

    python examples/quickstart.py

Three steps, one of them flaky (retried with backoff), and a durable sleep between them. Run it twice:
the second time, the idempotency key finds the run the first one finished and prints the same result.
Set SONAMU_TASKS_DATABASE_URL=postgresql://... to run the same thing on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from sonamu_tasks import RetryPolicy, WorkflowManager, define_config, workflow

attempts_seen = 0


async def fetch_order(order_id: int) -> dict[str, Any]:
    return {"id": order_id, "items": [{"sku": "tea", "price": 4.5}, {"sku": "cake", "price": 6.0}]}


def charge_card(order: dict[str, Any]) -> dict[str, Any]:
    """A sync step (it runs in a thread). It fails the first time, like a flaky payment provider."""
    global attempts_seen
    attempts_seen += 1
    if attempts_seen == 1:
        raise ConnectionError("payment provider timed out")
    total = sum(item["price"] for item in order["items"])
    return {"order": order["id"], "charged": total, "receipt": f"R-{random.randint(1000, 9999)}"}


async def send_receipt(payment: dict[str, Any]) -> str:
    return f"receipt {payment['receipt']} for {payment['charged']:.2f} sent"


@workflow(version="1", retry_policy=RetryPolicy(max_attempts=3, initial_interval_ms=200))
async def checkout(input: dict[str, Any], step: Any, logger: logging.LoggerAdapter[logging.Logger]) -> Any:
    order = await step.define("fetch-order", fetch_order).run(input["order_id"])
    payment = await step.define("charge-card", charge_card).run(order)
    logger.info("charged %.2f; cooling down before the receipt", payment["charged"])
    await step.sleep("cool-down", "1s")  # durable: survives a restart of every process
    message = await step.define("send-receipt", send_receipt).run(payment)
    return {"payment": payment, "message": message}


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s")
    config = define_config(tasks={"worker_options": {"concurrency": 2}})
    async with WorkflowManager(config, workflows=[checkout]) as manager:
        print(f"database: {config.resolved_database_url()}")
        handle = await manager.run(checkout, {"order_id": 42}, idempotency_key="quickstart-order-42")
        result = await handle.result(timeout=60)
        run = await handle.info(with_steps=True)
        print(f"\nrun {run.id}: {run.status} after {run.attempts} failed attempt(s)")
        for step in run.steps:
            print(f"  step {step.name:<13} {step.status:<10} attempts={step.attempts}")
        print(f"result: {result}")


if __name__ == "__main__":
    asyncio.run(main())
