"""Fixtures: a real PostgreSQL for the whole session, a fresh schema per test, managers to run workflows."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest

from sonamu_tasks import Config, WorkflowManager, define_config
from sonamu_tasks.testing import PgBouncer, PgBouncerNotInstalled, PostgresCluster, PostgresNotInstalled

BACKENDS = ["postgres", "sqlite"]
# PostgreSQL through PgBouncer in each pool mode: the behaviour suite runs on these too (tests/test_behaviour.py).
PGBOUNCER_BACKENDS = ["postgres-pgbouncer-session", "postgres-pgbouncer-transaction"]


SHARED_MEMORY = "/dev/shm"
ROOM_NEEDED = 2 * 1024**3  # the suite's files take a few hundred MB at most; leave memory to the rest
_IN_MEMORY = pytest.StashKey[str]()  # the base directory this session made in SHARED_MEMORY, removed at its end


def pytest_configure(config: pytest.Config) -> None:
    """The tests' files (SQLite databases, worker logs) in memory when the machine has /dev/shm, as the test
    cluster runs with fsync off: what the tests check is behaviour, and this disk's fsync (p99 200 ms) made the
    SQLite half of the suite about 40% slower without changing what a test sees (a kill -9 keeps the page cache
    either way). `--basetemp` given on the command line wins."""
    if (
        config.option.basetemp is None
        and os.access(SHARED_MEMORY, os.W_OK)
        and shutil.disk_usage(SHARED_MEMORY).free >= ROOM_NEEDED  # a container's 64 MB /dev/shm would fill up
    ):
        config.option.basetemp = tempfile.mkdtemp(prefix="sonamu-tests-", dir=SHARED_MEMORY)
        config.stash[_IN_MEMORY] = config.option.basetemp


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Captured output with a lone surrogate (tests/test_limits.py logs a user's error holding one) is escaped:
    pytest-xdist sends each report to the controller as UTF-8, and a report it cannot encode stops the worker."""
    outcome: Any = yield
    report = outcome.get_result()
    report.sections = [(title, _encodable(text)) for title, text in report.sections]


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_IN_MEMORY, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("SONAMU_TASKS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    try:
        cluster = PostgresCluster(fsync=False)
    except PostgresNotInstalled as error:
        pytest.exit(str(error), returncode=3)
    with cluster:
        yield cluster.url


def _pgbouncer(postgres_url: str, pool_mode: str) -> Iterator[PgBouncer]:
    try:
        bouncer = PgBouncer(postgres_url, pool_mode=pool_mode)
    except PgBouncerNotInstalled as error:
        pytest.skip(str(error))
    with bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def pgbouncer_session(postgres_url: str) -> Iterator[PgBouncer]:
    """PgBouncer (pool_mode = session) in front of the session's PostgreSQL, started when first asked for."""
    yield from _pgbouncer(postgres_url, "session")


@pytest.fixture(scope="session")
def pgbouncer_transaction(postgres_url: str) -> Iterator[PgBouncer]:
    """PgBouncer (pool_mode = transaction) in front of the session's PostgreSQL."""
    yield from _pgbouncer(postgres_url, "transaction")


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def connection_settings(
    backend_name: str, postgres_url: str, tmp_path: Any, request: pytest.FixtureRequest
) -> dict[str, Any]:
    """The config's connection options for this backend: database_url, and listen_url and pool_mode through
    PgBouncer in transaction mode (LISTEN and the retention lock go to the server directly)."""
    if backend_name == "postgres":
        return {"database_url": postgres_url}
    if backend_name == "sqlite":
        return {"database_url": f"sqlite:///{tmp_path / 'sonamu_tasks.db'}"}
    mode = backend_name.removeprefix("postgres-pgbouncer-")
    bouncer: PgBouncer = request.getfixturevalue(f"pgbouncer_{mode}")
    if mode == "transaction":
        return {"database_url": bouncer.url, "listen_url": postgres_url, "pool_mode": "transaction"}
    return {"database_url": bouncer.url}


@pytest.fixture
def database_url(connection_settings: dict[str, Any]) -> str:
    return str(connection_settings["database_url"])


@pytest.fixture
def schema(backend_name: str, postgres_url: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    if backend_name.startswith("postgres"):
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(connection_settings: dict[str, Any], schema: str) -> ConfigFactory:
    """A config on this test's database and schema; keyword arguments are worker options."""

    def make(*, enable_worker: bool = True, context_provider: Any = None, **worker_options: Any) -> Config:
        options = {"listen_delay": 0, "lease_ms": 2000, **worker_options}
        options.setdefault("concurrency", 4)
        return define_config(
            **connection_settings,
            schema=schema,
            tasks={
                "enable_worker": enable_worker,
                "worker_options": options,
                "context_provider": context_provider,
            },
        )

    return make


@pytest.fixture
async def manager_for(make_config: ConfigFactory) -> AsyncIterator[Callable[..., Any]]:
    """`await manager_for(workflows, **worker_options)` -> a started WorkflowManager, stopped afterwards."""
    started: list[WorkflowManager] = []

    async def start(workflows: list[Any] = [], **options: Any) -> WorkflowManager:  # noqa: B006
        manager = WorkflowManager(make_config(**options), workflows=workflows)
        await manager.start()
        started.append(manager)
        return manager

    yield start
    for manager in reversed(started):
        await manager.stop()


async def wait_until(condition: Callable[[], Any], *, timeout: float = 15, what: str = "condition") -> Any:
    """Poll `condition` (sync or async) until it is truthy; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
