"""The `sonamu-tasks` command against the example application: migrate, worker, run, schedules, dev; `runs`
and `show` on parents and their children; `show` on a run waiting for a message and an event, and `send`,
`emit` and `get-event` waking it; `fork`, `runs --stranded`, and `cancel` and `fork` on many runs at once."""

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
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner, Result

from sonamu_tasks import Config, RetryPolicy, RunStatus, WorkflowManager, arguments, define_config, workflow
from sonamu_tasks.backends.base import NewRun
from sonamu_tasks.cli import main
from sonamu_tasks.dashboard import Dashboard
from sonamu_tasks.ids import new_run_id

from .conftest import wait_until

SHOP = Path(__file__).resolve().parents[1] / "examples" / "shop"
# The package of this interpreter, as `python -m`: the same command as the `sonamu-tasks` script, without
# depending on PATH or on which installed script it would find.
CLI = [sys.executable, "-m", "sonamu_tasks"]

FOREVER_SHOWN = re.compile(r"2999-\d\d-\d\d")
"""A wait without a deadline is stored until the year 2999: shown, it would read as a date (a run id may
hold the digits 2999 by chance)."""


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
        assert schedules["daily-report"]["served"] is True  # the worker registers its workflow
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
            "FIRED",
            "BY",
        ]
        assert "fired by nobody" not in table
    finally:
        assert worker.stop() == 0
    assert "worker" in worker.log() and "stopped" in worker.log()
    # No live worker registers the workflows now: their stored schedules are fired by nobody, and said so.
    after = cli(app_env, "schedules")
    assert after.returncode == 0, after.stderr
    assert all(line.rstrip().endswith("nobody") for line in after.stdout.splitlines()[1:3])
    assert "A schedule fired by nobody" in after.stdout
    assert all(row["served"] is False for row in json.loads(cli(app_env, "schedules", "--json").stdout))


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


def _confirm_orders(env: dict[str, str]) -> list[dict[str, Any]]:
    listed = cli(env, "runs", "--workflow", "confirm_order", "--limit", "100", "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout)["items"])


def test_run_inputs_starts_one_run_per_line_or_none_and_run_takes_a_queue(
    app_env: dict[str, str], tmp_path: Path
) -> None:
    """`run --inputs FILE`: one run per line of a JSON Lines file (blank lines skipped), in one call; a key
    per line makes the file safe to start again; a bad line refuses the whole file, naming the line. `run` puts a
    run in the queue, priority and concurrency key given."""
    orders = tmp_path / "orders.jsonl"
    orders.write_text('{"order_id": 1}\n\n{"order_id": 2}\n{"order_id": 3}\n')
    args = ("run", "confirm_order", "--version", "1", "--inputs", str(orders), "--idempotency-key", "import-7")
    started = cli(app_env, *args, "--json")
    assert started.returncode == 0, started.stderr
    rows = json.loads(started.stdout)
    assert [row["line"] for row in rows] == [1, 3, 4]
    stored = {run["id"]: run for run in _confirm_orders(app_env)}
    assert {row["id"] for row in rows} == set(stored)
    for row, order_id in zip(rows, (1, 2, 3), strict=True):
        shown = cli(app_env, "show", row["id"], "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["input"] == {"order_id": order_id}
        assert stored[row["id"]]["idempotency_key"] == f"import-7:{row['line']}"

    again = cli(app_env, *args, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == rows
    assert len(_confirm_orders(app_env)) == 3

    piped = subprocess.run(
        [*CLI, "run", "confirm_order", "--version", "1", "--inputs", "-", "--priority", "5"],
        cwd=SHOP,
        env=app_env,
        input='{"order_id": 4}\n',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    (piped_id,) = piped.stdout.split()
    assert "started 1 run of confirm_order" in piped.stderr
    assert {run["id"]: run for run in _confirm_orders(app_env)}[piped_id]["priority"] == 5

    queued = cli(
        app_env,
        "run",
        "confirm_order",
        "--version",
        "1",
        "--input",
        '{"order_id": 9}',
        "--queue",
        "bulk",
        "--concurrency-key",
        "customer-9",
        "--priority",
        "-3",
    )
    assert queued.returncode == 0, queued.stderr
    shown = json.loads(cli(app_env, "show", queued.stdout.strip(), "--json").stdout)
    assert (shown["queue"], shown["concurrency_key"], shown["priority"]) == ("bulk", "customer-9", -3)

    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text('{"order_id": 5}\n{order_id: 6}\n')
    refused = cli(app_env, "run", "confirm_order", "--inputs", str(not_json))
    assert refused.returncode == 2 and "line 2: not valid JSON" in refused.stderr, refused.stderr

    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text('{"order_id": 5}\n\n{"order_id": "six"}\n')
    refused = cli(app_env, "run", "confirm_order", "--version", "1", "--inputs", str(invalid))
    assert refused.returncode == 1, refused.stderr
    assert "line 3: order_id" in refused.stderr and "confirm_order" in refused.stderr
    assert len(_confirm_orders(app_env)) == 5  # neither file started a run

    both = cli(app_env, "run", "confirm_order", "--inputs", str(orders), "--input", "{}")
    assert both.returncode == 2 and "give one of them" in both.stderr
    waited = cli(app_env, "run", "confirm_order", "--inputs", str(orders), "--wait")
    assert waited.returncode == 2 and "--wait waits for one run" in waited.stderr


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
        assert listed_worker["queues"] == ["default"]  # the queues its workflows are in
        assert listed_worker["stale"] is False and listed_worker["heartbeat_age_s"] < 60
        table = cli(app_env, "workers").stdout.splitlines()
        assert table[0].split()[:6] == ["ID", "HOST", "PID", "SLOTS", "QUEUES", "WORKFLOWS"]
        assert table[1].split()[4:6] == ["default", "confirm_order@1,"]
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

    # Waiting with every child started: it waits for "first" before it starts the others.
    async def all_started() -> bool:
        return sum((await manager.count_children(parent.id)).values()) == kids + 2

    await wait_until(all_started, what="every child started")
    await wait_until(lambda: _status_is(parent, RunStatus.WAITING), what="the parent to wait")
    [first] = (await manager.list_runs(parent_id=parent.id, workflow="doubled")).items
    return parent, first.id


async def test_retry_of_a_run_not_failed_or_canceled_says_nothing_was_retried_and_exits_1(
    manager_for: Any, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "cli_config", make_config(enable_worker=False))
    client = await manager_for([], enable_worker=False)
    backend = client.backend
    run_id, _ = await backend.create_run(NewRun(new_run_id(), "finished", "1", "null"))
    (claimed,) = await backend.claim_runs("a-worker", [("finished", "1")], 1, timedelta(seconds=30))
    await backend.complete_run(run_id, claimed.lease_token, '"done"')
    args = ["--config", f"{__name__}:cli_config", "retry", run_id]
    result = await asyncio.to_thread(CliRunner().invoke, main, args)
    assert result.exit_code == 1
    assert f"run {run_id} is completed: not retried" in result.output
    assert (await client.get_run(run_id)).status is RunStatus.COMPLETED


async def test_cancel_of_a_stranded_version_cancels_a_run_its_dead_worker_left_running(
    manager_for: Any, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "cli_config", make_config(enable_worker=False))
    client = await manager_for([], enable_worker=False)
    backend = client.backend
    run_id, _ = await backend.create_run(NewRun(new_run_id(), "retired", "1", "null"))
    await backend.claim_runs("dead-worker", [("retired", "1")], 1, timedelta(milliseconds=50))
    await asyncio.sleep(0.2)  # the worker never heartbeats again: its lease expires, and no worker serves v1
    args = ["--config", f"{__name__}:cli_config", "cancel", "--workflow", "retired", "--version", "1"]
    result = await asyncio.to_thread(CliRunner().invoke, main, args)
    assert result.exit_code == 0, result.output
    assert "canceled 1 run of" in result.output and "asked" not in result.output
    assert (await client.get_run(run_id)).status is RunStatus.CANCELED


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


@workflow(version="1")
async def wide_fan_out(step: Any) -> None:
    """A fan-out whose step name is wider than a table cell."""
    kids = await step.start_workflows("charge-every-customer-of-the-" + "x" * 50, ELSEWHERE, [1, 2, 3])
    await asyncio.gather(*(kid.result() for kid in kids))


async def test_runs_of_a_parent_keep_the_index_of_each_fan_out_child_in_a_long_step_name(
    manager_for: Any, invoke: Invoke
) -> None:
    """The STEP cell was cut from its end, so every child of a long fan-out read the same."""
    manager = await manager_for([wide_fan_out])
    parent = await manager.run(wide_fan_out)

    async def all_started() -> bool:
        return sum((await manager.count_children(parent.id)).values()) == 3

    await wait_until(all_started, what="every child started")
    table = (await invoke("runs", "--parent", parent.id)).stdout
    for index in range(3):
        assert f"xxxx[{index}]" in table
    assert "…" in table and "charge-every" not in table  # cut from its start


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
    assert not FOREVER_SHOWN.search(shown)

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
    assert "next " not in shown and "sleep" not in shown and not FOREVER_SHOWN.search(shown)
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
        "messages": [],
        "events": [],
        "steps": [],
    }
    listed = json.loads((await invoke("runs", "--json")).stdout)["items"]
    assert next(item for item in listed if item["id"] == parent.id)["available_at"] is None
    assert not FOREVER_SHOWN.search((await invoke("runs")).stdout)

    # The child finishes (canceled here): the parent wakes, sees it, and fails with ChildWorkflowFailed.
    await manager.cancel(child.id)
    await wait_until(lambda: _status_is(parent, RunStatus.FAILED), what="the parent to fail")
    after = (await invoke("show", parent.id)).stdout
    assert "waits for" not in after and "children  1: 1 canceled" in after
    assert f"child -> {child.id} (canceled)" in after


@workflow(version="1")
async def fan_read(input: int, step: Any) -> Any:
    """A fan-out of `input` children whose results the parent reads: each read stores `kids[i]`'s outcome."""
    kids = await step.start_workflows("kids", doubled, list(range(input)))
    return sum(await asyncio.gather(*(kid.result() for kid in kids)))


async def test_show_lists_each_child_of_a_fan_out_once_after_the_parent_read_their_results(
    manager_for: Any, make_config: Any, invoke: Invoke
) -> None:
    manager = await manager_for([fan_read, doubled])
    parent = await manager.run(fan_read, 25)
    assert await parent.result(timeout=60) == 2 * sum(range(25))
    kids = {c.parent_step: c.id for c in await _all_children(manager_for, parent.id)}
    first_listed = [kids[f"kids[{index}]"] for index in range(20)]  # in step order: kids[0] to kids[19]

    shown = (await invoke("show", parent.id)).stdout
    listed = shown.split("children  25: 25 completed")[1]
    assert [line.split()[0] for line in listed.splitlines()[2:22]] == first_listed
    assert all(listed.count(kid) == 1 for kid in first_listed)
    assert "and 5 more: sonamu-tasks runs --parent " + parent.id in listed

    detail = json.loads((await invoke("show", parent.id, "--json")).stdout)
    assert [row["id"] for row in detail["children"]["listed"]] == first_listed
    assert [row["step"] for row in detail["children"]["listed"]][:3] == ["kids[0]", "kids[1]", "kids[2]"]
    assert detail["children"]["more"] == 5

    # The dashboard's run page shares the list.
    dashboard = Dashboard(make_config(enable_worker=False), port=8765)
    await dashboard.manager.start()
    try:
        transport = httpx.ASGITransport(app=dashboard, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8765") as client:
            page = (await client.get(f"/runs/{parent.id}")).text
    finally:
        await dashboard.manager.stop()
    table = page.split("<table id='children'>")[1].split("</table>")[0]
    assert re.findall(r"<tr data-child='([^']+)'>", table) == first_listed
    assert "(5 not shown above)" in page


async def _all_children(manager_for: Any, parent_id: str) -> list[Any]:
    manager = await manager_for()
    return list((await manager.list_runs(parent_id=parent_id, limit=1000)).items)


async def _status_is(handle: Any, status: RunStatus) -> bool:
    return bool(await handle.status() is status)


# Messages and events


@workflow(version="1")
async def inbox(step: Any) -> Any:
    """Publishes its progress, then waits for an approval (with a timeout) and a payment event at once."""
    await step.set_event("progress", {"done": 40})
    approval, paid = await asyncio.gather(
        step.receive("wait-approval", topic="approval", timeout="1h"),
        step.wait_for_event("paid", "order.paid", key="7"),
    )
    await step.set_event("progress", {"done": 100})
    return {"approval": approval, "paid": paid}


async def waiting_inbox(manager: WorkflowManager) -> Any:
    handle = await manager.run(inbox)
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run to wait")
    return handle


async def test_show_a_waiting_run_lists_its_topic_its_messages_and_its_events(manager_for: Any, invoke: Invoke) -> None:
    manager = await manager_for([inbox])
    handle = await waiting_inbox(manager)
    for index in range(22):  # on a topic nobody receives: they stay unconsumed
        await manager.send(handle.id, {"note": index}, topic="notes", idempotency_key=f"note-{index}")
    # A message wakes the run (whatever its topic): it looks, finds nothing for its receive, and parks again.
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run to wait again")
    info = await handle.info(with_steps=True)
    [timeout_at] = [s.wake_at for s in info.steps if s.name == "wait-approval"]
    assert timeout_at is not None
    local = timeout_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")

    shown = (await invoke("show", handle.id)).stdout
    assert "status    waiting" in shown
    assert f"waits for message on topic 'approval' (step 'wait-approval'), times out {local}\n" in shown
    assert "\n          event 'order.paid' with key '7' (step 'paid'), no timeout\n" in shown
    assert re.search(
        rf"^wait-approval +receive +waiting +1 +- +message on topic 'approval', times out {local}$", shown, re.M
    )
    assert re.search(r"^paid +event +waiting +1 +- +event 'order.paid' with key '7', no timeout$", shown, re.M)
    messages = shown.split("messages  ")[1].split("\n\n")[0]
    assert messages.startswith("22 unconsumed (the oldest 20 listed)\n")
    assert messages.splitlines()[1].split() == ["TOPIC", "MESSAGE", "IDEMPOTENCY", "KEY", "AGE"]
    assert re.search(r'^notes +\{"note": 0\} +note-0 +\d+(ms|s)$', messages, re.M)
    assert "note-19" in messages and "note-20" not in messages
    assert "and 2 more" in messages
    events = shown.split("events    ")[1]
    assert events.startswith("1 published\n")
    assert re.search(r'^progress +\{"done": 40\} +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$', events, re.M)

    detail = json.loads((await invoke("show", handle.id, "--json")).stdout)
    assert detail["waiting_for"]["messages"] == [
        {"step": "wait-approval", "topic": "approval", "timeout_at": timeout_at.isoformat()}
    ]
    assert detail["waiting_for"]["events"] == [{"step": "paid", "event": "order.paid", "key": "7", "timeout_at": None}]
    assert detail["waiting_for"]["steps"] == []
    listed = detail["messages"]["listed"]
    assert (detail["messages"]["total"], detail["messages"]["exact"], detail["messages"]["more"]) == (22, True, 2)
    assert len(listed) == 20 and [m["payload"] for m in listed[:2]] == [{"note": 0}, {"note": 1}]
    assert listed[0]["topic"] == "notes" and listed[0]["idempotency_key"] == "note-0" and listed[0]["age_s"] >= 0
    [progress] = detail["events"]
    assert progress["key"] == "progress" and progress["value"] == {"done": 40} and progress["updated_at"]

    # Once it has what it waits for, it finishes: nothing left to wait for, the approval consumed.
    await manager.send(handle.id, "yes", topic="approval")
    await manager.emit("order.paid", 10.5, key="7")
    await handle.result(timeout=15)
    after = json.loads((await invoke("show", handle.id, "--json")).stdout)
    assert after["waiting_for"] is None and after["messages"]["total"] == 22  # the notes are still there
    assert after["events"][0]["value"] == {"done": 100}


async def test_send_and_emit_in_process_say_what_they_did(manager_for: Any, invoke: Invoke) -> None:
    manager = await manager_for([inbox])
    handle = await waiting_inbox(manager)
    first = await invoke(
        "send", handle.id, "--topic", "approval", "--message", '{"ok": true}', "--idempotency-key", "m-1"
    )
    assert first.stdout == f"sent to {handle.id} on topic 'approval'\n"
    again = await invoke("send", handle.id, "--topic", "approval", "--message", "2", "--idempotency-key", "m-1")
    assert again.stdout == f"not sent again: idempotency key 'm-1' was used for run {handle.id} before\n"
    as_json = json.loads(
        (await invoke("send", handle.id, "--topic", "t", "--message", "3", "--idempotency-key", "m-1", "--json")).stdout
    )
    assert as_json == {"run_id": handle.id, "topic": "t", "idempotency_key": "m-1", "stored": False}
    await wait_until(lambda: _step_is_done(handle, "wait-approval"), what="the receive to take the message")
    await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run to wait for the event")

    assert (await invoke("emit", "order.paid", "--key", "8", "--payload", "0")).stdout == (
        "emitted 'order.paid' with key '8': woke 0 waiting runs\n"
    )
    woke = json.loads(
        (await invoke("emit", "order.paid", "--key", "7", "--payload", '{"amount": 10.5}', "--json")).stdout
    )
    assert woke == {"event": "order.paid", "key": "7", "woken": 1}
    assert await handle.result(timeout=15) == {"approval": {"ok": True}, "paid": {"amount": 10.5}}
    assert json.loads((await invoke("get-event", handle.id, "progress")).stdout) == {"done": 100}

    missing = await asyncio.to_thread(
        CliRunner().invoke, main, ["--config", f"{__name__}:cli_config", "get-event", handle.id, "never-set"]
    )
    assert missing.exit_code == 1
    assert f"Error: run {handle.id} did not set event 'never-set' (it is completed)" in missing.output


async def test_send_emit_and_get_event_from_other_processes_wake_a_waiting_run(
    app_env: dict[str, str], tmp_path: Path
) -> None:
    """The command in a process of its own (`python -m sonamu_tasks`), the worker in this one."""
    config = define_config(
        database_url=app_env["SONAMU_TASKS_DATABASE_URL"], tasks={"worker_options": {"listen_delay": 0}}
    )
    async with WorkflowManager(config, workflows=[inbox]) as manager:
        handle = await waiting_inbox(manager)

        def command(*args: str) -> subprocess.CompletedProcess[str]:
            return cli(app_env, *args, cwd=tmp_path)  # no sonamu_config here: the defaults and the environment

        progress = await asyncio.to_thread(command, "get-event", handle.id, "progress", "--timeout", "5")
        assert progress.returncode == 0, progress.stderr
        assert json.loads(progress.stdout) == {"done": 40}
        not_yet = await asyncio.to_thread(command, "get-event", handle.id, "nothing", "--timeout", "0.2")
        assert not_yet.returncode == 1
        assert not_yet.stderr.strip() == (
            f"Error: run {handle.id} did not set event 'nothing' within 0.2s (it is waiting)"
        )

        sent = await asyncio.to_thread(
            command, "send", handle.id, "--topic", "approval", "--message", '{"approved": true}'
        )
        assert sent.returncode == 0 and sent.stdout == f"sent to {handle.id} on topic 'approval'\n", sent.stderr
        await wait_until(lambda: _step_is_done(handle, "wait-approval"), what="the receive to take the message")
        await wait_until(lambda: _status_is(handle, RunStatus.WAITING), what="the run to wait for the event")

        emitted = await asyncio.to_thread(command, "emit", "order.paid", "--key", "7", "--payload", '{"amount": 10.5}')
        assert emitted.returncode == 0, emitted.stderr
        assert emitted.stdout == "emitted 'order.paid' with key '7': woke 1 waiting run\n"
        assert await handle.result(timeout=15) == {"approval": {"approved": True}, "paid": {"amount": 10.5}}

        done = await asyncio.to_thread(command, "get-event", handle.id, "progress")
        assert json.loads(done.stdout) == {"done": 100}


async def _step_is_done(handle: Any, name: str) -> bool:
    steps = {s.name: s for s in (await handle.info(with_steps=True)).steps}
    return name in steps and steps[name].status.value == "completed"


# Forks, stranded runs, and acting on many runs at once

ONCE = RetryPolicy(max_attempts=1)
charged: list[str] = []


async def load(order: int) -> dict[str, int]:
    charged.append(f"load {order}")
    if order < 0:
        raise ValueError("no such order")
    return {"order": order, "total": 30}


async def charge_buggy(loaded: dict[str, int]) -> str:
    charged.append(f"charge-v1 {loaded['order']}")
    raise ValueError("bug in charge")


async def charge_fixed(loaded: dict[str, int]) -> str:
    charged.append(f"charge-v2 {loaded['order']}")
    return f"charged {loaded['total']} for {loaded['order']}"


def checkout_version(version: str, charge: Any) -> Any:
    async def checkout(input: int, step: Any) -> Any:
        loaded = await step.define("load", load).run(input)
        return await step.define("charge", charge).run(loaded)

    return workflow(checkout, version=version, retry_policy=ONCE)


checkout_v1 = checkout_version("1", charge_buggy)
checkout_v2 = checkout_version("2", charge_fixed)


async def failed_checkouts(manager: WorkflowManager, *orders: int) -> list[str]:
    handles = [await manager.run(checkout_v1, order) for order in orders]
    for handle in handles:
        assert (await manager.wait_until_finished(handle.id, timeout=15)).status is RunStatus.FAILED
    return [handle.id for handle in handles]


async def refused(*args: str) -> Result:
    """The command in process, expected to fail: its exit code and its stderr."""
    return await asyncio.to_thread(CliRunner().invoke, main, ["--config", f"{__name__}:cli_config", *args])


async def test_fork_a_failed_run_from_its_failed_step_onto_a_fixed_version(manager_for: Any, invoke: Invoke) -> None:
    manager = await manager_for([checkout_v1, checkout_v2])
    [source] = await failed_checkouts(manager, 7)
    charged.clear()

    forked = (await invoke("fork", source, "--from-step", "charge", "--version", "2")).stdout.strip()
    assert arguments.run_id(forked) == forked and forked != source
    assert await manager.wait_for_result(forked, timeout=15) == "charged 30 for 7"
    assert charged == ["charge-v2 7"]  # load's checkpoint was kept: it did not run again
    run = await manager.get_run(forked, with_steps=True)
    assert (run.workflow_name, run.version, run.input) == ("checkout", "2", 7)
    assert [(step.name, step.output) for step in run.steps] == [
        ("load", {"order": 7, "total": 30}),
        ("charge", "charged 30 for 7"),
    ]
    assert (await manager.get_run(source)).status is RunStatus.FAILED  # the source is left as it was
    assert f"forked    from {source} at its step 'charge'" in (await invoke("show", forked)).stdout
    assert json.loads((await invoke("show", forked, "--json")).stdout)["forked_from"] == source

    as_json = json.loads((await invoke("fork", source, "--from-step", "charge", "--to-version", "2", "--json")).stdout)
    assert as_json["source_id"] == source and as_json["version"] == "2" and as_json["from_step"] == "charge"
    assert as_json["served"] is True  # the in-process worker registers version 2
    assert await manager.wait_for_result(as_json["run_id"], timeout=15) == "charged 30 for 7"

    # On its own version (no --version), which this worker serves too: it fails again, at the same step.
    same = (await invoke("fork", source, "--from-step", "charge")).stdout.strip()
    assert (await manager.wait_until_finished(same, timeout=15)).version == "1"

    no_step = await refused("fork", source, "--from-step", "ship", "--version", "2")
    assert no_step.exit_code == 1 and no_step.stdout == ""
    assert no_step.stderr == f"Error: run {source} has no step 'ship' to fork from; its steps: 'load', 'charge'\n"
    unserved = await refused("fork", source, "--from-step", "charge", "--version", "9")
    assert unserved.exit_code == 0 and arguments.run_id(unserved.stdout.strip())
    assert unserved.stderr.startswith("warning: no live worker registers checkout version 9: the fork waits")


@workflow(version="1")
async def invoice_child(input: int, step: Any) -> Any:
    """Waits for a go-ahead message: it can be canceled while its parent waits, then retried and completed."""
    await step.receive("go-ahead")
    return f"invoice {input}"


@workflow(version="1")
async def invoicing(input: int, step: Any) -> Any:
    return await step.run_workflow("invoice", invoice_child, input)


async def test_a_child_canceled_under_its_waiting_parent_is_redone_by_a_fork_from_the_child_step(
    manager_for: Any, invoke: Invoke
) -> None:
    """The docs' recipe (child-workflows.md, "Canceling, failing, completing"): once the parent has seen the
    cancel, retrying the child and then the parent fails the parent again; a fork from the child step works."""
    manager = await manager_for([invoicing, invoice_child])
    parent = await manager.run(invoicing, 7)
    await wait_until(lambda: _status_is(parent, RunStatus.WAITING), what="the parent to wait")
    [child] = (await manager.list_runs(parent_id=parent.id)).items
    await manager.cancel(child.id)
    assert (await manager.wait_until_finished(parent.id, timeout=15)).status is RunStatus.FAILED

    # Retrying the child completes it, but the parent's replay reads the outcome it checkpointed: canceled.
    assert await manager.retry(child.id) is RunStatus.PENDING
    await manager.send(child.id, "go")
    assert await manager.wait_for_result(child.id, timeout=15) == "invoice 7"
    await manager.retry(parent.id)
    failed = await manager.wait_until_finished(parent.id, timeout=15)
    assert failed.status is RunStatus.FAILED and failed.error is not None
    assert failed.error["type"] == "ChildWorkflowFailed" and "canceled" in failed.error["message"]

    # A fork from the child step starts a new child, whose result the fork gets.
    forked = (await invoke("fork", parent.id, "--from-step", "invoice")).stdout.strip()
    await wait_until(lambda: _status_is(manager.handle(forked), RunStatus.WAITING), what="the fork to wait")
    [new_child] = (await manager.list_runs(parent_id=forked)).items
    assert new_child.id != child.id and new_child.parent_step == "invoice"
    await manager.send(new_child.id, "go")
    assert await manager.wait_for_result(forked, timeout=15) == "invoice 7"


async def test_a_forks_show_says_the_children_it_lists_were_kept_from_the_run_it_was_forked_from(
    manager_for: Any, invoke: Invoke
) -> None:
    """A fork keeps the outcome of a child its source had seen, with the step that started it, so it lists
    that child, whose parent is the source run: not one of the fork's own, which its counts leave out. The
    children it starts again (those whose outcome the source had not seen) are its own."""
    parent, first = await started_family(manager_for, 2)
    client = await manager_for([], enable_worker=False)
    forked = (await invoke("fork", parent.id, "--from-step", "nap")).stdout.strip()
    await wait_until(lambda: _status_is(client.handle(forked), RunStatus.WAITING), what="the fork to wait")
    shown = json.loads((await invoke("show", forked, "--json")).stdout)["children"]
    assert shown["total"] == 3 and shown["kept_from"] == parent.id  # kids[0], kids[1], loose: its own
    assert [(row["step"], row["id"] == first) for row in shown["listed"]][:1] == [("first", True)]
    assert {row["step"] for row in shown["listed"]} == {"first", "kids[0]", "kids[1]", "loose"}
    text = (await invoke("show", forked)).stdout
    assert f"children  3: 3 pending; listed with them: children kept from run {parent.id}" in text
    own = json.loads((await invoke("show", parent.id, "--json")).stdout)["children"]
    assert own["total"] == 4 and own["kept_from"] is None


async def test_runs_of_a_version_no_worker_serves_are_stranded_and_canceled_in_bulk(
    manager_for: Any, invoke: Invoke
) -> None:
    manager = await manager_for([checkout_v1])  # its worker registers checkout version 1 only
    retired = [(await manager.run({"name": "checkout", "version": "0"}, order)).id for order in range(4)]
    await manager.pause(retired[1])
    await manager.cancel(retired[0])  # finished: not stranded
    served = await manager.run(checkout_v1, 1, start_at="1h")  # pending too, but a live worker serves it
    await wait_until(lambda: _registered(manager), what="the worker to register")

    table = (await invoke("runs", "--stranded")).stdout
    header, row, *rest = table.splitlines()
    assert header.split() == ["WORKFLOW", "VERSION", "PENDING", "PAUSED", "TOTAL", "OLDEST"]
    assert row.split()[:5] == ["checkout", "0", "2", "1", "3"] and re.fullmatch(r"\d+(ms|s)", row.split()[5])
    hint = "\n".join(rest)
    assert "3 unfinished runs of 1 version that no live worker registers" in hint
    assert "sonamu-tasks runs --workflow checkout --version 0" in hint
    assert "sonamu-tasks cancel --workflow checkout --version 0 --dry-run" in hint
    assert "sonamu-tasks fork --workflow checkout --version 0 --status pending --status paused --from-step" in hint
    (group,) = json.loads((await invoke("runs", "--stranded", "--json")).stdout)["groups"]
    assert {key: group[key] for key in ("workflow", "version", "counts", "total")} == {
        "workflow": "checkout",
        "version": "0",
        "counts": {"pending": 2, "paused": 1},
        "total": 3,
    }
    listed = json.loads((await invoke("runs", "--workflow", "checkout", "--version", "0", "--json")).stdout)
    assert sorted(item["id"] for item in listed["items"]) == sorted(retired)

    # A dry run says what would change, and changes nothing.
    dry = (await invoke("cancel", "--workflow", "checkout", "--version", "0", "--dry-run")).stdout
    first, *lines = dry.splitlines()
    assert first == (
        "dry run: would cancel 3 runs of checkout@0 (pending, running, sleeping, waiting, paused); nothing changed"
    )
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(retired[1:])
    dry_json = json.loads(
        (await invoke("cancel", "--workflow", "checkout", "--version", "0", "--dry-run", "--json")).stdout
    )
    assert sorted(dry_json["would_cancel"]) == sorted(retired[1:]) and "canceled" not in dry_json
    assert dry_json["matched"] == 3 and dry_json["skipped"] == [] and dry_json["dry_run"] is True
    assert [(await manager.get_run(run_id)).status for run_id in retired[1:]] == [
        RunStatus.PAUSED,
        RunStatus.PENDING,
        RunStatus.PENDING,
    ]

    done = await invoke("cancel", "--workflow", "checkout", "--version", "0")
    assert done.stdout == "canceled 3 runs of checkout@0 (pending, running, sleeping, waiting, paused)\n"
    assert "canceling 3 runs of checkout@0" in done.stderr
    assert {(await manager.get_run(run_id)).status for run_id in retired} == {RunStatus.CANCELED}
    assert (await manager.get_run(served.id)).status is RunStatus.PENDING  # another version: untouched
    assert (await invoke("runs", "--stranded")).stdout.startswith("no stranded runs")
    assert json.loads((await invoke("runs", "--stranded", "--json")).stdout)["groups"] == []

    # Finished runs, asked for by status, are skipped and say why.
    again = json.loads(
        (await invoke("cancel", "--workflow", "checkout", "--version", "0", "--status", "canceled", "--json")).stdout
    )
    assert again["matched"] == 4 and again["canceled"] == [] and again["cancel_requested"] == []
    assert {skip["reason"] for skip in again["skipped"]} == {"already finished"}
    text = (await invoke("cancel", "--workflow", "checkout", "--version", "0", "--status", "canceled")).stdout
    assert text.startswith("canceled 0 runs of checkout@0 (canceled)\n4 skipped: 4 already finished\n")
    assert f"  {retired[0]} (canceled): already canceled" in text


async def test_fork_many_failed_runs_onto_a_fixed_version_after_a_dry_run(manager_for: Any, invoke: Invoke) -> None:
    manager = await manager_for([checkout_v1, checkout_v2])
    sources = await failed_checkouts(manager, 1, 2)
    [no_charge] = await failed_checkouts(manager, -1)  # failed in load: it has no step 'charge'
    select = ["--workflow", "checkout", "--version", "1", "--from-step", "charge", "--to-version", "2"]

    dry = (await invoke("fork", *select, "--dry-run")).stdout
    assert dry.startswith(
        "dry run: would fork 2 runs of checkout@1 (failed) from step 'charge' onto version 2; nothing changed\n"
    )
    assert all(source in dry for source in sources)
    assert "1 skipped: 1 no such step\n" in dry
    assert f"  {no_charge} (failed): has no step 'charge' to fork from; its steps: 'load'\n" in dry
    assert (await manager.list_runs(workflow="checkout", version="2")).items == []  # nothing was created

    charged.clear()
    result = await invoke("fork", *select, "--json")
    done = json.loads(result.stdout)
    assert "forking 3 runs of checkout@1 (failed) from step 'charge' onto version 2" in result.stderr
    assert done["matched"] == 3 and {fork["source_id"] for fork in done["forked"]} == set(sources)
    assert done["skipped"] == [
        {
            "id": no_charge,
            "status": "failed",
            "reason": "no such step",
            "detail": "has no step 'charge' to fork from; its steps: 'load'",
        }
    ]
    assert result.stderr.count("\n") == 1  # the progress line; no log line per fork
    results = {await manager.wait_for_result(fork["run_id"], timeout=15) for fork in done["forked"]}
    assert results == {"charged 30 for 1", "charged 30 for 2"}
    assert sorted(charged) == ["charge-v2 1", "charge-v2 2"]  # no load again
    forks = json.loads((await invoke("runs", "--workflow", "checkout", "--version", "2", "--json")).stdout)["items"]
    assert sorted(item["id"] for item in forks) == sorted(fork["run_id"] for fork in done["forked"])
    assert {(await manager.get_run(source)).status for source in sources} == {RunStatus.FAILED}


async def _registered(manager: WorkflowManager) -> bool:
    return any(worker.workflows for worker in await manager.list_workers())


async def test_show_names_the_worker_executing_a_running_run(manager_for: Any, invoke: Invoke) -> None:
    release = asyncio.Event()

    async def held() -> str:
        await release.wait()
        return "done"

    @workflow(version="1")
    async def holds(step: Any) -> Any:
        return await step.define("held", held).run()

    manager = await manager_for([holds])
    handle = await manager.run(holds)
    await wait_until(lambda: _status_is(handle, RunStatus.RUNNING), what="the run to run")
    shown = (await invoke("show", handle.id)).stdout
    assert f"worker    {manager.worker.id}   lease until " in shown
    release.set()
    await handle.result(timeout=15)
    assert "worker    " not in (await invoke("show", handle.id)).stdout
