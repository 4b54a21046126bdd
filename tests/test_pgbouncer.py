"""PgBouncer in front of PostgreSQL: what the behaviour suite does not show (it runs through PgBouncer in both
modes itself, see tests/test_behaviour.py): a connection refused is reported with its reason, transaction
mode asks for a direct listen_url, and nothing of the engine's session state stays on pooled connections."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import psycopg
import pytest

from sonamu_tasks import ConfigError, WorkflowManager, define_config, workflow
from sonamu_tasks.testing import PgBouncer

from .conftest import wait_until


@workflow(version="1")
async def tiny(input: Any, step: Any) -> int:
    return int(await step.define("one", lambda: input).run())


async def test_a_connection_the_pooler_refuses_is_logged_with_its_reason(
    pgbouncer_session: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    refused = pgbouncer_session.url.replace("postgres@", "nobody@")  # a user PgBouncer does not know
    manager = WorkflowManager(define_config(database_url=refused, schema="refused"))
    caplog.set_level(logging.WARNING, logger="sonamu_tasks")
    starting = asyncio.create_task(manager.start())
    try:
        await wait_until(
            lambda: any("authentication failed" in record.getMessage() for record in caplog.records),
            what="the refusal's reason in the log",
        )
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await manager.stop()


def test_transaction_mode_needs_a_direct_listen_url() -> None:
    with pytest.raises(ConfigError, match="listen_url"):
        define_config(database_url="postgresql://app@pgbouncer/app", pool_mode="transaction")
    with pytest.raises(ConfigError, match="pool_mode"):
        define_config(database_url="postgresql://app@pgbouncer/app", pool_mode="statement")


async def test_transaction_mode_leaves_no_prepared_statement_or_search_path_on_server_connections(
    pgbouncer_transaction: PgBouncer, postgres_url: str
) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    config = define_config(
        database_url=pgbouncer_transaction.url,
        listen_url=postgres_url,
        pool_mode="transaction",
        schema=schema,
        tasks={"worker_options": {"listen_delay": 0, "concurrency": 4}},
    )
    async with WorkflowManager(config, workflows=[tiny]) as manager:
        handles = [await manager.run(tiny, i) for i in range(30)]  # psycopg would prepare after the 5th
        assert [await h.result(timeout=30) for h in handles] == list(range(30))
    # Every server connection PgBouncer holds: no statement prepared, the default search_path.
    with psycopg.connect(pgbouncer_transaction.url, autocommit=True, prepare_threshold=None) as conn:
        for _ in range(10):
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
            assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
