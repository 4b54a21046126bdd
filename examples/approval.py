"""A human approval: the workflow waits for a message, durably, without holding a worker.

    python examples/approval.py

An expense report above the limit asks a manager. The run publishes its state with `step.set_event` (a
web page would show it with `handle.get_event`), waits for the "approval" message with a week's timeout, and
pays or refuses. Here the "manager" is a few lines of code that read the published state and send the
decision; in an application it is a web request calling `manager.send` (or `SyncClient.send` in a Flask or
Django view), from any process, hours or days later. Runs on the embedded SQLite default; set
SONAMU_TASKS_DATABASE_URL=postgresql://... for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sonamu_tasks import WorkflowManager, define_config, workflow

LIMIT = 500


async def pay(report: dict[str, Any]) -> str:
    return f"paid {report['amount']:.2f} to {report['employee']}"


async def notify_refusal(report: dict[str, Any], reason: str) -> str:
    return f"told {report['employee']}: refused ({reason})"


@workflow(version="1")
async def expense_report(input: dict[str, Any], step: Any) -> dict[str, Any]:
    if input["amount"] <= LIMIT:
        return {"outcome": await step.define("pay", pay).run(input)}
    await step.set_event("state", {"waiting_for": "manager approval", "amount": input["amount"]})
    decision = await step.receive("manager-decision", topic="approval", timeout="7d")  # None after a week
    if decision is None:
        outcome = await step.define("refuse", notify_refusal).run(input, "no answer within a week")
    elif decision["approved"]:
        outcome = await step.define("pay", pay).run(input)
    else:
        outcome = await step.define("refuse", notify_refusal).run(input, decision.get("reason", "no reason"))
    await step.set_event("state", {"done": outcome})
    return {"outcome": outcome, "decided_by": decision and decision.get("by")}


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s")
    config = define_config(tasks={"worker_options": {"concurrency": 2}})
    async with WorkflowManager(config, workflows=[expense_report]) as manager:
        handle = await manager.run(expense_report, {"employee": "kim", "amount": 820.0})
        state = await handle.get_event("state", timeout=30)  # what a web page would show
        for _ in range(100):  # it parks right after publishing its state
            if await handle.status() == "waiting":
                break
            await asyncio.sleep(0.05)
        print(f"run {handle.id}: {state}; its status is {await handle.status()} (no worker slot held)")
        # The manager clicks "approve". The idempotency key makes a double click one message.
        decision = {"approved": True, "by": "lee"}
        for _ in range(2):
            await manager.send(handle.id, decision, topic="approval", idempotency_key=f"approve-{handle.id}")
        print(f"result: {await handle.result(timeout=30)}")


if __name__ == "__main__":
    asyncio.run(main())
