"""A schedule whose workflow left the code stays stored, fired by nobody: `delete_schedule`, `sonamu-tasks
delete-schedule` and the dashboard's Delete remove it, and refuse a schedule live workers fire."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from sonamu_tasks import Schedule, ScheduleInUse, ScheduleNotFound, SyncClient, WorkflowManager, workflow
from sonamu_tasks.dashboard import Dashboard


@workflow(version="1", schedules=[Schedule("0 3 * * *", name="nightly-cleanup")])
async def cleanup(input: Any) -> str:
    return "clean"


@workflow(version="1", schedules=[Schedule("*/5 * * * *", name="every-5-minutes")])
async def poll(input: Any) -> str:
    return "polled"


async def leave_behind(make_config: Any) -> None:
    """A release whose code has `cleanup` stores its schedule and stops: the next release dropped the workflow."""
    async with WorkflowManager(make_config(), workflows=[cleanup]):
        pass


async def stored_names(manager: WorkflowManager) -> list[str]:
    return [record.name for record in await manager.list_schedules()]


async def test_a_schedule_whose_workflow_left_the_code_is_deleted_and_one_live_workers_fire_is_refused(
    make_config: Any,
) -> None:
    await leave_behind(make_config)
    async with WorkflowManager(make_config(), workflows=[poll]) as manager:
        assert await stored_names(manager) == ["every-5-minutes", "nightly-cleanup"]

        with pytest.raises(ScheduleInUse, match="workflow 'poll', which live workers register"):
            await manager.delete_schedule("every-5-minutes")
        with pytest.raises(ScheduleNotFound, match=r"'nightly'.*stored: 'every-5-minutes', 'nightly-cleanup'"):
            await manager.delete_schedule("nightly")

        deleted = await manager.delete_schedule("nightly-cleanup")
        assert (deleted.name, deleted.workflow_name, deleted.expression) == ("nightly-cleanup", "cleanup", "0 3 * * *")
        assert await stored_names(manager) == ["every-5-minutes"]
        with pytest.raises(ScheduleNotFound):
            await manager.delete_schedule("nightly-cleanup")


def sonamu_tasks(tmp_path: Path, make_config: Any, *args: str) -> subprocess.CompletedProcess[str]:
    config = make_config(enable_worker=False)
    settings = f"database_url={config.database_url!r}, schema={config.schema!r}"
    (tmp_path / "sonamu_config.py").write_text(
        f"from sonamu_tasks import define_config\nconfig = define_config({settings})\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("SONAMU_TASKS_")}
    return subprocess.run(
        [sys.executable, "-m", "sonamu_tasks", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


async def test_the_cli_deletes_schedules_fired_by_nobody_and_deletes_none_when_one_name_is_refused(
    make_config: Any, tmp_path: Path
) -> None:
    await leave_behind(make_config)
    async with WorkflowManager(make_config(), workflows=[poll]) as manager:
        listed = sonamu_tasks(tmp_path, make_config, "schedules")
        assert "sonamu-tasks delete-schedule NAME" in listed.stdout

        refused = sonamu_tasks(tmp_path, make_config, "delete-schedule", "nightly-cleanup", "every-5-minutes")
        assert refused.returncode == 1 and "'every-5-minutes' (poll)" in refused.stderr
        assert "nothing was deleted" in refused.stderr
        unknown = sonamu_tasks(tmp_path, make_config, "delete-schedule", "nightly-cleanup", "nightly")
        assert unknown.returncode == 1 and "no schedule named 'nightly' is stored" in unknown.stderr
        assert await stored_names(manager) == ["every-5-minutes", "nightly-cleanup"]

        done = sonamu_tasks(tmp_path, make_config, "delete-schedule", "nightly-cleanup")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "deleted schedule nightly-cleanup (cleanup, 0 3 * * *)"
        assert await stored_names(manager) == ["every-5-minutes"]


async def test_the_dashboard_offers_delete_for_a_schedule_fired_by_nobody_only(make_config: Any) -> None:
    await leave_behind(make_config)
    async with WorkflowManager(make_config(), workflows=[poll]) as manager:
        app = Dashboard(make_config(enable_worker=False), port=8765)
        await app.manager.start()
        try:
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            origin = {"Origin": "http://127.0.0.1:8765"}  # a form of the dashboard's own page
            async with httpx.AsyncClient(transport=transport, base_url=origin["Origin"], headers=origin) as client:
                page = (await client.get("/schedules")).text
                assert page.count("class='delete-schedule'") == 1  # the row fired by nobody
                assert "value='nightly-cleanup'" in page and "value='every-5-minutes'" not in page

                refused = await client.post("/schedules/delete", data={"csrf": app.csrf, "name": "every-5-minutes"})
                assert refused.status_code == 400 and "live workers register" in refused.text
                forged = await client.post("/schedules/delete", data={"csrf": "guess", "name": "nightly-cleanup"})
                assert forged.status_code == 403

                deleted = await client.post("/schedules/delete", data={"csrf": app.csrf, "name": "nightly-cleanup"})
                assert (
                    deleted.status_code == 303 and deleted.headers["location"] == "/schedules?deleted=nightly-cleanup"
                )
                after = (await client.get(deleted.headers["location"])).text
                assert "Deleted schedule <code>nightly-cleanup</code>" in after
                assert "delete-schedule" not in after
        finally:
            await app.manager.stop()
        assert await stored_names(manager) == ["every-5-minutes"]


async def test_a_sync_client_deletes_a_schedule_as_the_manager_does(make_config: Any) -> None:
    await leave_behind(make_config)
    client = SyncClient(make_config(enable_worker=False))
    try:
        with pytest.raises(ScheduleNotFound):
            await asyncio.to_thread(client.delete_schedule, "nightly")
        deleted = await asyncio.to_thread(client.delete_schedule, "nightly-cleanup")
        assert deleted.workflow_name == "cleanup"
        assert await asyncio.to_thread(client.list_schedules) == []
    finally:
        await asyncio.to_thread(client.close)


async def test_whether_live_workers_fire_a_schedule_is_judged_by_the_databases_clock(make_config: Any) -> None:
    """A client whose clock runs minutes ahead sees every worker's heartbeat as stale: the delete still asks the
    database, by its own clock, and keeps a schedule a live worker declares."""
    async with WorkflowManager(make_config(), workflows=[poll]) as worker:
        ahead = WorkflowManager(
            make_config(enable_worker=False), clock=lambda: datetime.now(UTC) + timedelta(minutes=5)
        )
        async with ahead:
            with pytest.raises(ScheduleInUse):
                await ahead.delete_schedule("every-5-minutes")
        assert await stored_names(worker) == ["every-5-minutes"]
