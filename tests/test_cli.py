"""The `sonamu-tasks` command against the example application: migrate, worker, run, schedules, dev; and
`runs` and `show` on parents and their children."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from sonamu_tasks import Config, RunStatus, workflow
from sonamu_tasks.cli import main

from .conftest import wait_until

SHOP = Path(__file__).resolve().parents[1] / "examples" / "shop"
# The package of this interpreter, as `python -m`: the same command as the `sonamu-tasks` script, without
# depending on PATH or on which installed script it would find.
CLI = [sys.executable, "-m", "sonamu_tasks"]


@pytest.fixture
def app_env(backend_name: str, postgres_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for the CLI: a database of its own (the example config uses the default schema)."""
    if backend_name == "postgres":
        name = f"cli_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    else:
        url = f"sqlite:///{tmp_path / 'cli.db'}"
    yield {**os.environ, "SONAMU_TASKS_DATABASE_URL": url, "PYTHONUNBUFFERED": "1"}
    if backend_name == "postgres":
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cli(env: dict[str, str], *args: str, cwd: Path = SHOP, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


class Daemon:
    def __init__(self, env: dict[str, str], command: str, cwd: Path, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([*CLI, command], cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self._log.close()
        return code


def test_migrate_is_idempotent(app_env: dict[str, str]) -> None:
    first = cli(app_env, "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied: 0001_initial, 0002_schedules" in first.stdout
    again = cli(app_env, "migrate")
    assert again.returncode == 0 and "already up to date" in again.stdout


async def test_worker_runs_what_the_cli_starts_and_lists_schedules(app_env: dict[str, str], tmp_path: Path) -> None:
    worker = Daemon(app_env, "worker", SHOP, tmp_path / "worker.log")
    try:
        await wait_until(lambda: "workflows: confirm_order@1, daily_report@1" in worker.log(), what="worker start")
        done = cli(app_env, "run", "confirm_order", "--version", "1", "--input", '{"order_id": 7}', "--wait")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.split("\n", 1)[1]) == {"order_id": 7, "total": 10500, "currency": "KRW"}

        refused = cli(app_env, "run", "confirm_order", "--version", "1", "--input", '{"order_id": "seven"}')
        assert refused.returncode == 1 and "order_id" in refused.stderr

        not_json = cli(app_env, "run", "confirm_order", "--input", "{order_id: 7}")
        assert not_json.returncode == 2 and "not valid JSON" in not_json.stderr

        listed = cli(app_env, "schedules", "--json")
        assert listed.returncode == 0, listed.stderr
        schedules = {row["name"]: row for row in json.loads(listed.stdout)}
        assert set(schedules) == {"daily-report", "daily_report[*/10 * * * * *]"}
        assert schedules["daily-report"]["timezone"] == "Asia/Seoul"
        assert schedules["daily-report"]["next_fire_local"].endswith("09:00:00 KST")
        table = cli(app_env, "schedules").stdout
        assert table.splitlines()[0].split() == [
            "NAME",
            "WORKFLOW",
            "EXPRESSION",
            "TIMEZONE",
            "NEXT",
            "FIRE",
            "(LOCAL)",
            "LAST",
            "RUN",
        ]
    finally:
        assert worker.stop() == 0
    assert "worker" in worker.log() and "stopped" in worker.log()


async def test_a_failed_run_under_wait_exits_non_zero_with_the_error(app_env: dict[str, str], tmp_path: Path) -> None:
    app = tmp_path / "failing"
    (app / "jobs").mkdir(parents=True)
    (app / "jobs" / "__init__.py").write_text("")
    (app / "sonamu_config.py").write_text(
        "from sonamu_tasks import define_config\n"
        "config = define_config(workflows=['jobs'], tasks={'worker_options': {'listen_delay': 0}})\n"
    )
    (app / "jobs" / "boom_workflow.py").write_text(
        "from sonamu_tasks import workflow, NonRetryableError\n"
        "def explode():\n"
        "    raise NonRetryableError('the warehouse is closed')\n"
        "@workflow(version='1')\n"
        "async def boom(step):\n"
        "    await step.define('explode', explode).run()\n"
    )
    worker = Daemon(app_env, "worker", app, tmp_path / "worker.log")
    try:
        await wait_until(lambda: "workflows: boom@1" in worker.log(), what="worker start")
        failed = cli(app_env, "run", "boom", "--version", "1", "--wait", cwd=app)
    finally:
        worker.stop()
    assert failed.returncode == 1
    assert "failed" in failed.stderr and "the warehouse is closed" in failed.stderr and "explode" in failed.stderr


async def test_dev_mode_re_registers_a_changed_workflow_file(app_env: dict[str, str], tmp_path: Path) -> None:
    app = tmp_path / "devapp"
    (app / "jobs").mkdir(parents=True)
    (app / "jobs" / "__init__.py").write_text("")
    (app / "sonamu_config.py").write_text(
        "from sonamu_tasks import define_config\nconfig = define_config(workflows=['jobs'])\n"
    )
    module = app / "jobs" / "greet_workflow.py"
    source = "from sonamu_tasks import workflow\n@workflow(version='{v}')\nasync def greet(input):\n    return '{v}'\n"
    module.write_text(source.format(v="1"))
    dev = Daemon(app_env, "dev", app, tmp_path / "dev.log")
    try:
        await wait_until(lambda: "dev: watching" in dev.log(), what="dev mode to watch")
        module.write_text(source.format(v="2"))
        await wait_until(lambda: "workflows: greet@2" in dev.log(), timeout=20, what="the reload")
        (app / "jobs" / "typo_workflow.py").write_text("this is not python\n")
        await wait_until(lambda: "typo_workflow.py failed to load" in dev.log(), timeout=20, what="the error")
        # The good module stays registered beside the broken one.
        await wait_until(lambda: dev.log().count("workflows: greet@2") >= 2, what="the registry after the error")
        done = cli(app_env, "run", "greet", "--version", "2", "--wait", "--timeout", "20", cwd=app)
        assert done.returncode == 0 and json.loads(done.stdout.split("\n", 1)[1]) == "2"
    finally:
        assert dev.stop() == 0


async def test_runs_show_cancel_retry_and_workers(app_env: dict[str, str], tmp_path: Path) -> None:
    worker = Daemon(app_env, "worker", SHOP, tmp_path / "worker.log")
    try:
        await wait_until(lambda: "workflows: confirm_order@1" in worker.log(), what="worker start")
        done = cli(app_env, "run", "confirm_order", "--version", "1", "--input", '{"order_id": 3}', "--wait")
        run_id = done.stdout.split("\n", 1)[0]
        later = cli(app_env, "run", "confirm_order", "--version", "1", "--input", '{"order_id": 4}', "--start-at", "1h")
        later_id = later.stdout.strip()

        listed = json.loads(cli(app_env, "runs", "--workflow", "confirm_order", "--json").stdout)
        assert [item["id"] for item in listed["items"]] == [later_id, run_id]  # newest first
        assert [item["status"] for item in listed["items"]] == ["pending", "completed"]
        page = json.loads(cli(app_env, "runs", "--limit", "1", "--json").stdout)
        assert len(page["items"]) == 1 and page["next_cursor"]
        rest = json.loads(cli(app_env, "runs", "--limit", "1", "--cursor", page["next_cursor"], "--json").stdout)
        assert rest["items"][0]["id"] != page["items"][0]["id"]
        assert "completed" in cli(app_env, "runs", "--status", "completed").stdout

        shown = cli(app_env, "show", run_id)
        assert shown.returncode == 0, shown.stderr
        for text in ("find_order", "total", "settle", "sleep", '"total": 10500'):
            assert text in shown.stdout
        detail = json.loads(cli(app_env, "show", run_id, "--json").stdout)
        assert [s["name"] for s in detail["steps"]] == ["find_order", "total", "settle"]

        assert cli(app_env, "pause", later_id).stdout.split() == [later_id, "paused"]
        assert cli(app_env, "resume", later_id).stdout.split() == [later_id, "pending"]
        assert cli(app_env, "cancel", later_id).stdout.split() == [later_id, "canceled"]
        assert cli(app_env, "retry", later_id).stdout.split() == [later_id, "pending"]  # and now it runs
        missing = cli(app_env, "cancel", "01a21290-0000-7000-8000-000000000000")
        assert missing.returncode == 1 and "no run with id" in missing.stderr

        (listed_worker,) = json.loads(cli(app_env, "workers", "--json").stdout)
        assert listed_worker["workflows"] == ["confirm_order@1", "daily_report@1"]
        assert listed_worker["pid"] == worker.process.pid
    finally:
        assert worker.stop() == 0


# Parents and children, in process: the command runs in a thread against this test's database and schema.

ELSEWHERE = {"name": "elsewhere", "version": "1"}  # no worker here runs it: its runs stay pending
cli_config: Config | None = None
"""The config `--config tests.test_cli:cli_config` names: this test's database and schema."""


@workflow(version="1")
async def doubled(input: int) -> int:
    return input * 2


@workflow(version="1")
async def family(input: int, step: Any) -> Any:
    """A finished child, a fan-out of `input` children that stay pending, a detached one, and a sleep."""
    first = await step.run_workflow("first", doubled, 1)
    kids = await step.start_workflows("kids", ELSEWHERE, list(range(input)))
    await step.start_workflow("loose", ELSEWHERE, "x", detached=True)
    await asyncio.gather(step.sleep("nap", "2h"), *(kid.result() for kid in kids))
    return first


@workflow(version="1")
async def only_child(step: Any) -> Any:
    """Waits for one child and nothing else: parked with no wake time."""
    return await step.run_workflow("the-one", ELSEWHERE)


Invoke = Callable[..., Awaitable[Result]]


@pytest.fixture
def invoke(make_config: Any, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    monkeypatch.setattr(sys.modules[__name__], "cli_config", make_config(enable_worker=False))

    async def run(*args: str) -> Result:
        runner = CliRunner()
        result = await asyncio.to_thread(runner.invoke, main, ["--config", f"{__name__}:cli_config", *args])
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    return run


async def started_family(manager_for: Any, kids: int) -> tuple[Any, str]:
    """A `family` parent waiting for its children and its nap, and the id of its finished child."""
    manager = await manager_for([family, doubled])
    parent = await manager.run(family, kids)
    await wait_until(lambda: _status_is(parent, RunStatus.WAITING), what="the parent to wait")
    [first] = (await manager.list_runs(parent_id=parent.id, workflow="doubled")).items
    return parent, first.id


async def test_runs_lists_a_parents_children_and_marks_a_child_with_its_parent(
    manager_for: Any, invoke: Invoke
) -> None:
    parent, first_id = await started_family(manager_for, 3)

    children = json.loads((await invoke("runs", "--parent", parent.id, "--json")).stdout)
    assert len(children["items"]) == 5 and children["next_cursor"] is None  # first, kids[0..2], loose
    by_step = {item["parent_step"]: item for item in children["items"]}
    assert set(by_step) == {"first", "kids[0]", "kids[1]", "kids[2]", "loose"}
    assert all(item["parent_id"] == parent.id for item in children["items"])
    assert by_step["loose"]["detached"] is True and by_step["kids[0]"]["detached"] is False
    assert by_step["first"]["id"] == first_id and by_step["first"]["status"] == "completed"

    table = (await invoke("runs", "--parent", parent.id)).stdout
    assert table.splitlines()[0].split()[:4] == ["ID", "WORKFLOW", "STATUS", "STEP"]
    assert "kids[2]" in table and parent.id not in table

    paged = json.loads((await invoke("runs", "--parent", parent.id, "--limit", "2", "--json")).stdout)
    rest = json.loads((await invoke("runs", "--parent", parent.id, "--cursor", paged["next_cursor"], "--json")).stdout)
    assert len(paged["items"]) + len(rest["items"]) == 5

    everything = (await invoke("runs")).stdout
    header, *lines = everything.splitlines()
    assert header.split()[3] == "PARENT"
    child_line = next(line for line in lines if line.startswith(first_id))
    assert f"…{parent.id[-8:]}" in child_line  # the parent's id, short
    parent_line = next(line for line in lines if line.startswith(parent.id))
    assert "waiting" in parent_line and "…" not in parent_line

    waiting = json.loads((await invoke("runs", "--status", "waiting", "--json")).stdout)
    assert [item["id"] for item in waiting["items"]] == [parent.id]
    assert waiting["items"][0]["parent_id"] is None and waiting["items"][0]["available_at"] is not None
    assert (await invoke("runs", "--status", "waiting", "--status", "completed", "--parent", parent.id)).stdout.count(
        "completed"
    ) == 1


async def test_show_a_waiting_parent_with_its_children_and_what_it_waits_for(manager_for: Any, invoke: Invoke) -> None:
    parent, first_id = await started_family(manager_for, 25)
    info = await parent.info(with_steps=True)
    [nap_wake] = [s.wake_at for s in info.steps if s.name == "nap" and s.wake_at is not None]
    kids = {c.parent_step: c.id for c in await _all_children(manager_for, parent.id)}

    shown = (await invoke("show", parent.id)).stdout
    assert "status    waiting" in shown
    assert "waits for 26 unfinished children:" in shown  # 25 kids and the detached one
    assert f"{kids['kids[0]']} (kids[0], pending)" in shown
    assert "and 6 more: sonamu-tasks runs --parent " + parent.id in shown
    assert f"sleep 'nap' until {nap_wake.astimezone().strftime('%Y-%m-%d %H:%M:%S')}" in shown
    assert f"child -> {first_id} (completed)" in shown  # a child step, with the outcome its parent saw
    assert "children -> 25 runs" in shown
    assert re.search(r"^loose +child +completed +1 .*child -> " + kids["loose"], shown, re.MULTILINE)
    assert "children  27: 26 pending, 1 completed" in shown
    listed = shown.split("children  27:")[1]
    assert listed.index(first_id) < listed.index(kids["kids[2]"]) < listed.index(kids["kids[10]"])  # step order
    assert kids["kids[18]"] in listed and kids["kids[19]"] not in listed  # 20 listed: first, kids[0] to kids[18]
    assert "and 7 more: sonamu-tasks runs --parent " + parent.id in listed
    assert "2999" not in shown

    detail = json.loads((await invoke("show", parent.id, "--json")).stdout)
    assert detail["parent"] is None and detail["parent_id"] is None
    assert detail["children"]["total"] == 27 and detail["children"]["counts"] == {"pending": 26, "completed": 1}
    assert len(detail["children"]["listed"]) == 20 and detail["children"]["more"] == 7
    assert detail["children"]["listed"][0] == {
        "id": first_id,
        "step": "first",
        "workflow": "doubled",
        "version": "1",
        "status": "completed",
        "detached": False,
    }
    waiting_for = detail["waiting_for"]
    assert waiting_for["unfinished_children"] == 26 and len(waiting_for["children"]) == 20
    assert waiting_for["sleep"]["step"] == "nap"
    assert detail["available_at"] == waiting_for["sleep"]["wake_at"]
    steps = {s["name"]: s for s in detail["steps"]}
    assert steps["kids"]["kind"] == "child" and len(steps["kids"]["output"]["run_ids"]) == 25


async def test_show_a_child_names_its_parent_and_the_step_that_started_it(manager_for: Any, invoke: Invoke) -> None:
    parent, first_id = await started_family(manager_for, 2)
    kids = {c.parent_step: c.id for c in await _all_children(manager_for, parent.id)}

    shown = (await invoke("show", kids["kids[1]"])).stdout
    assert f"parent    {parent.id} (family@1, waiting; started by its step 'kids[1]')" in shown
    loose = (await invoke("show", kids["loose"])).stdout
    assert f"parent    {parent.id} (family@1, waiting; started by its step 'loose', detached)" in loose
    assert "children" not in loose.split("no steps yet")[1]  # a run without child steps has no children part

    detail = json.loads((await invoke("show", first_id, "--json")).stdout)
    assert detail["parent_id"] == parent.id and detail["parent_step"] == "first" and detail["detached"] is False
    assert detail["parent"] == {
        "id": parent.id,
        "workflow": "family",
        "version": "1",
        "status": "waiting",
        "step": "first",
        "detached": False,
    }
    assert detail["children"] is None and detail["waiting_for"] is None


async def test_a_run_waiting_only_for_a_child_shows_no_wake_time(manager_for: Any, invoke: Invoke) -> None:
    manager = await manager_for([only_child])
    parent = await manager.run(only_child)
    await wait_until(lambda: _status_is(parent, RunStatus.WAITING), what="the parent to wait")
    [child] = (await manager.list_runs(parent_id=parent.id)).items

    shown = (await invoke("show", parent.id)).stdout
    assert f"waits for 1 unfinished child:\n            {child.id} (the-one, pending)" in shown
    assert "next " not in shown and "sleep" not in shown and "2999" not in shown
    detail = json.loads((await invoke("show", parent.id, "--json")).stdout)
    assert detail["available_at"] is None  # parked with no timer: not the far-future park time
    assert detail["waiting_for"] == {
        "unfinished_children": 1,
        "children": [
            {
                "id": child.id,
                "step": "the-one",
                "workflow": "elsewhere",
                "version": "1",
                "status": "pending",
                "detached": False,
            }
        ],
        "sleep": None,
        "steps": [],
    }
    listed = json.loads((await invoke("runs", "--json")).stdout)["items"]
    assert next(item for item in listed if item["id"] == parent.id)["available_at"] is None
    assert "2999" not in (await invoke("runs")).stdout

    # The child finishes (canceled here): the parent wakes, sees it, and fails with ChildWorkflowFailed.
    await manager.cancel(child.id)
    await wait_until(lambda: _status_is(parent, RunStatus.FAILED), what="the parent to fail")
    after = (await invoke("show", parent.id)).stdout
    assert "waits for" not in after and "children  1: 1 canceled" in after
    assert f"child -> {child.id} (canceled)" in after


async def _all_children(manager_for: Any, parent_id: str) -> list[Any]:
    manager = await manager_for()
    return list((await manager.list_runs(parent_id=parent_id, limit=1000)).items)


async def _status_is(handle: Any, status: RunStatus) -> bool:
    return bool(await handle.status() is status)
