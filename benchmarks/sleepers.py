"""Many sleeping runs: what they cost a worker, and how fast they wake and finish.

    python -m benchmarks.sleepers [--runs 10000] [--sleep 20] [--concurrency 16] [--samples 5] [--sqlite]

One worker process is started (and warmed up with one run). Then `--runs` runs of `sleeper` (a step, a
durable sleep, a step) are enqueued, all with one start time, `--enqueue-window` seconds after enqueueing
began (so the worker does not compete with the enqueueing), and one wake time, `--sleep` seconds after
that start (the first step computes each run's sleep from it, so they all wake together).
While every run sleeps, the worker's RSS (/proc/PID/status VmRSS) and CPU time (/proc/PID/stat
utime+stime) are sampled. Printed: RSS before enqueueing, RSS while they sleep (the largest sample), CPU%
while they sleep (100 = one core), then the time from the wake time until all are completed, as runs/s.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.bench_common import (
    arguments,
    backend_name,
    client_config,
    cpu_seconds,
    database,
    enqueue,
    new_schema,
    report,
    rss_mb,
    start_workers,
    stop_workers,
    wait_until_finished,
)
from sonamu_tasks import RunStatus, WorkflowManager


async def wait_until_parked(client: WorkflowManager, deadline: float) -> None:
    """Return once no run is pending or running (all are asleep), or at `deadline` (epoch seconds)."""
    while (await client.list_runs(status=[RunStatus.PENDING, RunStatus.RUNNING], limit=1)).items:
        if time.time() >= deadline:
            return
        await asyncio.sleep(0.05)


async def sample(pid: int, seconds: float, samples: int) -> tuple[float, float]:
    """The largest RSS (MiB) of `samples` taken over `seconds`, and the CPU% over that time."""
    rss: list[float] = []
    cpu_began, wall_began = cpu_seconds(pid), time.perf_counter()
    for _ in range(samples):
        await asyncio.sleep(seconds / samples)
        rss.append(rss_mb(pid))
    return max(rss), (cpu_seconds(pid) - cpu_began) / (time.perf_counter() - wall_began) * 100


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--sleep", type=float, default=20.0, help="seconds from the common start to the wake")
    parser.add_argument("--enqueue-window", type=float, help="seconds to enqueue in (default: 2 + runs/400)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5, help="RSS/CPU samples while the runs sleep")
    args = parser.parse_args()
    labels = {"backend": backend_name(args), "runs": args.runs, "concurrency": args.concurrency}
    window = args.enqueue_window if args.enqueue_window is not None else 2 + args.runs / 400
    schema = new_schema()
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        [worker] = start_workers(url, schema, 1, concurrency=args.concurrency, listen_delay=0)
        try:
            async with WorkflowManager(client_config(url, schema)) as client:
                await (await client.run({"name": "steps", "version": "1"}, {"steps": 1})).result(timeout=60)
                report("sleepers.rss_before", rss_mb(worker.pid), "MiB", **labels)

                start = time.time() + window
                wake_at = start + args.sleep
                spec = {"name": "sleeper", "version": "1"}
                start_at = datetime.fromtimestamp(start, UTC)
                await enqueue(client, spec, {"wake_at": wake_at}, args.runs, start_at=start_at)
                if time.time() > start:
                    print(f"enqueueing took longer than --enqueue-window {window:g}s: raise it")
                await asyncio.sleep(max(0.0, start - time.time()))
                await wait_until_parked(client, wake_at)
                parked = time.time()
                report("sleepers.all_asleep_after", parked - start, "s", **labels)
                report("sleepers.start_and_park_rate", args.runs / (parked - start), "runs/s", **labels)
                sampling = wake_at - 0.5 - parked  # stop half a second before the wake
                if sampling < 1:
                    print(f"not all {args.runs} runs were asleep 1.5 s before the wake time: raise --sleep")
                    report("sleepers.rss_while_asleep", rss_mb(worker.pid), "MiB", samples=1, **labels)
                else:
                    rss, cpu = await sample(worker.pid, sampling, args.samples)
                    report("sleepers.rss_while_asleep", rss, "MiB", samples=args.samples, **labels)
                    report("sleepers.cpu_while_asleep", cpu, "%", seconds=round(sampling, 1), **labels)

                await asyncio.sleep(max(0.0, wake_at - time.time()))
                await wait_until_finished(client, timeout_s=600)
                took = time.time() - wake_at
                report("sleepers.wake_to_all_done", took, "s", **labels)
                report("sleepers.wake_and_finish_rate", args.runs / took, "runs/s", **labels)
                report("sleepers.rss_after", rss_mb(worker.pid), "MiB", **labels)
        finally:
            stop_workers([worker])


if __name__ == "__main__":
    asyncio.run(main())
