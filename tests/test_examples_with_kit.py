"""The examples' workflows, tested with the testing kit as an application's own tests would be: a retry with
backoff and a durable sleep, a week-long approval timeout, and cron schedules, each in milliseconds."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

from sonamu_tasks import RunStatus
from sonamu_tasks.testing import WorkflowTestEnv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def shop() -> Iterator[Path]:
    root = EXAMPLES / "shop"
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name == "app" or name.startswith("app.")]:
            del sys.modules[name]


async def test_quickstart_checkout_retries_the_card_and_sleeps_on_the_test_clock() -> None:
    quickstart = load(EXAMPLES / "quickstart.py")
    began = time.monotonic()
    async with WorkflowTestEnv(workflows=[quickstart.checkout]) as env:
        handle = await env.run(quickstart.checkout, {"order_id": 42})
        result = await handle.result()
        run = await handle.info(with_steps=True)
    assert result["payment"]["charged"] == 10.5 and result["message"].startswith("receipt R-")
    assert run.status is RunStatus.COMPLETED and run.attempts == 1  # the card failed once, then was retried
    assert time.monotonic() - began < 5


async def test_an_expense_report_nobody_answers_is_refused_after_a_week() -> None:
    approval = load(EXAMPLES / "approval.py")
    async with WorkflowTestEnv(workflows=[approval.expense_report]) as env:
        handle = await env.run(approval.expense_report, {"employee": "kim", "amount": 820.0})
        assert await handle.get_event("state", timeout=5) == {"waiting_for": "manager approval", "amount": 820.0}
        await env.advance("6d")
        assert await handle.status() is RunStatus.WAITING
        await env.advance("1d")
        assert await handle.result() == {"outcome": "told kim: refused (no answer within a week)", "decided_by": None}


async def test_an_expense_report_the_manager_refuses() -> None:
    approval = load(EXAMPLES / "approval.py")
    async with WorkflowTestEnv(workflows=[approval.expense_report]) as env:
        # A guard, meant never to stand in: optional, else the environment's exit reports it unused.
        env.mock_step("pay", side_effect=AssertionError("a refused report must not be paid"), optional=True)
        handle = await env.run(approval.expense_report, {"employee": "kim", "amount": 820.0})
        await env.until_idle()
        await env.send(handle.id, {"approved": False, "reason": "no receipt", "by": "lee"}, topic="approval")
        assert await handle.result() == {"outcome": "told kim: refused (no receipt)", "decided_by": "lee"}


async def test_the_shops_daily_report_fires_at_nine_seoul_time(shop: Path) -> None:
    from app.application.reports.reports_workflow import daily_report  # type: ignore[import-not-found]

    start = datetime(2030, 3, 1, 23, 59, 55, tzinfo=UTC)  # 08:59:55 in Seoul
    async with WorkflowTestEnv(workflows=[daily_report], start=start, timezone="Asia/Seoul") as env:
        await env.advance("16s")  # to 09:00:11
        runs = (await env.manager.list_runs(workflow="daily_report")).items
    heartbeats = sorted(run.created_at.isoformat() for run in runs if run.input["date"] == "heartbeat")
    daily = [run.created_at.isoformat() for run in runs if run.input["date"] != "heartbeat"]
    assert heartbeats == ["2030-03-02T00:00:00+00:00", "2030-03-02T00:00:10+00:00"]  # every 10 seconds
    assert daily == ["2030-03-02T00:00:00+00:00"]  # 09:00 in Seoul, once
    assert all(run.status is RunStatus.COMPLETED for run in runs)
