"""Upgrading a database: repairs of migrations edited after their commit, and a database newer than the code."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from sonamu_tasks import Queue, WorkflowManager, workflow
from sonamu_tasks.backends.base import NewRun
from sonamu_tasks.ids import new_run_id

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


async def test_workers_of_the_previous_release_still_claim_after_0023(
    make_config: Any, postgres_url: str, schema: str, backend_name: str
) -> None:
    """0023 added claim_runs and seconds_until_due overloads taking the lease tokens the worker holds. In a
    rolling deploy the previous release's workers call the old signatures: they still answer, holding nothing."""
    if backend_name != "postgres":
        pytest.skip("PostgreSQL's migrations")
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        run_id, _ = await manager.backend.create_run(NewRun(new_run_id(), "old", "1", "null"))
        await manager.backend.claim_runs("new-worker", [("old", "1")], 1, timedelta(milliseconds=100))
    await asyncio.sleep(0.2)  # the new worker's lease runs out
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        streams = (["default"], ["old"], ["1"])
        due = conn.execute("SELECT seconds_until_due(%s, %s, %s)", streams).fetchone()
        assert due is not None and due[0] <= 0
        claimed = conn.execute(
            "SELECT id, recoveries FROM claim_runs(%s, %s, %s, %s, %s, %s)",
            ("old-worker", *streams, 1, timedelta(seconds=30)),
        ).fetchall()
        assert claimed == [(run_id, 1)]
        due = conn.execute("SELECT seconds_until_due(%s, %s, %s)", streams).fetchone()
        assert due is not None and due[0] == pytest.approx(30, abs=5)
