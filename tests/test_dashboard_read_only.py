"""A read-only dashboard (`Dashboard(config, read_only=True)`, `sonamu-tasks dashboard --read-only`) serves every
page with a role that may only read, shows no button or form that acts, and refuses every action's POST without
changing anything."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sonamu_tasks import NonRetryableError, RunStatus, Schedule, WorkflowManager, define_config, workflow
from sonamu_tasks.dashboard import Dashboard
from sonamu_tasks.testing.postgres_cluster import free_port

from .conftest import wait_until
from .support.dashboard import served
from .support.roles import grant_reading as grant_schema_reading
from .support.roles import reader_role

FORM_HEADERS = {"Origin": "http://127.0.0.1:8765"}
BUTTON = re.compile(r"<button[^>]*>([^<]*)</button>")


async def noop(value: Any) -> Any:
    return value


@workflow(version="1")
async def report(input: Any, step: Any) -> str:
    text = await step.define("write", noop).run(f"report {input}")
    await step.set_event("progress", {"done": 1})
    return str(text)


@workflow(version="1")
async def approval(step: Any) -> Any:
    await step.define("ask", noop).run("asked")
    return await step.receive("answer", topic="approval", timeout="1h")


def refuse() -> None:
    raise NonRetryableError("the warehouse is closed")


@workflow(version="1")
async def shipment(step: Any) -> None:
    await step.define("ship", refuse).run()


@workflow(version="1", schedules=[Schedule("0 18 * * *", name="evening")])
async def gone(input: Any) -> Any:
    return input


@pytest.fixture
def reading_url(backend_name: str, database_url: str, postgres_url: str) -> Iterator[str]:
    """The URL a read-only dashboard connects with: on PostgreSQL a role that may only read the test's schema
    (granted once the schema exists: `grant_reading`), on SQLite the test's file."""
    if backend_name == "sqlite":
        yield database_url
        return
    with reader_role(postgres_url) as url:
        yield url


def grant_reading(backend_name: str, postgres_url: str, schema: str, role_url: str) -> None:
    if backend_name != "sqlite":
        grant_schema_reading(postgres_url, schema, role_url)


async def fleet(manager_for: Any, make_config: Any) -> tuple[Any, dict[str, str]]:
    """A worker's manager, and runs in each state a page shows: completed, waiting for a message, failed; and a
    schedule no live worker fires (its workflow's worker stored it, then left)."""
    async with WorkflowManager(make_config(), workflows=[gone]):
        pass
    manager = await manager_for([report, approval, shipment])
    done = await manager.run(report, "march")
    assert await done.result(timeout=15) == "report march"
    waiting = await manager.run(approval)
    failed = await manager.run(shipment)
    await wait_until(lambda: _status_is(manager, waiting.id, RunStatus.WAITING), what="the run to wait")
    await wait_until(lambda: _status_is(manager, failed.id, RunStatus.FAILED), what="the run to fail")
    return manager, {"done": done.id, "waiting": waiting.id, "failed": failed.id}


def read_only_config(backend_name: str, reading_url: str, schema: str) -> Any:
    if backend_name not in ("postgres", "sqlite"):
        pytest.skip("a role's privileges are PostgreSQL's own, not PgBouncer's")
    return define_config(database_url=reading_url, schema=schema, tasks={"enable_worker": False})


def assert_offers_no_action(page: str) -> None:
    assert "method='post'" not in page and "/send'" not in page and "fork-form" not in page, page
    assert set(BUTTON.findall(page)) <= {"Filter"}, BUTTON.findall(page)  # the runs list's filter is a GET
    assert "#send-message" not in page


async def test_a_read_only_dashboard_serves_every_page_to_a_role_that_may_only_read(
    backend_name: str, manager_for: Any, make_config: Any, postgres_url: str, schema: str, reading_url: str
) -> None:
    config = read_only_config(backend_name, reading_url, schema)
    manager, runs = await fleet(manager_for, make_config)
    grant_reading(backend_name, postgres_url, schema, reading_url)
    worker_id = manager.worker.id

    async with served(Dashboard(config, port=8765, read_only=True)) as client:
        pages = {path: await client.get(path) for path in ("/", "/queues", "/workers", "/schedules")}
        for run_id in runs.values():
            pages[f"/runs/{run_id}"] = await client.get(f"/runs/{run_id}")
        for path, answer in pages.items():
            assert answer.status_code == 200, (path, answer.text)
            assert answer.text.count("id='read-only'") == 1, path  # said once, in the header
            assert_offers_no_action(answer.text)

        listed = pages["/"].text
        for name, run_id in runs.items():
            status = {"done": "completed", "waiting": "waiting", "failed": "failed"}[name]
            assert f"<tr data-run='{run_id}'>" in listed and f"class='status {status}'" in listed
        done = pages[f"/runs/{runs['done']}"].text
        assert "<pre>&quot;report march&quot;</pre>" in done and "<td>progress</td>" in done
        waiting = pages[f"/runs/{runs['waiting']}"].text
        assert "message on topic <code>approval</code>" in waiting
        assert "the warehouse is closed" in pages[f"/runs/{runs['failed']}"].text
        assert "<tr data-queue='default'>" in pages["/queues"].text
        assert worker_id in pages["/workers"].text
        assert "evening" in pages["/schedules"].text and "<strong>nobody</strong>" in pages["/schedules"].text
        # the live refresh's partial page has no button either
        partial = await client.get(f"/runs/{runs['waiting']}", headers={"X-Partial": "1"})
        assert partial.status_code == 200 and "id='run-status'" in partial.text
        assert_offers_no_action(partial.text)

        items = (await client.get("/api/runs")).json()["items"]
        assert {run["id"]: run["status"] for run in items} == {
            runs["done"]: "completed",
            runs["waiting"]: "waiting",
            runs["failed"]: "failed",
        }
        assert (await client.get(f"/api/runs/{runs['done']}")).json()["output"] == "report march"
        assert [queue["name"] for queue in (await client.get("/api/queues")).json()] == ["default"]
        assert (await client.get("/api/stranded")).json()["groups"] == []
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "sonamu_tasks_backlog" in metrics.text


async def test_a_read_only_dashboard_refuses_every_action_and_changes_nothing(
    backend_name: str, manager_for: Any, make_config: Any, postgres_url: str, schema: str, reading_url: str
) -> None:
    config = read_only_config(backend_name, reading_url, schema)
    manager, runs = await fleet(manager_for, make_config)
    grant_reading(backend_name, postgres_url, schema, reading_url)

    # A dashboard that may act offers its buttons on the same run.
    async with served(Dashboard(make_config(enable_worker=False), port=8765)) as client:
        acting = (await client.get(f"/runs/{runs['waiting']}")).text
        assert "id='cancel'" in acting and "id='read-only'" not in acting

    app = Dashboard(config, port=8765, read_only=True)
    async with served(app) as client:
        form = {"csrf": app.csrf}  # even with the right form token
        posts = [
            (f"/runs/{runs['waiting']}/cancel", form),
            (f"/runs/{runs['waiting']}/pause", form),
            (f"/runs/{runs['waiting']}/resume", form),
            (f"/runs/{runs['failed']}/retry", form),
            (f"/runs/{runs['waiting']}/send", {**form, "topic": "approval", "message": "true"}),
            (f"/runs/{runs['done']}/fork", {**form, "from_step": "write"}),
            ("/schedules/delete", {**form, "name": "evening"}),
        ]
        for path, data in posts:
            answer = await client.post(path, data=data, headers=FORM_HEADERS)
            assert answer.status_code == 405, (path, answer.status_code, answer.text)
            assert answer.headers["content-type"].startswith("text/plain")
            assert answer.text.startswith("this dashboard is read-only"), (path, answer.text)

    assert {name: (await manager.get_run(run_id)).status for name, run_id in runs.items()} == {
        "done": RunStatus.COMPLETED,
        "waiting": RunStatus.WAITING,
        "failed": RunStatus.FAILED,
    }
    waiting = await manager.get_run(runs["waiting"])
    assert waiting.requested_action is None
    assert (await manager.list_messages(runs["waiting"])) == []
    assert len((await manager.list_runs()).items) == 3  # no fork
    assert [s.name for s in await manager.list_schedules()] == ["evening"]


async def test_the_command_serves_a_read_only_dashboard(
    backend_name: str,
    manager_for: Any,
    make_config: Any,
    postgres_url: str,
    schema: str,
    reading_url: str,
    tmp_path: Path,
) -> None:
    """`sonamu-tasks dashboard --read-only`, as an operator starts it, with the credentials that may only read."""
    read_only_config(backend_name, reading_url, schema)
    manager, runs = await fleet(manager_for, make_config)
    grant_reading(backend_name, postgres_url, schema, reading_url)
    settings = f"database_url={reading_url!r}" + ("" if backend_name == "sqlite" else f", schema={schema!r}")
    (tmp_path / "sonamu_config.py").write_text(
        f"from sonamu_tasks import define_config\nconfig = define_config({settings})\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("SONAMU_TASKS_")}
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sonamu_tasks", "dashboard", "--read-only", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:

            async def serving() -> bool:
                assert server.poll() is None, server.communicate()
                try:
                    return (await client.get("/")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(serving, timeout=30, what="the dashboard to serve")
            listed = (await client.get("/")).text
            assert f"<tr data-run='{runs['waiting']}'>" in listed and "id='read-only'" in listed
            page = (await client.get(f"/runs/{runs['waiting']}")).text
            assert "id='run-status' class='status waiting'" in page
            assert_offers_no_action(page)
            refused = await client.post(f"/runs/{runs['waiting']}/cancel", headers={"Origin": base})
            assert refused.status_code == 405 and "read-only" in refused.text
    finally:
        server.terminate()
        _, stderr = await asyncio.to_thread(server.communicate, timeout=30)
    assert f"dashboard: http://127.0.0.1:{port}/ (read-only)" in stderr
    assert "secret" not in stderr
    assert (await manager.get_run(runs["waiting"])).status is RunStatus.WAITING


async def _status_is(manager: Any, run_id: str, status: RunStatus) -> bool:
    return bool((await manager.get_run(run_id)).status is status)


def test_the_command_says_a_missing_schema_in_one_line_before_serving(
    backend_name: str, database_url: str, schema: str, tmp_path: Path
) -> None:
    """The schema is checked before the server starts: one Error line and exit 1, as the reading commands say it,
    not a traceback from the app's start-up."""
    settings = f"database_url={database_url!r}" + ("" if backend_name == "sqlite" else f", schema={schema!r}")
    (tmp_path / "sonamu_config.py").write_text(
        f"from sonamu_tasks import define_config\nconfig = define_config({settings})\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("SONAMU_TASKS_")}
    if backend_name == "sqlite":
        Path(database_url.removeprefix("sqlite:///")).touch()  # there, but not ours
    done = subprocess.run(
        [sys.executable, "-m", "sonamu_tasks", "dashboard", "--read-only", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert lines[0].startswith("config: ") and len(lines) == 2, lines  # what it connects to, then the one error
    assert lines[1].startswith("Error: ") and "has no sonamu-tasks tables" in lines[1], lines
