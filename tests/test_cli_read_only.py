"""The commands that only read start a read-only manager: they work with a role that may only read, create no
schema, do not migrate an older one, and say a database that does not answer is unavailable."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from sonamu_tasks import ConfigError, Queue, WorkflowManager, define_config, workflow
from sonamu_tasks.backends.postgres.queries import migrations
from sonamu_tasks.backends.sqlite.backend import MIGRATIONS
from sonamu_tasks.testing import PostgresCluster, PostgresNotInstalled

from .conftest import wait_until
from .support.roles import grant_reading, reader_role

SOME_RUN = "0190b7e2-5c3a-7d1e-8f00-1234567890ab"


@workflow(version="1", queue=Queue("reports", concurrency=2))
async def report(input: Any, step: Any) -> str:
    await step.set_event("progress", {"done": 1})
    return f"report {input}"


def sonamu_tasks(tmp_path: Path, database_url: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command, as an operator runs it, with a `sonamu_config.py` of the test's database and schema."""
    settings = f"database_url={database_url!r}" + ("" if database_url.startswith("sqlite:") else f", schema={schema!r}")
    (tmp_path / "sonamu_config.py").write_text(
        f"from sonamu_tasks import define_config\nconfig = define_config({settings})\n"
    )
    env = {**os.environ}
    for name in ("SONAMU_TASKS_CONFIG", "SONAMU_TASKS_DATABASE_URL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "sonamu_tasks", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command prints (no traceback, nothing on stdout)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


READING = [
    ["runs"],
    ["runs", "--stranded"],
    ["show", SOME_RUN],
    ["workers"],
    ["queues"],
    ["schedules"],
    ["get-event", SOME_RUN, "progress", "--timeout", "0"],
    ["cancel", "--workflow", "report", "--version", "1", "--dry-run"],
    ["fork", "--workflow", "report", "--version", "1", "--from-step", "s", "--to-version", "2", "--dry-run"],
    ["purge", "--older-than", "30d", "--dry-run"],
]


@pytest.fixture
def reader(postgres_url: str) -> Iterator[str]:
    """A role that may only read the test's schema (granted by `grant_reading`): the URL it connects with."""
    with reader_role(postgres_url) as url:
        yield url


async def test_a_role_that_may_only_read_runs_the_reading_commands(
    backend_name: str, make_config: Any, postgres_url: str, schema: str, reader: str, tmp_path: Path
) -> None:
    if backend_name != "postgres":
        pytest.skip("roles and privileges are PostgreSQL's")
    async with WorkflowManager(make_config(), workflows=[report]) as manager:
        handle = await manager.run(report, "march")
        assert await handle.result(timeout=15) == "report march"
        worker_id = manager.worker.id if manager.worker else ""
        grant_reading(postgres_url, schema, reader)

        async def read(*args: str) -> str:  # in a thread: the worker's event loop goes on meanwhile
            done = await asyncio.to_thread(sonamu_tasks, tmp_path, reader, schema, *args)
            assert done.returncode == 0, (args, done.stderr)
            assert "secret" not in done.stdout + done.stderr
            return done.stdout

        listed = json.loads(await read("runs", "--json"))["items"]
        assert [(run["id"], run["status"]) for run in listed] == [(handle.id, "completed")]
        assert handle.id in await read("runs", "--limit", "3")
        shown = await read("show", handle.id)
        assert "status    completed" in shown and "report march" in shown
        assert [w["id"] for w in json.loads(await read("workers", "--json"))] == [worker_id]
        assert "reports" in [q["name"] for q in json.loads(await read("queues", "--json"))]
        assert await read("schedules") == "no schedules\n"
        assert json.loads(await read("get-event", handle.id, "progress")) == {"done": 1}
        assert "no stranded runs" in await read("runs", "--stranded")
        assert "nothing to cancel" in await read("cancel", "--workflow", "report", "--version", "1", "--dry-run")
        fork = ["fork", "--workflow", "report", "--version", "1", "--status", "completed", "--from-step", "s"]
        assert "dry run" in await read(*fork, "--to-version", "2", "--dry-run")


@workflow(version="1")
async def reports_when_told(input: Any, step: Any) -> str:
    await step.receive("go", topic="go", timeout="1m")
    await step.set_event("progress", {"done": 1})
    return "told"


async def test_a_role_that_may_only_read_waits_for_an_event_and_a_result_set_later(
    backend_name: str, make_config: Any, postgres_url: str, schema: str, reader: str, tmp_path: Path
) -> None:
    """Waiting asks other processes' workers to notify it (a write); a read-only manager reads again instead."""
    if backend_name != "postgres":
        pytest.skip("roles and privileges are PostgreSQL's")
    async with WorkflowManager(make_config(), workflows=[reports_when_told]) as manager:
        handle = await manager.run(reports_when_told)
        grant_reading(postgres_url, schema, reader)
        # Not set until the run is told: each of these waits, then times out.
        unset = await asyncio.to_thread(
            sonamu_tasks, tmp_path, reader, schema, "get-event", handle.id, "progress", "--timeout", "0.5"
        )
        assert unset.returncode == 1 and "did not set event 'progress' within 0.5s (it is waiting)" in unset.stderr
        reading = define_config(database_url=reader, schema=schema, tasks={"enable_worker": False})
        async with WorkflowManager(reading, read_only=True) as reader_manager:
            assert await reader_manager.get_event(handle.id, "progress", timeout=0.5) is None
            result = asyncio.create_task(reader_manager.handle(handle.id).result(timeout=30))
            event = asyncio.create_task(reader_manager.get_event(handle.id, "progress", timeout=30))
            await manager.send(handle.id, "now", topic="go")
            assert await result == "told"
            assert await event == {"done": 1}


async def test_a_reading_command_creates_no_schema(
    backend_name: str, database_url: str, postgres_url: str, schema: str, tmp_path: Path
) -> None:
    """A mistyped schema (or a SQLite file no sonamu-tasks process used) is said, and left as it was."""
    if backend_name == "sqlite":
        Path(database_url.removeprefix("sqlite:///")).touch()  # a file of another tool, or an empty one
        where = f"SQLite database {database_url.removeprefix('sqlite:///')}"
    else:
        where = f"PostgreSQL schema {schema!r}"
    for args in READING:
        said = error_line(sonamu_tasks(tmp_path, database_url, schema, *args))
        assert where in said and "has no sonamu-tasks tables" in said, args
        assert "Nothing was created" in said and "`sonamu-tasks migrate`" in said, args
    if backend_name == "sqlite":
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    else:
        with psycopg.connect(postgres_url) as conn:
            found = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [schema]).fetchone()
            assert found == (0,)


async def test_a_reading_command_on_an_older_schema_names_the_migrations_it_lacks(
    backend_name: str, make_config: Any, database_url: str, postgres_url: str, schema: str, tmp_path: Path
) -> None:
    async with WorkflowManager(make_config(enable_worker=False)):
        pass
    last = (migrations() if backend_name == "postgres" else MIGRATIONS)[-1][0]
    forget = "DELETE FROM migrations WHERE name = ?"  # as if this release's last migration was not applied yet
    if backend_name == "postgres":
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            conn.execute(forget.replace("?", "%s"), [last])
    else:
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.execute(forget, [last])
    for args in READING:
        said = error_line(sonamu_tasks(tmp_path, database_url, schema, *args))
        assert "is older than this release of sonamu-tasks: 1 migration(s) not applied" in said, args
        assert f"({last})" in said and "Run `sonamu-tasks migrate`" in said, args
    with pytest.raises(ConfigError, match=f"1 migration\\(s\\) not applied \\({last}\\)"):
        async with WorkflowManager(make_config(), read_only=True):
            pass

    # Migrated again, and by a newer release too (a rolling deploy: this command is the older one): read, and said.
    newer = [last, "9999_from_a_newer_release"]
    if backend_name == "postgres":
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'INSERT INTO "{schema}".migrations (name) SELECT unnest(%s::text[])', [newer])
    else:
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.executemany("INSERT INTO migrations (name, applied_at) VALUES (?, 0)", [[name] for name in newer])
    read = sonamu_tasks(tmp_path, database_url, schema, "runs")
    assert read.returncode == 0 and read.stdout == "no runs\n", read.stderr
    assert "9999_from_a_newer_release" in read.stderr and "a newer release migrated it" in read.stderr


async def test_a_reading_command_says_the_database_is_unavailable(tmp_path: Path) -> None:
    """Not "could not migrate": the database is down, and where it is (without the password)."""
    try:
        cluster = PostgresCluster(fsync=False)
    except PostgresNotInstalled as error:
        pytest.skip(f"stopping a server needs local PostgreSQL binaries: {error}")
    with cluster:
        url = cluster.url.replace("postgres@", "postgres:secret@", 1)
        async with WorkflowManager(define_config(database_url=url, tasks={"enable_worker": False})):
            pass
        cluster.stop()
        await wait_until(lambda: not cluster.is_running(), what="the server to stop")
        said = error_line(sonamu_tasks(tmp_path, url, "sonamu_tasks", "workers"))
    assert said.startswith("Error: the database is unavailable: no answer within 10s"), said
    assert f"PostgreSQL at 127.0.0.1:{cluster.port}/postgres" in said and "secret" not in said
    assert "migrate" not in said


def test_a_reading_command_leaves_another_tools_sqlite_file_as_it_was(tmp_path: Path) -> None:
    """Read-only means the file too: not switched to WAL, not made a database when empty, and a file that is not
    SQLite at all is said to be so."""
    other = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE orders (id integer)")
        conn.commit()
    empty, text = tmp_path / "empty.db", tmp_path / "notes.db"
    empty.touch()
    text.write_text("not a database")
    before = {path: path.read_bytes() for path in (other, empty, text)}
    for path in (other, empty):
        said = error_line(sonamu_tasks(tmp_path, f"sqlite:///{path}", "unused", "runs"))
        assert "has no sonamu-tasks tables" in said and "Nothing was created" in said
    said = error_line(sonamu_tasks(tmp_path, f"sqlite:///{text}", "unused", "runs"))
    assert f"{text} is not a SQLite database" in said
    assert {path: path.read_bytes() for path in before} == before
    with contextlib.closing(sqlite3.connect(other)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


async def test_a_role_missing_its_grants_is_told_which(
    backend_name: str, make_config: Any, postgres_url: str, schema: str, reader: str, tmp_path: Path
) -> None:
    """Without USAGE the schema is not in the role's search path: said as the grant it lacks, not as a table
    that is not there."""
    if backend_name != "postgres":
        pytest.skip("roles and privileges are PostgreSQL's")
    async with WorkflowManager(make_config(enable_worker=False)):
        pass
    role = urlsplit(reader).username
    for granted in ([], [f'GRANT USAGE ON SCHEMA "{schema}" TO {role}']):
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for grant in granted:
                conn.execute(grant)
        said = error_line(sonamu_tasks(tmp_path, reader, schema, "runs"))
        assert f"role '{role}' may not read schema '{schema}'" in said, said
        assert f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"' in said and "GRANT SELECT ON ALL TABLES" in said
    grant_reading(postgres_url, schema, reader)
    assert sonamu_tasks(tmp_path, reader, schema, "runs").returncode == 0
