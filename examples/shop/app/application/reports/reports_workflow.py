"""Reports: a scheduled workflow. Every day at 09:00 Seoul time, and every 10 seconds for the demo."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sonamu_tasks import Schedule, workflow


def count_orders(date: str) -> int:
    return len(date)  # stands in for a query


@workflow(
    version="1",
    schedules=[
        Schedule("0 9 * * *", name="daily-report", input=lambda: {"date": datetime.now(UTC).date().isoformat()}),
        Schedule("*/10 * * * * *", input={"date": "heartbeat"}),
    ],
)
async def daily_report(input: dict[str, Any], step: Any) -> dict[str, Any]:
    orders = await step.define("count-orders", count_orders).run(input["date"])
    return {"date": input["date"], "orders": orders}
