"""Queues on the command line, against a real database (both backends): `queues` shows each queue's limits and
what runs and waits in it, as a table and as JSON; `show` says a run's queue, priority and concurrency key;
`worker --queue Q` (and `worker --processes N --queue Q`, through the supervisor) serves that queue only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sonamu_tasks import Queue, RunStatus, WorkflowManager, workflow
from sonamu_tasks.cli import main

from .conftest import wait_until

CLI = [sys.executable, "-m", "sonamu_tasks"]
Invoke = Callable[..., Awaitable[Result]]


@pytest.fixture
def config_module(database_url: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`config_module(**options)` writes a config module for the command on this test's database and schema
    (`define_config` keyword arguments added as given) and returns its `--config` spec. A fresh module name
    each time: the command imports it in this process too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SONAMU_TASKS_DATABASE_URL", raising=False)  # it would override the database
    monkeypatch.delenv("SONAMU_TASKS_CONFIG", raising=False)

    def write(**options: Any) -> str:
        name = f"queues_config_{uuid.uuid4().hex[:10]}"
        arguments = ", ".join(f"{key}={value!r}" for key, value in options.items())
        (tmp_path / f"{name}.py").write_text(
            "from sonamu_tasks import define_config\n"
            f"config = define_config(database_url={database_url!r}, schema={schema!r}, {arguments})\n"
        )
        return f"{name}:config"

    return write


@pytest.fixture
def invoke(config_module: Any) -> Invoke:
    """`await invoke(*args)`: the command in this process (click's runner, in a thread: it runs its own event
    loop), on this test's database."""
    spec = config_module()

    async def run(*args: str) -> Result:
        return await asyncio.to_thread(CliRunner().invoke, main, ["--config", spec, *args])

    return run


def table(text: str) -> dict[str, list[str]]:
    """A table the command printed, by its first column; the header row under "HEADER"."""
    rows = [re.split(r" {2,}", line.strip()) for line in text.splitlines() if line.strip()]
    return {"HEADER": rows[0], **{row[0]: row for row in rows[1:]}}


# queues


async def test_queues_shows_limits_running_backlog_rate_window_and_parked_runs(
    manager_for: Any, invoke: Invoke
) -> None:
    # given a limited queue with two runs executing, one parked behind its key and two more due, and a
    # declared queue with no runs
    gate = asyncio.Event()

    async def held(value: str) -> str:
        await gate.wait()
        return value

    payments = Queue("payments", concurrency=2, rate_limit="100/1m", per_key_concurrency=1)

    @workflow(version="1", queue=payments)
    async def charge(input: str, step: Any) -> str:
        return str(await step.define("charge", held).run(input))

    @workflow(version="1", queue=Queue("reports", concurrency=1))
    async def report(input: Any) -> Any:
        return input

    manager = await manager_for([charge, report], concurrency=4)
    handles = [await manager.run(charge, key, concurrency_key=key) for key in ("a", "a", "b", "c", "d")]
    await wait_until(lambda: _payments_are(manager, running=2, due=3, parked=1), what="two running, one parked")

    # when the command lists the queues, as JSON and as a table
    as_json = await invoke("queues", "--json")
    as_table = await invoke("queues")

    # then each queue has its limits and its numbers
    assert as_json.exit_code == 0, as_json.output
    listed = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert set(listed) == {"default", "payments", "reports"}
    oldest = listed["payments"].pop("oldest_due_s")
    assert 0 <= oldest < 60
    assert listed["payments"] == {
        "name": "payments",
        "concurrency": 2,
        "worker_concurrency": None,
        "rate_limit": "100/1m",
        "rate_limit_starts": 100,
        "rate_limit_window_s": 60.0,
        "per_key_concurrency": 1,
        "running": 2,
        "due": 3,
        "starts_in_window": 2,
        "parked_on_key": 1,
        "workers": 1,  # this test's worker: it claims from its workflows' queues, payments and reports
    }
    assert listed["reports"] == {
        "name": "reports",
        "concurrency": 1,
        "worker_concurrency": None,
        "rate_limit": None,
        "rate_limit_starts": None,
        "rate_limit_window_s": None,
        "per_key_concurrency": None,
        "running": 0,
        "due": 0,
        "oldest_due_s": None,
        "starts_in_window": None,
        "parked_on_key": 0,
        "workers": 1,
    }
    assert as_table.exit_code == 0, as_table.output
    rows = table(as_table.stdout)
    assert rows["HEADER"] == [
        "QUEUE",
        "CONCURRENCY",
        "PER WORKER",
        "RATE LIMIT",
        "PER KEY",
        "RUNNING",
        "DUE",
        "OLDEST DUE",
        "RATE WINDOW",
        "PARKED ON KEY",
        "WORKERS",
    ]
    age = rows["payments"].pop(7)
    assert re.fullmatch(r"\d+(ms|s|m)", age), age
    assert rows["payments"] == ["payments", "2", "-", "100/1m", "1", "2", "3", "2/100", "1", "1"]
    assert rows["reports"] == ["reports", "1", "-", "-", "-", "0", "0", "-", "-", "0", "1"]
    assert rows["default"] == ["default", "-", "-", "-", "-", "0", "0", "-", "-", "0", "0"]  # nothing claims from it

    # and once the runs are let through, nothing runs or waits, and the window counts every start
    gate.set()
    for handle in handles:
        await handle.result(timeout=30)
    after = table((await invoke("queues")).stdout)
    assert after["payments"] == ["payments", "2", "-", "100/1m", "1", "0", "0", "-", "5/100", "0", "1"]


async def _payments_are(manager: WorkflowManager, *, running: int, due: int, parked: int) -> bool:
    stats = {s.name: s for s in await manager.queue_stats()}
    found = stats.get("payments")
    return found is not None and (found.running, found.due, found.parked_on_key) == (running, due, parked)


async def test_queues_warns_of_a_queue_with_runs_due_that_no_worker_claims_from(
    manager_for: Any, invoke: Invoke
) -> None:
    @workflow(version="1", queue=Queue("orphaned"))
    async def orphan(input: Any) -> Any:
        return input

    producer = await manager_for([orphan], enable_worker=False)  # declares the queue; no worker serves it
    await producer.run_many(orphan, [1, 2])
    listed = await invoke("queues")
    assert listed.exit_code == 0, listed.output
    assert table(listed.stdout)["orphaned"][-1] == "0"
    assert listed.stderr.splitlines() == [
        "warning: queue orphaned: 2 runs due and no live worker claims from it "
        "(start one: sonamu-tasks worker --queue orphaned)"
    ]
    quiet = await invoke("queues", "--json")  # scripts get the count, no warning
    assert quiet.stderr == "" and {q["name"]: q["workers"] for q in json.loads(quiet.stdout)}["orphaned"] == 0


async def test_a_fresh_database_lists_the_default_queue_without_limits(invoke: Invoke) -> None:
    migrated = await invoke("migrate")
    assert migrated.exit_code == 0, migrated.output
    listed = await invoke("queues")
    assert listed.exit_code == 0, listed.output
    assert table(listed.stdout)["default"] == ["default", "-", "-", "-", "-", "0", "0", "-", "-", "0", "0"]
    as_json = await invoke("queues", "--json")
    assert as_json.exit_code == 0, as_json.output
    assert [(q["name"], q["concurrency"], q["rate_limit"], q["due"]) for q in json.loads(as_json.stdout)] == [
        ("default", None, None, 0)
    ]


# show


async def test_show_names_the_queue_priority_and_concurrency_key_of_a_run(manager_for: Any, invoke: Invoke) -> None:
    # given two runs that wait an hour: one in a queue with a priority and a key, one with none of them
    @workflow(version="1", queue=Queue("payments", concurrency=5))
    async def pay(input: Any) -> Any:
        return input

    @workflow(version="1")
    async def plain(input: Any) -> Any:
        return input

    manager = await manager_for([pay, plain], enable_worker=False)
    queued = await manager.run(pay, 1, start_at="1h", priority=5, concurrency_key="customer 7")
    other = await manager.run(plain, 2, start_at="1h")

    # when `show` prints them
    shown = await invoke("show", queued.id)
    shown_json = await invoke("show", queued.id, "--json")
    plain_shown = await invoke("show", other.id)
    plain_json = await invoke("show", other.id, "--json")

    # then the queued run's line says all three, and the plain run has no such line (but its JSON has them)
    assert shown.exit_code == 0, shown.output
    assert "queue     payments   priority 5   concurrency key 'customer 7'\n" in shown.stdout
    detail = json.loads(shown_json.stdout)
    assert (detail["queue"], detail["priority"], detail["concurrency_key"]) == ("payments", 5, "customer 7")
    assert plain_shown.exit_code == 0, plain_shown.output
    assert not any(line.startswith("queue") for line in plain_shown.stdout.splitlines())
    detail = json.loads(plain_json.stdout)
    assert (detail["queue"], detail["priority"], detail["concurrency_key"]) == ("default", 0, None)

    # and `runs --json` lists the same fields
    listed = json.loads((await invoke("runs", "--json")).stdout)["items"]
    found = {(r["id"], r["queue"], r["priority"]) for r in listed}
    assert found == {(queued.id, "payments", 5), (other.id, "default", 0)}


async def test_a_run_in_the_default_queue_with_a_priority_shows_its_queue_too(manager_for: Any, invoke: Invoke) -> None:
    @workflow(version="1")
    async def plain(input: Any) -> Any:
        return input

    manager = await manager_for([plain], enable_worker=False)
    urgent = await manager.run(plain, 1, start_at="1h", priority=-3)
    shown = await invoke("show", urgent.id)
    assert "queue     default   priority -3\n" in shown.stdout


# worker --queue


class Command:
    """`python -m sonamu_tasks ...` running in the background, its output in a file."""

    def __init__(self, args: list[str], cwd: Path, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SONAMU_TASKS_DATABASE_URL", None)
        self.process = subprocess.Popen([*CLI, *args], cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int:
        """SIGTERM, then its exit code (SIGKILL if it takes more than 30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = await asyncio.to_thread(self.process.wait, 10)
        self._log.close()
        return code


async def test_worker_queue_serves_only_that_queue_and_the_supervisor_passes_it_on(
    make_config: Any, config_module: Any, tmp_path: Path
) -> None:
    # given a workflow of queue "alpha", and a worker process started with --queue alpha
    module = f"queue_jobs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from sonamu_tasks import Queue, workflow\n"
        "@workflow(version='1', queue=Queue('alpha'))\n"
        "async def job(input):\n"
        "    return input\n"
    )
    spec = config_module(workflows=[module], tasks={"worker_options": {"listen_delay": 0, "lease_ms": 2000}})
    job = {"name": "job", "version": "1"}
    started: list[Command] = []
    alpha = Command(["--config", spec, "worker", "--queue", "alpha"], tmp_path, tmp_path / "alpha.log")
    started.append(alpha)
    try:
        await wait_until(lambda: "queues: alpha\n" in alpha.log(), timeout=60, what="the alpha worker to start")
        async with WorkflowManager(make_config(enable_worker=False)) as client:
            # when a run is put in queue "beta" first, then two runs in its own queue "alpha"
            elsewhere = await client.run(job, "beta-run", queue="beta")
            first = await client.run(job, "alpha-1")
            assert await first.result(timeout=30) == "alpha-1"
            second = await client.run(job, "alpha-2")
            assert await second.result(timeout=30) == "alpha-2"

            # then the worker took its queue's runs and left the other queue's due run alone
            left = await client.get_run(elsewhere.id)
            assert (left.status, left.attempts, left.queue) == (RunStatus.PENDING, 0, "beta")
            assert (await first.info()).queue == "alpha"

            # and two supervised workers started with --queue beta serve it, each told so by the supervisor
            beta = Command(
                ["--config", spec, "worker", "--processes", "2", "--queue", "beta"], tmp_path, tmp_path / "beta.log"
            )
            started.append(beta)
            assert await elsewhere.result(timeout=60) == "beta-run"
            await wait_until(
                lambda: all(f"[worker {index}] queues: beta\n" in beta.log() for index in (1, 2)),
                timeout=60,
                what="both supervised workers to serve beta",
            )
            assert "queues: alpha" not in beta.log()
    finally:
        codes = [await command.stop() for command in started]
    assert codes == [0] * len(started), [command.log() for command in started]


async def test_worker_refuses_a_blank_queue_name_in_one_line(invoke: Invoke) -> None:
    refused = await invoke("worker", "--queue", "  ")
    assert refused.exit_code == 2
    assert "queue name must not be blank" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1


async def test_worker_queue_warns_of_a_queue_nothing_declares(config_module: Any, tmp_path: Path) -> None:
    spec = config_module(tasks={"worker_options": {"listen_delay": 0}})
    worker = Command(["--config", spec, "worker", "--queue", "paymnets"], tmp_path, tmp_path / "worker.log")
    try:
        await wait_until(lambda: "queues: paymnets\n" in worker.log(), timeout=60, what="the worker to start")
        assert "warning: queue 'paymnets' is neither the queue of a workflow this worker registers" in worker.log()
    finally:
        assert await worker.stop() == 0, worker.log()


async def test_runs_lists_the_runs_of_one_queue(manager_for: Any, invoke: Invoke) -> None:
    from sonamu_tasks import workflow

    @workflow(version="1", queue="mail")
    async def send_mail(input: Any) -> Any:
        return input

    @workflow(version="1")
    async def other_work(input: Any) -> Any:
        return input

    manager = await manager_for([send_mail, other_work])
    mail = [await manager.run(send_mail, i) for i in range(2)]
    await manager.run(other_work, 9)
    assert {run.id for run in (await manager.list_runs(queue="mail")).items} == {h.id for h in mail}
    listed = json.loads((await invoke("runs", "--queue", "mail", "--json")).stdout)
    assert {item["id"] for item in listed["items"]} == {h.id for h in mail}
    refused = await invoke("runs", "--queue", " ")
    assert refused.exit_code == 2 and "queue" in refused.output
