"""Throughput: W workflows of S trivial steps, processed by 1 and by 2 worker processes.

    python -m benchmarks.throughput [--workflows 5000] [--steps 3] [--concurrency 16,128,256] [--processes 1,2]
                                    [--queue-limit N|slots] [--rounds R] [--sqlite]

Runs are enqueued first; the clock runs from the workers' start to the last completion. Prints
workflows/s and checkpoints/s (step checkpoints stored per second), then for each process count the best
concurrency and its workflows/s.

`--queue-limit N`: every configuration is measured twice per round, the runs in the default queue (no
limits) and in a queue with `concurrency=N` (`slots`: N = processes x concurrency, the fleet's slots,
the tightest limit that never binds); the two alternate (which goes first changes every round) and each
pair gives a ratio, limited / unlimited. Also the CPU seconds of the worker processes and the local PostgreSQL
server per workflow, and their ratio unlimited / limited (a throughput-like ratio that a loaded machine
disturbs far less than the wall clock; the CPU of starting and stopping the workers with nothing to do,
measured once per configuration, is subtracted). With `--rounds R` (default 3 with --queue-limit, else 1) the
medians of the R rounds and of their ratios are printed side by side.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    CpuMeter,
    arguments,
    client_config,
    database,
    enable_function_stats,
    enqueue,
    function_stats,
    median,
    new_schema,
    report,
    start_workers,
    stop_workers,
    wait_until_finished,
)
from sonamu_tasks import WorkflowManager

LIMITED_QUEUE = "limited"


async def one_round(
    url: str,
    workflows: int,
    steps: int,
    processes: int,
    concurrency: int,
    timeout_s: float = 600,
    queue_limit: int | None = None,
    meter: CpuMeter | None = None,
) -> float:
    """Seconds from the workers' start until `workflows` enqueued runs of `steps` steps are all finished
    (in a queue with `concurrency=queue_limit` if given, else in the default queue)."""
    schema = new_schema()
    queues: list[dict[str, Any]] = []
    run_options: dict[str, Any] = {}
    worker_options: dict[str, Any] = {"concurrency": concurrency}
    if queue_limit is not None:
        queues = [{"name": LIMITED_QUEUE, "concurrency": queue_limit}]
        run_options["queue"] = LIMITED_QUEUE
        worker_options.update(queues=json.dumps(queues), serve=LIMITED_QUEUE)
    async with WorkflowManager(client_config(url, schema, queues)) as client:
        await enqueue(client, {"name": "steps", "version": "1"}, {"steps": steps}, workflows, **run_options)
        if meter is not None:
            meter.start()
        began = time.perf_counter()
        workers = start_workers(url, schema, processes, **worker_options)
        try:
            await wait_until_finished(client, timeout_s)
            elapsed = time.perf_counter() - began
        finally:
            stop_workers(workers)
        if meter is not None:
            meter.stop()
            meter.functions = await function_stats(client, schema)
        done = await client.list_runs(status="completed", limit=1)
        assert done.items, "no run completed"
    return elapsed


def spread(values: list[float], digits: int = 0) -> str:
    """`median [min-max]`."""
    return f"{median(values):,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


async def compare_queue_limit(args: Any, url: str, backend: str) -> None:
    """Unlimited against limited, alternating, `args.rounds` pairs per configuration."""
    summary = []
    meter = CpuMeter(url)
    if backend == "postgres":
        enable_function_stats(url)
    for processes in [int(p) for p in args.processes.split(",")]:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            slots = processes * concurrency
            limit = slots if args.queue_limit == "slots" else int(args.queue_limit)
            if limit < slots:
                print(f"note: queue limit {limit} is below the fleet's {slots} slots: the limit binds", flush=True)
            figures: dict[str, list[float]] = {"unlimited": [], "limited": []}
            cpu: dict[str, list[float]] = {"unlimited": [], "limited": []}
            ratios = []
            cpu_ratios = []
            overhead = await meter.startup(url, processes, concurrency=concurrency)
            report("throughput.worker_startup_cpu", overhead, "s", processes=processes, concurrency=concurrency)
            for index in range(args.rounds):
                order = [None, limit] if index % 2 == 0 else [limit, None]
                pair = {}
                for queue_limit in order:
                    elapsed = await one_round(
                        url, args.workflows, args.steps, processes, concurrency, queue_limit=queue_limit, meter=meter
                    )
                    kind = "unlimited" if queue_limit is None else "limited"
                    pair[kind] = args.workflows / elapsed
                    figures[kind].append(pair[kind])
                    cpu[kind].append(meter.per_item_us(args.workflows, overhead))
                    labels = {"backend": backend, "processes": processes, "concurrency": concurrency, "S": args.steps}
                    report("throughput.workflows_per_s", pair[kind], "workflows/s", queue=kind, limit=limit, **labels)
                    report("throughput.cpu_per_workflow", cpu[kind][-1], "us", queue=kind, limit=limit, **labels)
                    calls, total_ms = meter.functions.get("claim_runs", (0, 0.0))
                    if calls:
                        report("throughput.claims_per_workflow", calls / args.workflows, "claims", queue=kind)
                        report("throughput.claim_ms_per_claim", total_ms / calls, "ms", queue=kind)
                        due_calls = meter.functions.get("seconds_until_due", (0, 0.0))[0]
                        report("throughput.due_looks_per_workflow", due_calls / args.workflows, "calls", queue=kind)
                ratios.append(pair["limited"] / pair["unlimited"])
                cpu_ratios.append(cpu["unlimited"][-1] / cpu["limited"][-1])
                report("throughput.queue_limit_ratio", ratios[-1], "x", round=index + 1, **labels)
                report("throughput.queue_limit_cpu_ratio", cpu_ratios[-1], "x", round=index + 1, **labels)
            summary.append(
                f"S={args.steps} processes={processes} concurrency={concurrency} limit={limit}: "
                f"unlimited {spread(figures['unlimited'])}  limited {spread(figures['limited'])} workflows/s  "
                f"ratio {spread(ratios, 3)}; CPU (workers + PostgreSQL) per workflow: unlimited "
                f"{spread(cpu['unlimited'])} us, limited {spread(cpu['limited'])} us, ratio unlimited/limited "
                f"{spread(cpu_ratios, 3)}"
            )
            labels = {"backend": backend, "processes": processes, "concurrency": concurrency, "S": args.steps}
            report(
                "throughput.queue_limit_ratio_median", median(ratios), "x", rounds=args.rounds, limit=limit, **labels
            )
    print(f"\nmedian of {args.rounds} rounds [min-max]:")
    for line in summary:
        print(line, flush=True)


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--workflows", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concurrency", default="16,128,256")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--queue-limit", help="N or 'slots': compare the default queue with a queue of concurrency N")
    parser.add_argument("--rounds", type=int, help="rounds per configuration (default 3 with --queue-limit, else 1)")
    args = parser.parse_args()
    if args.queue_limit is not None and args.queue_limit != "slots" and not args.queue_limit.isdigit():
        parser.error("--queue-limit takes a positive integer or 'slots'")
    backend = "sqlite" if args.sqlite else "postgres"
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        if args.queue_limit is not None:
            args.rounds = args.rounds or 3
            await compare_queue_limit(args, url, backend)
            return
        for processes in [int(p) for p in args.processes.split(",")]:
            best = (0.0, 0)
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                rates = [
                    args.workflows / await one_round(url, args.workflows, args.steps, processes, concurrency)
                    for _ in range(args.rounds or 1)
                ]
                labels = {"backend": backend, "processes": processes, "concurrency": concurrency, "S": args.steps}
                for rate in rates:
                    report("throughput.workflows_per_s", rate, "workflows/s", **labels)
                    report("throughput.checkpoints_per_s", rate * args.steps, "checkpoints/s", **labels)
                best = max(best, (median(rates), concurrency))
            labels = {"backend": backend, "processes": processes, "concurrency": best[1], "S": args.steps}
            report("throughput.best_workflows_per_s", best[0], "workflows/s", **labels)


if __name__ == "__main__":
    asyncio.run(main())
