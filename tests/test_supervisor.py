"""`sonamu-tasks worker --processes N`: a supervisor starts N worker processes, restarts a crashed one with
backoff, and stops them all gracefully on SIGTERM. Real processes on PostgreSQL; every wait has a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sonamu_tasks import RunStatus, WorkflowManager
from sonamu_tasks.config import DATABASE_URL_ENV
from sonamu_tasks.supervisor import Backoff
from sonamu_tasks.supervisor import worker_command as supervised_worker_command

from .conftest import wait_until

RELAY = {"name": "relay", "version": "1"}

WORKFLOW_MODULE = """
import os
import time
from pathlib import Path

from sonamu_tasks import workflow


def hold(directory):
    with open(Path(directory) / "audit.log", "a") as log:
        log.write(f"hold {os.getpid()}\\n")
    while not (Path(directory) / "release").exists():
        time.sleep(0.02)
    return os.getpid()


def echo(n):
    return n


@workflow(version="1")
async def relay(input, step):
    held = await step.define("hold", hold).run(input["dir"]) if input.get("hold") else None
    n = await step.define("echo", echo).run(input["n"])
    return {"held_in": held, "finished_in": os.getpid(), "n": n}
"""


@pytest.fixture
def backend_name() -> str:
    return "postgres"  # the supervisor is the same on SQLite; its workers only poll there


@pytest.fixture
def app(database_url: str, schema: str, tmp_path: Path) -> Path:
    """An application directory: a config module on this test's schema and a package with one workflow."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (tmp_path / "jobs" / "relay_workflow.py").write_text(WORKFLOW_MODULE)
    options = {"listen_delay": 0, "lease_ms": 1000, "concurrency": 2, "shutdown_grace_ms": 5000}
    (tmp_path / "supervised_config.py").write_text(
        "from sonamu_tasks import define_config\n"
        f"config = define_config(database_url={database_url!r}, schema={schema!r}, workflows=['jobs'],"
        f" tasks={{'worker_options': {options!r}}})\n"
    )
    return tmp_path


class Started:
    """A process whose output goes to a file, killed with whatever it started if a test leaves it running."""

    def __init__(self, command: list[str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in cleanup()
        env = {key: value for key, value in os.environ.items() if key != DATABASE_URL_ENV}
        self.process = subprocess.Popen(
            command, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid
        self.seen_children: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> set[int]:
        """The live child processes (Linux: /proc)."""
        found = set()
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                found |= {int(pid) for pid in (task / "children").read_text().split()}
            except OSError:
                continue
        self.seen_children |= found
        return found

    async def exit_code(self, timeout: float = 30) -> int:
        return await asyncio.to_thread(self.process.wait, timeout)

    def cleanup(self) -> None:
        self.children()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid in self.seen_children:  # workers live in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def start(app: Path) -> Iterator[Any]:
    started: list[Started] = []

    def start_process(command: list[str], name: str = "supervisor") -> Started:
        process = Started(command, app, app / f"{name}.log")
        started.append(process)
        return process

    yield start_process
    for process in started:
        process.cleanup()


def worker_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "sonamu_tasks", "--config", "supervised_config:config", "worker", *options]


def supervisor_script(child: str, processes: int, **options: Any) -> list[str]:
    """A Supervisor of `processes` copies of the Python program `child`, outside the CLI."""
    program = textwrap.dedent(
        f"""
        import logging, sys
        from sonamu_tasks.supervisor import Backoff, Supervisor
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
        command = [sys.executable, "-c", {child!r}]
        options = {options!r}
        backoff = Backoff(**options.pop("backoff", {{}}))
        sys.exit(Supervisor(command, {processes}, backoff=backoff, **options).run())
        """
    )
    return [sys.executable, "-c", program]


@pytest.fixture
async def client(make_config: Any) -> Any:
    """The test's own process: starts runs and reads them, executes nothing."""
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        yield manager


async def registered(client: Any, supervisor: Started, count: int, *, killed: int | None = None) -> list[Any]:
    """Wait until `count` workers, all children of the supervisor (and none of them `killed`), are registered
    and serving."""

    async def ready() -> list[Any] | None:
        workers = await client.list_workers()
        children = supervisor.children() - {killed}
        live = [w for w in workers if w.pid in children]
        # The killed worker wrote its line too: a restarted one has written its own only past that count.
        served = supervisor.log().count("workflows: relay@1") - (1 if killed is not None else 0)
        return live if len(live) == count and served >= count else None

    found: list[Any] = await wait_until(ready, timeout=30, what=f"{count} supervised workers to register")
    return found


def held_in(app: Path) -> list[int]:
    path = app / "audit.log"
    return [int(line.split()[1]) for line in path.read_text().splitlines()] if path.exists() else []


async def test_n_processes_register_n_workers_and_sigterm_stops_them_all_gracefully(client: Any, start: Any) -> None:
    supervisor = start(worker_command("--processes", "2", "--concurrency", "3"))
    workers = await registered(client, supervisor, 2)
    assert [w.concurrency for w in workers] == [3, 3]
    assert supervisor.pid not in {w.pid for w in workers}
    handles = [await client.run(RELAY, {"n": n}) for n in range(20)]
    results = [await handle.result(timeout=30) for handle in handles]
    assert [r["n"] for r in results] == list(range(20))
    assert {r["finished_in"] for r in results} <= {w.pid for w in workers}
    log = supervisor.log()
    assert "[worker 1] " in log and "[worker 2] " in log  # each worker's lines tagged with its index

    supervisor.process.send_signal(signal.SIGTERM)

    assert await supervisor.exit_code() == 0
    assert not supervisor.children()
    for worker in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(worker.pid, 0)
    assert await client.list_workers() == []  # each worker deregistered itself on its way out
    log = supervisor.log()
    assert "SIGTERM: stopping 2 worker(s) gracefully" in log
    assert log.count("] shutting down: finishing running steps") == 2


async def test_a_worker_killed_by_sigkill_is_restarted_and_its_run_completes(
    client: Any, start: Any, app: Path
) -> None:
    supervisor = start(worker_command("--processes", "2"))
    first = {w.pid for w in await registered(client, supervisor, 2)}
    handle = await client.run(RELAY, {"hold": True, "dir": str(app), "n": 7})
    victim = (await wait_until(lambda: held_in(app), what="the run to start its step"))[0]
    assert victim in first

    os.kill(victim, signal.SIGKILL)

    restarted = await registered(client, supervisor, 2, killed=victim)
    pids = {w.pid for w in restarted}
    assert victim not in pids and len(pids - first) == 1  # a new process with a new worker record
    assert "was killed by SIGKILL; restarting it in 0.5 s" in supervisor.log()
    (app / "release").touch()
    result = await handle.result(timeout=30)
    assert result["n"] == 7 and result["held_in"] in pids and result["finished_in"] in pids
    run = await handle.info()
    assert run.status is RunStatus.COMPLETED and run.recoveries == 1

    supervisor.process.send_signal(signal.SIGTERM)

    assert await supervisor.exit_code() == 0
    assert not supervisor.children()
    # Only the killed worker's record is left: nobody deregistered it (the engine keeps a dead worker's row).
    assert [w.pid for w in await client.list_workers()] == [victim]


async def test_workers_stop_gracefully_when_their_supervisor_is_killed(client: Any, start: Any) -> None:
    supervisor = start(worker_command("--processes", "2"))
    workers = await registered(client, supervisor, 2)

    supervisor.process.kill()
    assert await supervisor.exit_code() == -signal.SIGKILL

    async def none_registered() -> bool:
        return await client.list_workers() == []

    await wait_until(none_registered, timeout=30, what="the orphaned workers to stop and deregister")
    for worker in workers:
        await wait_until(lambda pid=worker.pid: not _alive(pid), what=f"worker {worker.pid} to exit")


async def test_a_crashing_worker_is_restarted_with_doubling_delays(start: Any) -> None:
    backoff = {"initial_s": 0.1, "maximum_s": 0.4}
    crashing = start(supervisor_script("import sys; sys.exit(3)", 1, stop_timeout_s=5, backoff=backoff))
    delays = ["in 0.1 s", "in 0.2 s", "in 0.4 s", "in 0.4 s"]
    await wait_until(
        lambda: (
            [line.rsplit("it ", 1)[1] for line in crashing.log().splitlines() if "restarting" in line][:4] == delays
        ),
        what="four restarts",
    )
    assert "worker 1 exited with code 3; restarting it in 0.1 s" in crashing.log()

    crashing.process.send_signal(signal.SIGTERM)

    assert await crashing.exit_code() == 0  # a stop during the backoff ends it at once


@pytest.mark.parametrize("escalation", ["timeout", "second signal"])
async def test_a_worker_that_does_not_stop_is_killed(start: Any, escalation: str) -> None:
    stubborn_child = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    timeout = 1 if escalation == "timeout" else 60
    supervisor = start(supervisor_script(stubborn_child, 2, stop_timeout_s=timeout))
    await wait_until(lambda: supervisor.log().count("ready") == 2, what="both children")

    supervisor.process.send_signal(signal.SIGTERM)
    if escalation == "second signal":
        await wait_until(lambda: "stopping 2 worker(s)" in supervisor.log(), what="the first signal")
        supervisor.process.send_signal(signal.SIGINT)

    assert await supervisor.exit_code(timeout=20) == 1
    assert not supervisor.children()
    assert "killing" in supervisor.log() and supervisor.log().count("was killed by SIGKILL") == 2


def test_restart_delay_doubles_to_30_s_and_starts_over_after_a_minute_up() -> None:
    backoff = Backoff()
    delays: list[float] = []
    previous = None
    for _ in range(9):
        previous = backoff.next_delay(previous, uptime_s=1)
        delays.append(previous)
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.next_delay(30, uptime_s=60) == 0.5


def test_each_supervised_worker_is_given_the_queues_of_the_command() -> None:
    command = supervised_worker_command(config_spec=None, verbose=False, concurrency=None, queues=("emails", "-odd"))
    # One word per queue: a name that starts with "-" stays a name. (tests/test_queues_cli.py starts them.)
    assert command[command.index("worker") :][:5] == ["worker", "--processes", "1", "--queue=emails", "--queue=-odd"]
    unqueued = supervised_worker_command(config_spec=None, verbose=False, concurrency=None)
    assert not [word for word in unqueued if word.startswith("--queue")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
