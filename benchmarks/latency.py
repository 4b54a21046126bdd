"""Latency on an idle worker: run() -> the step starts, and run() -> result() returns.

    python -m benchmarks.latency [--runs 500] [--runs-3step 100] [--delays 0,500] [--placements same,other] [--sqlite]

Runs go one after another (the next starts when the previous result is back), so the worker is idle
each time. Two placements of the worker:
  same   the caller's own WorkflowManager runs the worker; run() wakes it at once, and result() is woken
         in-process when the run completes;
  other  a worker process; the caller's manager has enable_worker False, so the worker learns of the run
         from the database's notification (after listen_delay) and the caller of its end the same way.
For each placement and listen_delay (ms): p50/p95/p99 of run() -> the (1-step) workflow's step starts and
of run() -> result() returns, then the p50 of run() -> result() for a 3-step workflow. The step returns
the moment it started: perf_counter within one process, time.time() across processes.

SQLite has no notifications (listen_delay does not apply): a worker process finds runs by polling (every
second here) and result() re-reads every 50 ms.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from benchmarks.bench_common import (
    arguments,
    backend_name,
    client_config,
    database,
    new_schema,
    percentile,
    report,
    report_percentiles,
    start_workers,
    stop_workers,
)
from benchmarks.bench_workflows import ALL
from sonamu_tasks import WorkflowManager, define_config

SPEC = {"name": "stamped", "version": "1"}
CONCURRENCY = 16
POLL_INTERVAL_MS = 1000  # as in bench_worker.py
WARM_UP = 5


@asynccontextmanager
async def caller(url: str, placement: str, listen_delay: float) -> AsyncIterator[WorkflowManager]:
    """A manager to start runs with, its worker in this process (same) or in another one (other)."""
    schema = new_schema()
    if placement == "same":
        options = {"concurrency": CONCURRENCY, "listen_delay": listen_delay, "poll_interval_ms": POLL_INTERVAL_MS}
        config = define_config(database_url=url, schema=schema, tasks={"worker_options": options})
        async with WorkflowManager(config, workflows=ALL) as manager:
            yield manager
        return
    workers = start_workers(url, schema, 1, concurrency=CONCURRENCY, listen_delay=listen_delay)
    try:
        async with WorkflowManager(client_config(url, schema)) as manager:
            yield manager
    finally:
        stop_workers(workers)


async def measure(manager: WorkflowManager, runs: int, steps: int, across: bool) -> tuple[list[float], list[float]]:
    """Seconds from run() to the first step's start, and from run() to result(), for each run."""
    to_start: list[float] = []
    to_result: list[float] = []
    for _ in range(runs):
        wall, perf = time.time(), time.perf_counter()
        handle = await manager.run(SPEC, {"steps": steps})
        started = await handle.result(timeout=60)
        done = time.perf_counter()
        to_start.append(started["time"] - wall if across else started["perf"] - perf)
        to_result.append(done - perf)
    return to_start, to_result


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--runs", type=int, default=500, help="1-step runs per configuration")
    parser.add_argument("--runs-3step", type=int, default=100, help="3-step runs per configuration")
    parser.add_argument("--delays", default="0,500", help="listen_delay values in ms")
    parser.add_argument("--placements", default="same,other")
    args = parser.parse_args()
    backend = backend_name(args)
    delays = [0.0] if args.sqlite else [float(d) for d in args.delays.split(",")]
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for placement in args.placements.split(","):
            for delay in delays:
                labels = {
                    "backend": backend,
                    "placement": placement,
                    "listen_delay": "n/a" if args.sqlite else f"{delay:g}ms",
                }
                async with caller(url, placement, delay) as manager:
                    await measure(manager, WARM_UP, 1, placement == "other")  # connections, the worker's start-up
                    to_start, to_result = await measure(manager, args.runs, 1, placement == "other")
                    _, to_result_3 = await measure(manager, args.runs_3step, 3, placement == "other")
                report_percentiles("latency.run_to_step_start", to_start, S=1, **labels)
                report_percentiles("latency.run_to_result", to_result, S=1, **labels)
                p50 = percentile(to_result_3, 50) * 1000
                report("latency.run_to_result.p50", p50, "ms", S=3, n=len(to_result_3), **labels)


if __name__ == "__main__":
    asyncio.run(main())
