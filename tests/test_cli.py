"""The `sonamu-tasks` command against the example application: migrate, worker, run, schedules, dev."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

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
