"""The producer path: starting runs from a process that runs no worker, and a worker elsewhere.

    python -m benchmarks.producer [--rounds 3] [--seconds 5] [--in-flight 1,4,16,32,64] [--many 10000]
                                  [--worker-concurrency 128] [--drain 10000] [--skip ...]

Each round, on one throwaway PostgreSQL (fsync on), with a fresh schema per measurement:
  run        run() of a 1-step workflow from a manager with enable_worker False, N calls in flight (N tasks,
             each starting the next run when its previous run() returned) for --seconds: runs/s. No worker
             runs: this is the insert path alone. During the largest N, a second connection samples
             pg_stat_activity every 10 ms (the engine's active connections): wait events and their counts.
  many       run_many() of --many inputs in one call: runs/s (the median of 3 calls, one after another).
  floor      the server alone inserting --many pending runs into the engine's `runs` table, in one statement whose
             rows the server makes itself (ids drawn as run_many draws them, no client data, no conflict
             handling, nothing returned): runs/s (the median of 3 statements, one after another). No client
             can start runs faster on this server, so floor / run() at the largest N is the highest
             run_many / run() ratio there can be.
  pgbench    pgbench committing single-row INSERT transactions at the largest N clients for --seconds: the
             physical limit of one insert commit per run().
  sustained  one worker process (benchmarks.bench_worker, --worker-concurrency) and this process starting
             1-step runs at the largest N in flight for --seconds: workflows completed per second over the
             last two thirds of the window (the first third warms up), and runs started per second.
  watched    as `sustained`, but each caller awaits its run's result() before starting the next (the web
             request that waits for its workflow): run() + result() cycles per second, and the CPU per run of
             this process, of the worker process and of the server.
  drain      benchmarks.throughput's backlog drain on the same server: --drain 1-step runs enqueued, then the
             same worker process (same concurrency) started: workflows/s.
Prints each figure per round, then the median of the rounds, and the ratios the issue asks for (each taken
within a round, then the median).

The producer manager's pool is sized by worker_options.concurrency + 4 (as any manager's): it is set to the
largest N here, so N calls in flight each get a connection.
"""

from __future__ import annotations

import asyncio
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_common import (
    arguments,
    cpu_seconds,
    database,
    new_schema,
    postmaster_pid,
    ratios,
    report,
    report_medians,
    server_cpu_seconds,
    start_workers,
    stop_workers,
)
from benchmarks.pg_limit import pgbench_commits
from benchmarks.throughput import one_round
from sonamu_tasks import WorkflowManager, define_config
from sonamu_tasks.ids import new_run_ids

SPEC = {"name": "steps", "version": "1"}
INPUT = {"steps": 1}


def producer_config(url: str, schema: str, in_flight: int) -> Any:
    return define_config(
        database_url=url,
        schema=schema,
        tasks={"enable_worker": False, "worker_options": {"concurrency": in_flight}},
    )


async def run_rate(url: str, in_flight: int, seconds: float, sample: bool) -> tuple[float, collections.Counter[str]]:
    """run() calls per second with `in_flight` callers; the wait events sampled meanwhile when `sample`."""
    schema = new_schema()
    events: collections.Counter[str] = collections.Counter()
    async with WorkflowManager(producer_config(url, schema, in_flight)) as client:
        await asyncio.gather(*(client.run(SPEC, INPUT) for _ in range(in_flight * 2)))  # connections, warm-up
        began = time.perf_counter()
        sampler = asyncio.create_task(sample_waits(url, events)) if sample else None
        count = await call_for(client, in_flight, seconds)
        elapsed = time.perf_counter() - began
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    return count / elapsed, events


async def call_for(client: WorkflowManager, in_flight: int, seconds: float, *, wait_for_result: bool = False) -> int:
    """`in_flight` callers, each starting the next 1-step run when its previous run() returned (or, with
    `wait_for_result`, when its result() did), for `seconds`: how many they started."""
    count = 0
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            handle = await client.run(SPEC, INPUT)
            if wait_for_result:
                await handle.result(timeout=60)
            count += 1

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return count


async def sample_waits(url: str, events: collections.Counter[str]) -> None:
    """Count the wait events of the engine's active connections, every 10 ms, until cancelled."""
    query = (
        "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity"
        " WHERE application_name = 'sonamu_tasks' AND state = 'active' AND pid <> pg_backend_pid()"
    )
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            for (event,) in await (await conn.execute(query)).fetchall():
                events[event] += 1
            await asyncio.sleep(0.01)


CALLS = 3  # run_many calls (and floor statements) per round: one call of 10,000 lasts about 0.15 s, so one alone
# is at the mercy of a checkpoint or another process; the round's figure is the median of its calls.


async def many_rate(url: str, count: int) -> float:
    schema = new_schema()
    rates = []
    async with WorkflowManager(producer_config(url, schema, 4)) as client:
        await client.run_many(SPEC, [INPUT] * 10)  # connection, warm-up
        for _ in range(CALLS):
            began = time.perf_counter()
            await client.run_many(SPEC, [INPUT] * count)
            rates.append(count / (time.perf_counter() - began))
    return statistics.median(rates)


async def insert_floor(url: str, count: int) -> float:
    schema = new_schema()
    async with WorkflowManager(producer_config(url, schema, 4)) as client:
        await client.run_many(SPEC, [INPUT] * 10)  # the schema, as many_rate's
    statement = (
        "INSERT INTO runs (id, workflow_name, version, status, input, available_at, queue, priority, detached)"
        " SELECT id, %(name)s, %(version)s, 'pending', %(input)s::jsonb, now(), 'default', 0, false"
        " FROM unnest(%(ids)s::uuid[]) AS id"
    )
    params = {"name": SPEC["name"], "version": SPEC["version"], "input": json.dumps(INPUT)}
    rates = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"SET search_path TO {schema}")
        for _ in range(CALLS):
            ids = "{" + ",".join(new_run_ids(count)) + "}"
            began = time.perf_counter()
            await conn.execute(statement, {**params, "ids": ids})
            rates.append(count / (time.perf_counter() - began))
    return statistics.median(rates)


async def completed(conn: psycopg.AsyncConnection[Any], schema: str) -> int:
    row = await (await conn.execute("SELECT count(*) FROM runs WHERE status = 'completed'", prepare=False)).fetchone()
    assert row is not None
    return int(row[0])


async def sustained(url: str, in_flight: int, seconds: float, concurrency: int) -> tuple[float, float]:
    """(workflows completed per second, runs started per second) with a producer here and a worker process."""
    schema = new_schema()
    async with WorkflowManager(producer_config(url, schema, in_flight)) as client:
        workers = start_workers(url, schema, 1, concurrency=concurrency)
        try:
            await client.run(SPEC, INPUT)
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, options=f"-c search_path={schema}"
            ) as conn:
                deadline = time.monotonic() + 60
                while await completed(conn, schema) < 1:  # the worker is up and serving
                    if time.monotonic() > deadline:
                        raise TimeoutError("the worker completed nothing in 60 s")
                    await asyncio.sleep(0.05)
                began = time.perf_counter()
                callers = asyncio.create_task(call_for(client, in_flight, seconds))
                await asyncio.sleep(seconds / 3)
                first, t0 = await completed(conn, schema), time.perf_counter()
                started = await callers
                last, t1 = await completed(conn, schema), time.perf_counter()
                started_rate = started / (t1 - began)
        finally:
            stop_workers(workers)
    return (last - first) / (t1 - t0), started_rate


async def watched(url: str, in_flight: int, seconds: float, concurrency: int) -> tuple[float, float, float, float]:
    """(run() + result() cycles per second, CPU us per run of this process, of the worker, of the server)."""
    schema = new_schema()
    async with WorkflowManager(producer_config(url, schema, in_flight)) as client:
        workers = start_workers(url, schema, 1, concurrency=concurrency)
        try:
            await (await client.run(SPEC, INPUT)).result(timeout=60)  # the worker is up and serving
            postmaster = postmaster_pid(url)
            assert postmaster is not None, "the server's CPU is read from /proc: run PostgreSQL on this machine"
            cpu = (time.process_time(), cpu_seconds(workers[0].pid), server_cpu_seconds(postmaster))
            began = time.perf_counter()
            cycles = await call_for(client, in_flight, seconds, wait_for_result=True)
            elapsed = time.perf_counter() - began
            used = (
                time.process_time() - cpu[0],
                cpu_seconds(workers[0].pid) - cpu[1],
                server_cpu_seconds(postmaster) - cpu[2],
            )
        finally:
            stop_workers(workers)
    return cycles / elapsed, *(seconds_used / cycles * 1e6 for seconds_used in used)


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", default="1,4,16,32,64")
    parser.add_argument("--many", type=int, default=10_000)
    parser.add_argument("--worker-concurrency", type=int, default=128)
    parser.add_argument("--drain", type=int, default=10_000)
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to skip: run,many,floor,pgbench,sustained,watched,drain"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    levels = [int(n) for n in args.in_flight.split(",")]
    top = max(levels)
    figures: dict[str, list[float]] = collections.defaultdict(list)
    waits: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for round_ in range(1, args.rounds + 1):
            this: dict[str, float] = {}
            if "run" not in skip:
                for n in levels:
                    rate, events = await run_rate(url, n, args.seconds, sample=n == top)
                    this[f"run.in_flight_{n}"] = rate
                    report("producer.run_per_s", rate, "runs/s", in_flight=n, round=round_)
                    waits.update(events)
                    for event, count in events.most_common():
                        report("producer.wait_event_samples", count, "samples", in_flight=n, event=event, round=round_)
            if "many" not in skip:
                this["many"] = await many_rate(url, args.many)
                report("producer.run_many_per_s", this["many"], "runs/s", size=args.many, round=round_)
            if "floor" not in skip:
                this["floor"] = await insert_floor(url, args.many)
                report("producer.insert_floor_per_s", this["floor"], "runs/s", size=args.many, round=round_)
            if "pgbench" not in skip:
                this["pgbench"] = pgbench_commits(url, top, int(args.seconds), Path(tmp))
                report("producer.pgbench_insert_tps", this["pgbench"], "tps", clients=top, round=round_)
            if "sustained" not in skip:
                done, started = await sustained(url, top, args.seconds, args.worker_concurrency)
                this["sustained"], this["sustained_started"] = done, started
                labels = {"in_flight": top, "concurrency": args.worker_concurrency, "round": round_}
                report("producer.sustained_workflows_per_s", done, "workflows/s", **labels)
                report("producer.sustained_started_per_s", started, "runs/s", **labels)
            if "watched" not in skip and not args.sqlite:
                rate, mine, worker, server = await watched(url, top, args.seconds, args.worker_concurrency)
                this["watched"] = rate
                labels = {"in_flight": top, "concurrency": args.worker_concurrency, "round": round_}
                report("producer.watched_cycles_per_s", rate, "runs/s", **labels)
                report("producer.watched_cpu_per_run.producer", mine, "us", **labels)
                report("producer.watched_cpu_per_run.worker", worker, "us", **labels)
                report("producer.watched_cpu_per_run.server", server, "us", **labels)
            if "drain" not in skip:
                elapsed = await one_round(url, args.drain, 1, 1, args.worker_concurrency)
                this["drain"] = args.drain / elapsed
                labels = {"concurrency": args.worker_concurrency, "round": round_}
                report("producer.drain_workflows_per_s", this["drain"], "workflows/s", S=1, **labels)
            pairs = {
                "ratio.run_top_over_16": (f"run.in_flight_{top}", "run.in_flight_16"),
                "ratio.run_top_over_pgbench": (f"run.in_flight_{top}", "pgbench"),
                "ratio.many_over_run_top": ("many", f"run.in_flight_{top}"),
                "ratio.floor_over_run_top": ("floor", f"run.in_flight_{top}"),
                "ratio.many_over_floor": ("many", "floor"),
                "ratio.sustained_over_drain": ("sustained", "drain"),
            }
            for name, value in ratios(this, pairs).items():
                this[name] = value
                report(f"producer.{name}", value, "x", round=round_)
            for key, value in this.items():
                figures[key].append(value)
        report_medians("producer", figures)
        for event, count in waits.most_common():
            report("producer.wait_event_samples_total", count, "samples", in_flight=top, event=event)


if __name__ == "__main__":
    asyncio.run(main())
