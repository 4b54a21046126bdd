"""The failover scenarios: a primary with a streaming standby, the primary's postmaster killed (`kill -9`)
mid-load and the standby promoted (`pg_ctl promote`) 1 s later; workers and the producer connected with a
multi-host URL (`target_session_attrs=read-write`) follow it.

* `failover`: a synchronous standby (`synchronous_standby_names`, `synchronous_commit` on). Must hold: nothing
  lost, no completed step re-run, every run completed.
* `failover_async`: an asynchronous standby whose WAL receiver is held (SIGSTOP) for the last `LAG_S` seconds
  before the crash, as a standby behind by that much: the commits of that window are lost with the old primary.
  Reported: the runs whose `run()` returned but that the new primary does not have (the caller's to start
  again, with its idempotency key), and the steps executed again because their checkpoint was lost (at least
  once holds). Must hold: every run the new primary has completes.

Both measure the time from the primary's death to the first run completed on the new primary, and how long
the producer's `run()` in flight at the crash took after the promotion.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import psycopg

from sonamu_tasks import WorkflowManager
from sonamu_tasks.testing import PostgresCluster, StandbyCluster
from sonamu_tasks.testing.postgres_cluster import failover_url

from . import workflows
from .runner import FINAL, Context, Summary, status_counts, tally, wait_for

OUTAGE_S = 1.0
LAG_S = 0.5


async def failover(ctx: Context, summary: Summary) -> None:
    await _scenario(ctx, summary, synchronous=True)


async def failover_async(ctx: Context, summary: Summary) -> None:
    await _scenario(ctx, summary, synchronous=False)


async def _scenario(ctx: Context, summary: Summary, *, synchronous: bool) -> None:
    with PostgresCluster(fsync=True) as primary, StandbyCluster(primary, synchronous=synchronous) as standby:
        url = failover_url(primary, standby)
        pair = Context(ctx.cluster, ctx.short, ctx.log_dir, engine_url=url, query_url=url)
        try:
            await _load(pair, summary, primary, standby, synchronous)
        finally:
            pair.stop_workers()


async def _load(
    ctx: Context, summary: Summary, primary: PostgresCluster, standby: StandbyCluster, synchronous: bool
) -> None:
    schema = ctx.schema_for("failover" if synchronous else "failover_async")
    count = 150 if ctx.short else 600
    work = {"steps": 4, "work_ms": 30}
    async with WorkflowManager(ctx.config(schema)) as producer:
        for i in range(3):
            ctx.worker(schema, f"w{i}", lease_ms=2000, poll_ms=60_000)  # after the failover only NOTIFY wakes them
        acknowledged = [(await producer.run(workflows.chain, work)).id for _ in range(count)]

        async def under_way() -> bool:
            rows = ctx.audit_query("SELECT count(*) FROM public.chaos_audit WHERE scenario = %s", [schema])
            return int(rows[0][0]) >= count  # about a quarter of the steps

        await wait_for(under_way, 60, "the load to be under way", interval=0.05)

        calls: list[tuple[float, float]] = []
        failures: list[str] = []
        stop = asyncio.Event()

        async def produce() -> None:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    acknowledged.append((await producer.run(workflows.chain, work)).id)
                except Exception as error:  # reported: a run() that raised during the failover
                    failures.append(repr(error)[:160])
                calls.append((began, time.monotonic()))
                await asyncio.sleep(0.02)

        producing = asyncio.create_task(produce())
        if not synchronous:
            # The WAL sender held: what the primary commits from now on never reaches the standby.
            os.kill(_wal_sender_pid(primary, standby), signal.SIGSTOP)
            await asyncio.sleep(LAG_S)
            lag = _lag_bytes(primary, standby)
            summary.details.append(f"replication lag at the crash: {lag} bytes of WAL ({LAG_S}s of load)")
        killed_at = await asyncio.to_thread(primary.kill_postmaster, with_children=True)  # the machine dies
        await asyncio.sleep(OUTAGE_S)  # an orchestrator's reaction time, not a wait for a condition
        await asyncio.to_thread(standby.promote)
        promoted, promoted_at = time.monotonic(), time.time()
        await wait_for(lambda: _after(calls, promoted), 30, "a run() after the promotion", interval=0.05)
        stop.set()
        await producing

        present = {str(r[0]) for r in ctx.query(f'SELECT id::text FROM "{schema}".runs')}
        vanished = [run_id for run_id in acknowledged if run_id not in present]
        kept = [run_id for run_id in acknowledged if run_id in present]

        async def finished() -> bool:
            counts = await asyncio.to_thread(status_counts, ctx, schema)
            return sum(counts[s] for s in FINAL) >= len(kept)

        await wait_for(finished, 120 if ctx.short else 300, f"{len(kept)} runs to finish")
        first = ctx.query(
            f'SELECT min(finished_at) FROM "{schema}".runs WHERE finished_at > to_timestamp(%s)', [killed_at]
        )
        tally(ctx, summary, schema, kept, None)
    summary.started += len(vanished)
    if synchronous:
        summary.lost += len(vanished)
    elif vanished:
        summary.details.append(f"runs acknowledged by run() and lost with the old primary's last WAL: {len(vanished)}")
    stalled = [returned - promoted for began, returned in calls if began < promoted < returned]
    to_first = first[0][0].timestamp() - killed_at if first and first[0][0] is not None else None
    summary.details.append(
        f"primary death -> first run completed on the new primary: "
        f"{'never' if to_first is None else f'{to_first:.1f}s'} "
        f"(standby promoted {promoted_at - killed_at:.1f}s after the death)"
    )
    summary.details.append(
        f"producer: {len(calls)} run() calls across the failover, {len(failures)} raised; the one in flight at the "
        f"crash returned {max(stalled, default=0):.1f}s after the promotion"
    )
    if failures:
        summary.details.append(f"run() errors: {failures[:3]}")
    if stalled and max(stalled) > 10:
        summary.problems.append(f"run() in flight waited {max(stalled):.0f}s after the promotion")
    if to_first is None:
        summary.problems.append("no run completed on the new primary")


async def _after(calls: list[tuple[float, float]], moment: float) -> bool:
    return any(began > moment for began, _ in calls)


def _wal_sender_pid(primary: PostgresCluster, standby: StandbyCluster) -> int:
    with psycopg.connect(primary.url, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_replication WHERE application_name = %s", [standby.name]).fetchone()
    assert row is not None, "the primary has no WAL sender"
    return int(row[0])


def _lag_bytes(primary: PostgresCluster, standby: StandbyCluster) -> Any:
    with psycopg.connect(primary.url, autocommit=True) as conn:
        (current,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("0/0",)
    with psycopg.connect(standby.url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_receive_lsn())", [current]).fetchone()
    return int(row[0]) if row and row[0] is not None else None
