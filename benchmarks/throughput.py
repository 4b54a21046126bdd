"""Throughput: W workflows of S trivial steps, processed by 1 and by 2 worker processes.

    python -m benchmarks.throughput [--workflows 5000] [--steps 3] [--concurrency 16,128,256] [--processes 1,2]
                                    [--sqlite]

Runs are enqueued first; the clock runs from the workers' start to the last completion. Prints
workflows/s and checkpoints/s (step checkpoints stored per second), then for each process count the best
concurrency and its workflows/s.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from benchmarks.bench_common import (
    arguments,
    client_config,
    database,
    enqueue,
    new_schema,
    report,
    start_workers,
    stop_workers,
    wait_until_finished,
)
from sonamu_tasks import WorkflowManager


async def one_round(
    url: str, workflows: int, steps: int, processes: int, concurrency: int, timeout_s: float = 600
) -> float:
    """Seconds from the workers' start until `workflows` enqueued runs of `steps` steps are all finished."""
    schema = new_schema()
    async with WorkflowManager(client_config(url, schema)) as client:
        await enqueue(client, {"name": "steps", "version": "1"}, {"steps": steps}, workflows)
        began = time.perf_counter()
        workers = start_workers(url, schema, processes, concurrency=concurrency)
        try:
            await wait_until_finished(client, timeout_s)
            elapsed = time.perf_counter() - began
        finally:
            stop_workers(workers)
        done = await client.list_runs(status="completed", limit=1)
        assert done.items, "no run completed"
    return elapsed


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--workflows", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concurrency", default="16,128,256")
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    backend = "sqlite" if args.sqlite else "postgres"
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for processes in [int(p) for p in args.processes.split(",")]:
            best = (0.0, 0)
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                elapsed = await one_round(url, args.workflows, args.steps, processes, concurrency)
                labels = {"backend": backend, "processes": processes, "concurrency": concurrency, "S": args.steps}
                report("throughput.workflows_per_s", args.workflows / elapsed, "workflows/s", **labels)
                report("throughput.checkpoints_per_s", args.workflows * args.steps / elapsed, "checkpoints/s", **labels)
                best = max(best, (args.workflows / elapsed, concurrency))
            labels = {"backend": backend, "processes": processes, "concurrency": best[1], "S": args.steps}
            report("throughput.best_workflows_per_s", best[0], "workflows/s", **labels)


if __name__ == "__main__":
    asyncio.run(main())
