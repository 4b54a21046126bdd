"""Claim cost as finished runs pile up: it must stay flat (PostgreSQL only).

    python -m benchmarks.claim_scale [--sizes 0,100000,1000000] [--pending 300] [--workflows 2000] [--url URL]

For each size, in a fresh schema: that many completed runs are bulk-inserted (one INSERT ... SELECT from
generate_series, time-ordered UUIDv7-shaped ids; an insert sends no NOTIFY since migration 0013), then
ANALYZE. Then:
  - `--pending` due runs of a workflow no worker serves are inserted, and claimed one at a time through
    `backend.claim_runs(..., limit=1)` of a manager without a worker, after 20 uncounted warm-up claims:
    p50/p99 per claim, and claims/s;
  - one worker process (concurrency 16, listen_delay 0) is started and warmed up with one run, then
    `--workflows` pending 1-step runs are inserted in one statement: workflows/s from that insert until
    the last is finished.
Finally the ratio of the largest size's claim p50 to the empty table's.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_common import (
    arguments,
    client_config,
    database,
    new_schema,
    percentile,
    report,
    report_percentiles,
    start_workers,
    stop_workers,
    wait_until_finished,
)
from sonamu_tasks import WorkflowManager

PROBE = ("claim_probe", "1")  # claimed by hand below; no worker registers it
WARM_UP = 20  # claims not counted: the pool's connections, psycopg's prepared statements
CONCURRENCY = 16

# `count` runs with UUIDv7-shaped ids (48-bit millisecond time, version 7, variant 8, random rest), one
# millisecond apart, the last `ago` before now: the same shape and order as the engine's own ids.
INSERT_RUNS = """
INSERT INTO runs (id, workflow_name, version, status, input, output, available_at, created_at, started_at,
                  finished_at, updated_at)
SELECT overlay(overlay(overlay(md5(random()::text)
           PLACING lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0') FROM 1 FOR 12)
           PLACING '7' FROM 13 FOR 1) PLACING '8' FROM 17 FOR 1)::uuid,
       %(workflow)s, %(version)s, %(status)s, %(input)s::jsonb, %(output)s::jsonb, t, t,
       CASE WHEN %(status)s = 'completed' THEN t END, CASE WHEN %(status)s = 'completed' THEN t END, t
FROM (SELECT now() - %(ago)s::interval - (%(count)s - i) * interval '1 ms' AS t
      FROM generate_series(1, %(count)s) AS i) AS s
"""


async def insert_runs(
    conn: psycopg.AsyncConnection[Any], count: int, workflow: tuple[str, str], status: str, ago: timedelta
) -> None:
    params = {
        "workflow": workflow[0],
        "version": workflow[1],
        "status": status,
        "input": '{"steps": 1}',
        "output": "1" if status == "completed" else None,
        "ago": ago,
        "count": count,
    }
    await conn.execute(INSERT_RUNS, params)


async def fill_finished(conn: psycopg.AsyncConnection[Any], count: int) -> None:
    """`count` completed runs that ended before yesterday, then ANALYZE."""
    async with conn.transaction():
        await insert_runs(conn, count, ("steps", "1"), "completed", timedelta(days=1))
    await conn.execute("ANALYZE runs")


async def one_size(url: str, size: int, pending: int, workflows: int) -> float:
    """Measure at one table size; return the claim p50 in seconds."""
    schema = new_schema()
    labels = {"backend": "postgres", "finished_runs": size}
    async with (
        WorkflowManager(client_config(url, schema)) as client,
        await psycopg.AsyncConnection.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn,
    ):
        began = time.perf_counter()
        await fill_finished(conn, size)
        report("claim_scale.fill_time", time.perf_counter() - began, "s", **labels)

        await insert_runs(conn, WARM_UP + pending, PROBE, "pending", timedelta(seconds=1))
        worker_id = f"claim-scale-{uuid.uuid4().hex[:8]}"
        claims: list[float] = []
        for _ in range(WARM_UP + pending):
            began = time.perf_counter()
            claimed = await client.backend.claim_runs(worker_id, [PROBE], 1, timedelta(minutes=10))
            claims.append(time.perf_counter() - began)
            assert len(claimed) == 1, "a pending run was not claimed"
        claims = claims[WARM_UP:]
        report_percentiles("claim_scale.claim", claims, (50, 99), **labels)
        report("claim_scale.claims_per_s", len(claims) / sum(claims), "claims/s", **labels)
        await conn.execute(
            "UPDATE runs SET status = 'completed', finished_at = now() WHERE workflow_name = %s", [PROBE[0]]
        )

        workers = start_workers(url, schema, 1, concurrency=CONCURRENCY, listen_delay=0)
        try:
            await (await client.run({"name": "steps", "version": "1"}, {"steps": 1})).result(timeout=60)  # warm-up
            began = time.perf_counter()
            await insert_runs(conn, workflows, ("steps", "1"), "pending", timedelta(0))
            await wait_until_finished(client, timeout_s=600)
            elapsed = time.perf_counter() - began
        finally:
            stop_workers(workers)
        report("claim_scale.workflows_per_s", workflows / elapsed, "workflows/s", S=1, processes=1, **labels)
    return percentile(claims, 50)


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--sizes", default="0,100000,1000000", help="finished runs in the table, per round")
    parser.add_argument("--pending", type=int, default=300, help="single claims measured per size")
    parser.add_argument("--workflows", type=int, default=2000, help="1-step runs processed per size")
    args = parser.parse_args()
    if args.sqlite:
        parser.error("claim_scale measures PostgreSQL only")
    sizes = [int(s) for s in args.sizes.split(",")]
    p50s: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for size in sizes:
            p50s[size] = await one_size(url, size, args.pending, args.workflows)
    if 0 in p50s and max(sizes) > 0:
        largest = max(sizes)
        report("claim_scale.p50_ratio", p50s[largest] / p50s[0], "x", backend="postgres", of=largest, to=0)


if __name__ == "__main__":
    asyncio.run(main())
