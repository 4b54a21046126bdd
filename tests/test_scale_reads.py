"""Reads that must not grow with the runs they do not return: a retention batch reads only its workflow's
expired runs, a filtered runs list only the runs it shows (PostgreSQL; SQLite's plans are checked in
test_sqlite_backend.py). And the creation-time filters, which now bound the id, list exactly the runs created in
their range on every backend."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from sonamu_tasks import WorkflowManager, define_config
from sonamu_tasks.backends.base import FinishedRuns, RunQuery
from sonamu_tasks.backends.postgres.backend import QUERIES, list_params, selection_params

# 35,000 runs of `other` (1 in 50 failed) and 5,000 of `target` (none failed), all finished and created 10 days
# ago (ids of that time, as run() makes them). Analyzed: the planner knows what each index holds.
SEED = """
INSERT INTO runs (id, workflow_name, version, status, created_at, started_at, finished_at, updated_at)
SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7' || substr(h, 1, 3) || '8'
        || substr(h, 4, 15))::uuid,
       CASE WHEN i % 8 = 0 THEN 'target' ELSE 'other' END, '1',
       CASE WHEN i % 50 = 1 THEN 'failed' ELSE 'completed' END, ts, ts, ts, ts
FROM (SELECT i, now() - interval '10 days' + i * interval '1 ms' AS ts, md5(i::text) AS h
      FROM generate_series(1, 40000) i) s;
ANALYZE runs;
"""


@pytest.fixture
def seeded(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:

        async def migrate() -> None:
            config = define_config(database_url=postgres_url, schema=schema, tasks={"enable_worker": False})
            async with WorkflowManager(config) as manager:
                await manager.migrate()

        asyncio.run(migrate())
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute(SEED.encode())
        yield conn
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _runs_read(conn: psycopg.Connection[Any], query: str, params: dict[str, Any], alias: str) -> tuple[int, int]:
    """(runs returned by the scans of `runs` as `alias` in the statement's plan, runs they read and dropped), from
    EXPLAIN ANALYZE in a transaction rolled back (a DELETE deletes nothing)."""
    with conn.transaction(force_rollback=True):
        cursor = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}".encode(), params)
        (plan,) = cursor.fetchone() or [None]
    returned = dropped = 0
    nodes = [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") == "runs" and node.get("Alias") == alias:
            assert node["Node Type"] != "Seq Scan", node
            loops = node["Actual Loops"]
            returned += node["Actual Rows"] * loops
            dropped += node.get("Rows Removed by Filter", 0) * loops
    return returned, dropped


def test_a_retention_batch_reads_only_its_workflows_expired_runs(seeded: psycopg.Connection[Any]) -> None:
    """A batch for `target` reads its own runs, not the 35,000 runs of `other` kept meanwhile (which it
    walked past, again at every batch, reading runs_finished by finish time alone)."""
    selection = FinishedRuns(timedelta(days=1), workflow="target")
    returned, dropped = _runs_read(
        seeded, QUERIES["delete_finished_runs"], {**selection_params(selection), "limit": 500}, "r"
    )
    assert dropped == 0
    assert returned == 500
    names = [row[0] for row in seeded.execute(QUERIES["finished_workflows"]).fetchall()]
    assert names == ["other", "target"]


@pytest.mark.parametrize(
    "query",
    [
        RunQuery(workflow="target", statuses=("failed",)),
        RunQuery(created_before=datetime.now(UTC) - timedelta(days=11)),
    ],
    ids=["workflow-and-status", "created-before"],
)
def test_a_filtered_runs_list_with_no_match_reads_no_run(seeded: psycopg.Connection[Any], query: RunQuery) -> None:
    """No run matches: the list reads none, where it walked all 40,000 by id (the dashboard refreshes it every
    second)."""
    assert _runs_read(seeded, QUERIES["list_runs"], list_params(query), "runs") == (0, 0)


async def test_creation_time_filters_list_exactly_the_runs_created_in_their_range(
    manager_for: Any, backend_name: str, database_url: str, schema: str
) -> None:
    """Runs whose id was made up to half an hour away from their created_at (a client's clock off the
    database's) are still listed by created_at, and so is a child, whose id is its parent's, days before."""
    manager: WorkflowManager = await manager_for([], enable_worker=False)
    now = datetime.now(UTC)
    made = {}
    for hours_ago, id_offset in [(30, -0.5), (20, 0.5), (10, 0.0), (2, 0.4), (1, -72.0)]:
        created = now - timedelta(hours=hours_ago)
        run_id = _id_at(created + timedelta(hours=id_offset))
        made[hours_ago] = run_id
        _insert(backend_name, database_url, schema, run_id, created)
    page = await manager.list_runs(created_after=now - timedelta(hours=21), created_before=now - timedelta(hours=2))
    assert [run.id for run in page.items] == [made[10], made[20]]
    page = await manager.list_runs(created_after=now - timedelta(hours=2, minutes=1))
    assert [run.id for run in page.items] == [made[2], made[1]]
    page = await manager.list_runs(created_before=now - timedelta(hours=29))
    assert [run.id for run in page.items] == [made[30]]
    # The end of time, a common way to say "no bound", lists everything (its one-hour margin overflowed).
    page = await manager.list_runs(created_before=datetime.max.replace(tzinfo=UTC))
    assert len(page.items) == 5


def _id_at(moment: datetime) -> str:
    millis = int(moment.timestamp() * 1000)
    return str(uuid.UUID(f"{millis:012x}7{uuid.uuid4().hex[13:16]}8{uuid.uuid4().hex[17:]}"))


def _insert(backend_name: str, url: str, schema: str, run_id: str, created: datetime) -> None:
    if backend_name == "postgres":
        with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
            conn.execute(
                "INSERT INTO runs (id, workflow_name, version, status, created_at)"
                " VALUES (%s, 'w', '1', 'pending', %s)",
                [run_id, created],
            )
        return
    micros = int(created.timestamp() * 1_000_000)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        conn.execute(
            "INSERT INTO runs (id, workflow_name, version, status, input, available_at, created_at, updated_at)"
            " VALUES (?, 'w', '1', 'pending', ?, ?, ?, ?)",
            [run_id, json.dumps(None), micros, micros, micros],
        )
