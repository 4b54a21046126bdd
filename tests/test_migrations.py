"""Upgrading a database: repairs of migrations edited after their commit, and a database newer than the code."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import psycopg
import pytest

from sonamu_tasks import Queue, WorkflowManager, workflow

PAYMENTS = Queue("payments", per_key_concurrency=1)


@workflow(version="1", queue=PAYMENTS)
async def charge(input: Any) -> Any:
    return input


async def test_a_database_migrated_by_the_first_0012_gets_queue_lock_key_back(
    make_config: Any, postgres_url: str, schema: str, backend_name: str
) -> None:
    """0012 was edited after its first commit: a database migrated by that version had no queue_lock_key, which
    later migrations' functions call. Migration 0022 creates it again."""
    if backend_name != "postgres":
        pytest.skip("PostgreSQL's migrations")
    async with WorkflowManager(make_config(enable_worker=False), workflows=[charge]):
        pass
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # as the first 0012 left it
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute("DROP FUNCTION queue_lock_key(text)")
        conn.execute("DELETE FROM migrations WHERE name = '0022_repair_edited_migrations'")
    async with WorkflowManager(make_config(), workflows=[charge]) as manager:
        handles = [await manager.run(charge, n, concurrency_key="customer-1") for n in range(3)]
        assert [await handle.result(timeout=15) for handle in handles] == [0, 1, 2]


async def test_a_database_newer_than_the_code_is_named_in_a_warning(
    make_config: Any, database_url: str, postgres_url: str, schema: str, backend_name: str, caplog: Any
) -> None:
    async with WorkflowManager(make_config(enable_worker=False)):
        pass
    insert = "INSERT INTO migrations (name) VALUES ('9999_from_a_newer_release')"
    if backend_name == "postgres":
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            conn.execute(insert)
    else:
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_from_a_newer_release', 0)")
    with caplog.at_level(logging.WARNING):
        async with WorkflowManager(make_config(enable_worker=False)):
            pass
    warnings = [r.getMessage() for r in caplog.records if "does not have" in r.getMessage()]
    assert len(warnings) == 1 and "9999_from_a_newer_release" in warnings[0] and "newer release" in warnings[0]
