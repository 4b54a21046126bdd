"""Purging a million finished runs while a throughput run goes on (PostgreSQL only).

    python -m benchmarks.purge [--finished 1000000] [--rounds 6] [--workflows 3000] [--steps 3]
                               [--concurrency 128] [--batch-size 500] [--probe-interval-ms 25] [--url URL]

In a fresh schema, `--finished` completed runs are bulk-inserted, each with one step, finished 40 days ago
(one INSERT ... SELECT per table, time-ordered UUIDv7-shaped ids), then VACUUM ANALYZE
and a CHECKPOINT. One worker process (`--concurrency`) is started and warmed up. A throughput round inserts
`--workflows` pending runs of `--steps` trivial steps in one statement; its clock runs from that insert to the
last completion. Then:

  before: `--rounds` rounds, one after another, nothing else running;
  paused / purging: `sonamu-tasks purge --older-than 30d --batch-size N --json` (the command, in a process
    of its own) deletes the million runs and their steps, while rounds run one after another until it
    ends. The purge runs during every other round ("purging") and is stopped by SIGSTOP during the rounds
    between ("paused"): both kinds of rounds see the same machine, tables and autovacuum, whatever else the
    machine does meanwhile. The round in which the purge ends is not counted.

Throughout, a claim probe takes one due run of a workflow no worker serves every `--probe-interval-ms`
(`backend.claim_runs(..., limit=1)`, timed; the run is handed back untimed). Per phase: workflows/s (median of
its rounds, each round listed) and claim p50/p99; the ratios purging / paused; the purge's duration (all, and
while it was running) and runs deleted per second of running.

Last, sizes on disk with nothing else running, in a fresh schema: runs and steps (each table with its indexes
and TOAST) after the same bulk insert, after `manager.purge("30d")` deleted those (its runs/s unloaded), after
VACUUM, after inserting half as many runs again (they reuse the space VACUUM freed), and after VACUUM FULL;
a tenth as many recent runs stay throughout, after the expired ones, as in a live table.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_common import (
    ROOT,
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
WORKFLOW = ("steps", "1")
PROBES = 20  # due runs of the probe's workflow; each claimed one is handed back

# `count` runs with UUIDv7-shaped ids (48-bit millisecond time, version 7, variant 8, random rest), one
# millisecond apart, the last `ago` before now: the same shape and order as the engine's own ids. Finished
# ones finished when they were created.
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

# One completed step per finished run of the bulk workflow: what a purge deletes with each run.
INSERT_STEPS = """
INSERT INTO steps (run_id, name, kind, status, output, attempts, started_at, finished_at)
SELECT id, 's0', 'call', 'completed', '0'::jsonb, 1, finished_at, finished_at
FROM runs WHERE workflow_name = %(workflow)s
"""

SIZES = """
SELECT pg_total_relation_size('runs'), pg_total_relation_size('steps'),
       (SELECT count(*) FROM runs), (SELECT count(*) FROM steps)
"""

OLD = ("purged", "1")  # the million finished runs: a workflow of their own, so rounds never touch them
RECENT = ("recent", "1")  # finished yesterday: kept by the purge


async def insert_runs(
    conn: psycopg.AsyncConnection[Any], count: int, workflow: tuple[str, str], status: str, ago: timedelta, steps: int
) -> None:
    params = {
        "workflow": workflow[0],
        "version": workflow[1],
        "status": status,
        "input": json.dumps({"steps": steps}),
        "output": str(steps) if status == "completed" else None,
        "ago": ago,
        "count": count,
    }
    await conn.execute(INSERT_RUNS, params)


async def fill_finished(conn: psycopg.AsyncConnection[Any], count: int) -> None:
    """`count` completed runs (one step each) that finished 40 days ago, then VACUUM ANALYZE and a CHECKPOINT:
    the undisturbed phase does not pay for the bulk insert's maintenance."""
    async with conn.transaction():
        await insert_runs(conn, count, OLD, "completed", timedelta(days=40), 1)
        await conn.execute(INSERT_STEPS, {"workflow": OLD[0]})
    await conn.execute("VACUUM ANALYZE runs")
    await conn.execute("VACUUM ANALYZE steps")
    await conn.execute("CHECKPOINT")


async def sizes(conn: psycopg.AsyncConnection[Any], what: str) -> None:
    row = await (await conn.execute(SIZES)).fetchone()
    assert row is not None
    runs_bytes, steps_bytes, runs, steps = row
    report("purge.size.runs", runs_bytes / 2**20, "MiB", when=what, rows=runs)
    report("purge.size.steps", steps_bytes / 2**20, "MiB", when=what, rows=steps)
    report("purge.size.total", (runs_bytes + steps_bytes) / 2**20, "MiB", when=what)


@dataclass
class Phase:
    name: str
    rates: list[float] = field(default_factory=list)
    claims: list[float] = field(default_factory=list)


class Probe:
    """One claim of a due probe run every `interval_s`, timed, into the current phase; the claimed run is
    handed back at once (not timed), so a few probe runs serve the whole measurement."""

    def __init__(self, client: WorkflowManager, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self.phase: Phase | None = None
        self.worker_id = f"purge-probe-{uuid.uuid4().hex[:8]}"
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            claimed = await self.client.backend.claim_runs(self.worker_id, [PROBE], 1, timedelta(hours=1))
            elapsed = time.perf_counter() - began
            assert len(claimed) == 1, "no probe run left to claim"
            if self.phase is not None:
                self.phase.claims.append(elapsed)
            await self.client.backend.release_runs([(claimed[0].id, claimed[0].lease_token)])
            await asyncio.sleep(max(0.0, self.interval_s - elapsed))

    def stop(self) -> None:
        self._stop.set()


async def one_round(conn: psycopg.AsyncConnection[Any], client: WorkflowManager, workflows: int, steps: int) -> float:
    """Workflows/s of one round: `workflows` pending runs inserted in one statement, until all are finished."""
    began = time.perf_counter()
    await insert_runs(conn, workflows, WORKFLOW, "pending", timedelta(0), steps)
    await wait_until_finished(client, timeout_s=600, workflow=WORKFLOW[0])
    return workflows / (time.perf_counter() - began)


def start_purge(url: str, schema: str, folder: Path, batch_size: int) -> subprocess.Popen[str]:
    """`sonamu-tasks purge --older-than 30d --batch-size N --json` in a process of its own, on this schema."""
    module = f"bench_purge_{uuid.uuid4().hex[:8]}"
    (folder / f"{module}.py").write_text(
        f"from sonamu_tasks import define_config\nconfig = define_config(database_url={url!r}, schema={schema!r})\n"
    )
    command = [sys.executable, "-m", "sonamu_tasks", "--config", f"{module}:config", "purge", "--older-than", "30d"]
    return subprocess.Popen(
        [*command, "--batch-size", str(batch_size), "--json"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def measure(url: str, args: Any, folder: Path) -> None:
    schema = new_schema()
    labels = {"backend": "postgres", "finished_runs": args.finished, "batch": args.batch_size, "S": args.steps}
    async with (
        WorkflowManager(client_config(url, schema)) as client,
        await psycopg.AsyncConnection.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn,
    ):
        began = time.perf_counter()
        await fill_finished(conn, args.finished)
        report("purge.fill_time", time.perf_counter() - began, "s", **labels)
        await insert_runs(conn, PROBES, PROBE, "pending", timedelta(seconds=1), 1)

        workers = start_workers(url, schema, 1, concurrency=args.concurrency, listen_delay=0)
        probe = Probe(client, args.probe_interval_ms / 1000)
        probing = asyncio.create_task(probe.run())
        before, paused, purging = Phase("before"), Phase("paused"), Phase("purging")
        purge: subprocess.Popen[str] | None = None
        try:
            await (await client.run({"name": WORKFLOW[0], "version": WORKFLOW[1]}, {"steps": 1})).result(timeout=60)
            await one_round(conn, client, args.workflows, args.steps)  # warm-up round (and probe claims), not counted
            probe.phase = before
            for _ in range(args.rounds):
                before.rates.append(await one_round(conn, client, args.workflows, args.steps))

            # The purge runs in every other round and is stopped (SIGSTOP) in the rounds between: both kinds
            # of rounds see the same machine, whatever else it does meanwhile.
            began = time.perf_counter()
            purge = start_purge(url, schema, folder, args.batch_size)
            running_s = 0.0
            for index in itertools.count():
                phase = purging if index % 2 == 0 else paused
                os.kill(purge.pid, signal.SIGCONT if phase is purging else signal.SIGSTOP)
                probe.phase = phase
                round_began = time.perf_counter()
                rate = await one_round(conn, client, args.workflows, args.steps)
                if phase is purging:
                    running_s += time.perf_counter() - round_began
                if purge.poll() is not None:
                    break  # the purge ended during this round: not counted
                phase.rates.append(rate)
            probe.phase = None
            purge_s = time.perf_counter() - began
            output, _ = purge.communicate()
            assert purge.returncode == 0, f"purge exited {purge.returncode}: {output}"
            deleted = int(json.loads(output)["runs"])
        finally:
            probe.stop()
            await probing
            if purge is not None and purge.poll() is None:
                os.kill(purge.pid, signal.SIGCONT)
                purge.terminate()
                purge.wait()
            stop_workers(workers)

        report("purge.deleted", deleted, "runs", **labels)
        report("purge.duration", purge_s, "s", wall="all", **labels)
        report("purge.duration", running_s, "s", wall="running", **labels)
        report("purge.runs_per_s", deleted / running_s, "runs/s", **labels)
        for phase in (before, paused, purging):
            if not phase.rates:
                print(f"# no counted round in phase {phase.name}", flush=True)
                continue
            tags = {**labels, "phase": phase.name, "rounds": len(phase.rates)}
            report("purge.workflows_per_s", statistics.median(phase.rates), "workflows/s", **tags)
            rounds = " ".join(f"{rate:.0f}" for rate in phase.rates)
            print(f"# {phase.name} rounds, workflows/s: {rounds}", flush=True)
            report_percentiles("purge.claim", phase.claims, (50, 99), **tags)
        if purging.rates and paused.rates:
            ratio = statistics.median(purging.rates) / statistics.median(paused.rates)
            report("purge.workflows_per_s_ratio", ratio, "x", purging_to="paused")
        if purging.claims and paused.claims:
            ratio = percentile(purging.claims, 99) / percentile(paused.claims, 99)
            report("purge.claim_p99_ratio", ratio, "x", purging_to="paused")


async def measure_sizes(url: str, finished: int) -> None:
    """On disk, in a fresh schema with nothing else running: `finished` expired runs (and their steps) followed
    by a tenth as many recent ones, which stay (so VACUUM cannot simply cut the tables' ends off); the expired
    ones purged by `manager.purge`; VACUUM; half as many expired runs inserted again (they reuse the space VACUUM
    freed); VACUUM FULL."""
    schema = new_schema()
    async with (
        WorkflowManager(client_config(url, schema)) as client,
        await psycopg.AsyncConnection.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn,
    ):
        await fill_finished(conn, finished)
        await insert_runs(conn, finished // 10, RECENT, "completed", timedelta(days=1), 1)
        await conn.execute(INSERT_STEPS, {"workflow": RECENT[0]})
        await conn.execute("VACUUM ANALYZE runs")
        await conn.execute("VACUUM ANALYZE steps")
        await sizes(conn, "before")
        began = time.perf_counter()
        deleted = await client.purge("30d")
        elapsed = time.perf_counter() - began
        report("purge.unloaded.runs_per_s", deleted / elapsed, "runs/s", backend="postgres", deleted=deleted)
        await sizes(conn, "after_purge")
        await conn.execute("VACUUM runs")
        await conn.execute("VACUUM steps")
        await sizes(conn, "after_vacuum")
        await fill_finished(conn, finished // 2)
        await sizes(conn, "after_refilling_half")
        await conn.execute("VACUUM FULL runs")
        await conn.execute("VACUUM FULL steps")
        await sizes(conn, "after_vacuum_full")


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished runs inserted, then purged")
    parser.add_argument("--rounds", type=int, default=6, help="throughput rounds before the purge")
    parser.add_argument("--workflows", type=int, default=3000, help="runs per throughput round")
    parser.add_argument("--steps", type=int, default=3, help="steps per run of the throughput rounds")
    parser.add_argument("--concurrency", type=int, default=128, help="the worker process's concurrency")
    parser.add_argument("--batch-size", type=int, default=500, help="the purge's runs per transaction")
    parser.add_argument("--probe-interval-ms", type=float, default=25, help="time between two probe claims")
    args = parser.parse_args()
    if args.sqlite:
        parser.error("purge measures PostgreSQL only")
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        await measure(url, args, Path(tmp))
        await measure_sizes(url, args.finished)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    asyncio.run(main())
