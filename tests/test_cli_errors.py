"""Bad arguments to the command: one line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sonamu_tasks import WorkflowManager, define_config

ROOT = Path(__file__).resolve().parents[1]


def python_m(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The command as `python -m sonamu_tasks`, with this interpreter: no PATH lookup."""
    return subprocess.run(
        [sys.executable, "-m", "sonamu_tasks", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_python_m_sonamu_tasks_is_the_command() -> None:
    helped = python_m("--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("Usage: sonamu-tasks ")
    commands = ("worker", "run", "runs", "show", "send", "emit", "get-event", "fork", "cancel", "dashboard", "migrate")
    for command in commands:
        assert f"\n  {command} " in helped.stdout


def test_python_m_sonamu_tasks_refuses_a_bad_argument() -> None:
    refused = python_m("--no-such-option")
    assert refused.returncode == 2
    assert "No such option" in refused.stderr and "Traceback" not in refused.stderr


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """A migrated SQLite database of its own, so that no migration log joins an error on stderr."""
    env = {**os.environ, "SONAMU_TASKS_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    env.pop("SONAMU_TASKS_CONFIG", None)
    migrated = python_m("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    return env


SOME_RUN = "0190b7e2-5c3a-7d1e-8f00-1234567890ab"
SEND = ["send", SOME_RUN, "--topic", "approval"]

BAD_ARGUMENTS = [
    (["show", "junk"], "is not a run id"),
    (["show", "--", "-" * 36], "is not a run id"),
    (["cancel", "0190b7e2-5c3a-7d1e-8f00-zzzzzzzzzzzz"], "is not a run id"),
    (["runs", "--cursor", "junk"], "is not a run id"),
    (["runs", "--parent", "junk"], "is not a run id"),
    (["runs", "--parent", "-" * 36], "is not a run id"),
    (["runs", "--limit", "0"], "--limit"),
    (["runs", "--limit", "1001"], "--limit"),
    (["runs", "--limit", "abc"], "--limit"),
    (["runs", "--status", "finished"], "--status"),
    (["runs", "--since", "last tuesday"], "--since"),
    (["run", "confirm_order", "--start-at", "2026-01-31T09:00:00"], "has no timezone"),
    (["run", "confirm_order", "--start-at", "10 minutes"], "is neither a duration"),
    (["run", "confirm_order", "--deadline", "soon"], "is neither a duration"),
    (["run", "confirm_order", "--input", "{order_id: 7}"], "not valid JSON"),
    (["run", "confirm_order", "--wait", "--timeout", "-1"], "--timeout"),
    (["run", "confirm_order", "--version", " "], "workflow version must not be blank"),
    (["run", "confirm_order", "--version", "v" * 201], "workflow version is 201 characters long"),
    (["run", "confirm_order", "--idempotency-key", " "], "idempotency_key must not be blank"),
    (["run", "confirm_order", "--idempotency-key", "k" * 256], "idempotency_key is 256 characters long"),
    (["run", " "], "workflow name must not be blank"),
    (["dashboard", "--port", "0"], "--port"),
    (["show"], "Missing argument"),
    (["send", "junk", "--topic", "t", "--message", "1"], "is not a run id"),
    (["send", SOME_RUN, "--message", "1"], "Missing option '--topic'"),
    (["send", SOME_RUN, "--topic", "t"], "Missing option '--message'"),
    (["send", SOME_RUN, "--topic", "", "--message", "1"], "topic must not be blank"),
    (["send", SOME_RUN, "--topic", "a\tb", "--message", "1"], "topic holds the character '\\t'"),
    (["send", SOME_RUN, "--topic", "t" * 256, "--message", "1"], "topic is 256 characters long"),
    ([*SEND, "--message", "{approved: true}"], "not valid JSON"),
    ([*SEND, "--message", "NaN"], "cannot be stored as JSON"),
    ([*SEND, "--message", '"\\u0000"'], "holds NUL"),
    ([*SEND, "--message", "1", "--idempotency-key", " "], "idempotency_key must not be blank"),
    (["emit", "order.paid", "--payload", "{"], "not valid JSON"),
    (["emit", "order.paid"], "Missing option '--payload'"),
    (["emit", " ", "--payload", "1"], "event name must not be blank"),
    (["emit", "order.paid", "--key", "", "--payload", "1"], "event key must not be blank"),
    (["get-event", "junk", "progress"], "is not a run id"),
    (["get-event", SOME_RUN, ""], "event key must not be blank"),
    (["get-event", SOME_RUN, "progress", "--timeout", "-1"], "--timeout"),
    (["runs", "--version", " "], "workflow version must not be blank"),
    (["runs", "--stranded", "--workflow", "w"], "--stranded lists every version; it takes no --workflow"),
    (["runs", "--stranded", "--status", "pending", "--limit", "5"], "it takes no --status, --limit"),
    (["runs", "--stale-after", "5"], "--stale-after goes with --stranded"),
    (["runs", "--stranded", "--stale-after", "-1"], "--stale-after"),
    (["fork", SOME_RUN], "Missing option '--from-step'"),
    (["fork", "junk", "--from-step", "charge"], "is not a run id"),
    (["fork", SOME_RUN, "--from-step", " "], "step name must not be blank"),
    (["fork", SOME_RUN, "--from-step", "charge", "--version", "a\tb"], "workflow version holds the character"),
    (["fork", SOME_RUN, "--from-step", "charge", "--version", "2", "--to-version", "3"], "disagree; give one"),
    (["fork", SOME_RUN, "--from-step", "charge", "--dry-run"], "--dry-run select many runs"),
    # Acting on many runs needs both --workflow and --version: never every run, nor every version, by a slip.
    (["cancel"], "give a RUN_ID, or both --workflow and --version to cancel many runs at once"),
    (["cancel", "--workflow", "checkout"], "(missing --version); an unscoped cancel is refused"),
    (["cancel", "--version", "1", "--dry-run"], "(missing --workflow); an unscoped cancel is refused"),
    (["cancel", "--status", "pending"], "(missing --workflow and --version)"),
    (["cancel", "--workflow", "checkout", "--version", "1", "--status", "done"], "--status"),
    (["cancel", SOME_RUN, "--workflow", "checkout"], "--workflow select many runs"),
    (["fork", "--from-step", "charge", "--to-version", "2"], "(missing --workflow and --version)"),
    (["fork", "--workflow", "checkout", "--from-step", "charge", "--to-version", "2"], "(missing --version)"),
    (["fork", "--workflow", "checkout", "--version", "1", "--from-step", "charge"], "needs --to-version V"),
]


@pytest.mark.parametrize(("args", "says"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_and_exit_2(
    sqlite_env: dict[str, str], tmp_path: Path, args: list[str], says: str
) -> None:
    done = python_m(*args, env=sqlite_env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert_one_error_line(done, says)


def test_a_run_that_does_not_exist_is_one_line_and_exit_1(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    commands = [[name] for name in ("show", "cancel", "pause", "resume", "retry")]
    commands += [["send", "--topic", "t", "--message", "1"], ["get-event", "--timeout", "1"]]
    commands += [["fork", "--from-step", "charge"], ["fork", "--from-step", "charge", "--version", "2", "--json"]]
    commands += [["cancel", "--json"]]
    for command, *options in commands:
        key = ["progress"] if command == "get-event" else []
        done = python_m(command, "0190B7E2-5C3A-7D1E-8F00-1234567890AB", *key, *options, env=sqlite_env, cwd=tmp_path)
        assert done.returncode == 1, (command, done.stderr)
        assert_one_error_line(done, "no run with id 0190b7e2-5c3a-7d1e-8f00-1234567890ab")


def test_a_command_about_stored_runs_does_not_create_a_database_at_a_mistyped_path(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "tasks.db"
    env = {**os.environ, "SONAMU_TASKS_DATABASE_URL": f"sqlite:///{missing}"}
    some_run = "0190b7e2-5c3a-7d1e-8f00-1234567890ab"
    commands = [["runs"], ["show", some_run], ["workers", "--json"], ["queues"], ["schedules"]]
    commands += [["purge", "--older-than", "30d"], ["purge", "--older-than", "30d", "--dry-run"]]
    for args in commands:
        done = python_m(*args, env=env, cwd=tmp_path)
        assert done.returncode == 1, (args, done.stderr)
        assert_one_error_line(done, f"no database at {missing}: nothing has used it yet")
    assert not missing.exists() and not missing.parent.exists()
    created = python_m("migrate", env={**env, "SONAMU_TASKS_DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}"})
    assert created.returncode == 0, created.stderr  # a command that may create it still does


async def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    """`sonamu-tasks runs | head -1`: once the reader is gone, the command stops without an error line or a
    traceback, exit 1 (click's, and Python's, for EPIPE)."""
    config = define_config(database_url=sqlite_env["SONAMU_TASKS_DATABASE_URL"], tasks={"enable_worker": False})
    async with WorkflowManager(config) as manager:
        await manager.run_many({"name": "filler", "version": "1"}, [{}] * 30)
    for args in (["runs"], ["runs", "--json"], ["workers"]):
        command = subprocess.Popen(
            [sys.executable, "-m", "sonamu_tasks", *args],
            cwd=tmp_path,
            env=sqlite_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert command.stdout is not None and command.stderr is not None
        # Gone before the first line is written: a pipe may hold a whole page of output, so a reader that
        # leaves after reading some would not always be left while the command still writes.
        command.stdout.close()
        stderr = command.stderr.read().decode()
        assert command.wait(timeout=60) == 1, (args, stderr)
        assert stderr == "", args


def assert_one_error_line(done: subprocess.CompletedProcess[str], says: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert says in lines[0], done.stderr
    assert done.stdout == ""
