"""Composition: a fan-out of child workflows against top-level runs, and a gather against sequential steps.

    python -m benchmarks.composition [--children 1000] [--runs 50] [--rounds 3] [--processes 1]
                                     [--concurrency 64] [--step-ms 0,10] [--placement other|same] [--sqlite]

fan-out   a parent starts `--children` one-step children with `step.start_workflows` (one statement) and
          awaits every result (a durable wait: it parks as `waiting`, each finishing child wakes it). The
          clock runs from the parent's run() to its result(). Against it, on a fresh schema and the same
          workers: a plain loop of `--children` top-level `manager.run()` calls of the same one-step
          workflow, then every `result()` awaited together; the clock runs from the first run() to the
          last result. Prints both times, children/s and the ratio loop / fan-out (above 1: the fan-out is
          faster).
gather    one after another (an idle worker each time), `--runs` runs of a workflow whose 10 steps are
          gathered, and as many of one whose 10 steps run one after another: run() -> result() p50 / p95,
          for each `--step-ms` (how long each step sleeps).

Workers: `--processes` worker processes of this script (`--serve`), at `--concurrency`, listen_delay 0 and
a 1 s poll, as bench_worker.py (placement `other`, the default on PostgreSQL); or the caller's own
manager runs the worker (`same`, the default with --sqlite, whose worker processes would only poll).
Each measurement gets a fresh schema, new workers and 5 uncounted warm-up runs. With --rounds R, every
figure is printed per round, then the median of the rounds (min-max in brackets).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    ROOT,
    arguments,
    backend_name,
    client_config,
    database,
    median,
    new_schema,
    percentile,
    report,
    stop_workers,
)
from sonamu_tasks import WorkflowDefinition, WorkflowManager, define_config, workflow

POLL_INTERVAL_MS = 1000  # as in bench_worker.py
WARM_UP = 5
BRANCHES = 10


async def _work(input: Any) -> Any:
    if input.get("ms"):
        await asyncio.sleep(input["ms"] / 1000)
    return input.get("value", 0)


@workflow(version="1")
async def kid(input: Any, step: Any) -> Any:
    """One step: the child of the fan-out, and the top-level run of the loop."""
    return await step.define("s0", _work).run({"value": input})


@workflow(version="1")
async def fan_out(input: Any, step: Any) -> int:
    handles = await step.start_workflows("kids", kid, list(range(int(input["children"]))))
    results = await asyncio.gather(*(handle.result() for handle in handles))
    return len(results)


@workflow(version="1")
async def gathered(input: Any, step: Any) -> list[Any]:
    return list(
        await asyncio.gather(
            *(step.define(f"s{i}", _work).run({"value": i, "ms": input["ms"]}) for i in range(BRANCHES))
        )
    )


@workflow(version="1")
async def sequential(input: Any, step: Any) -> list[Any]:
    return [await step.define(f"s{i}", _work).run({"value": i, "ms": input["ms"]}) for i in range(BRANCHES)]


ALL: list[WorkflowDefinition[Any, Any]] = [kid, fan_out, gathered, sequential]
SHORT = {"gathered": "gather", "sequential": "seq"}  # in the figures' names


def _worker_options(concurrency: int) -> dict[str, Any]:
    return {"concurrency": concurrency, "listen_delay": 0, "poll_interval_ms": POLL_INTERVAL_MS}


async def serve() -> None:
    """A worker process (`--serve`), configured by BENCH_URL, BENCH_SCHEMA and BENCH_CONCURRENCY."""
    logging.basicConfig(level=logging.WARNING)
    options = _worker_options(int(os.environ.get("BENCH_CONCURRENCY", "64")))
    config = define_config(
        database_url=os.environ["BENCH_URL"], schema=os.environ["BENCH_SCHEMA"], tasks={"worker_options": options}
    )
    await WorkflowManager(config, workflows=ALL).serve()


@asynccontextmanager
async def caller(args: argparse.Namespace, url: str) -> AsyncIterator[WorkflowManager]:
    """A manager on a fresh schema to start runs with; its workers in other processes or in this one."""
    schema = new_schema()
    if args.placement == "same":
        config = define_config(
            database_url=url, schema=schema, tasks={"worker_options": _worker_options(args.concurrency)}
        )
        async with WorkflowManager(config, workflows=ALL) as manager:
            await _warm_up(manager)
            yield manager
        return
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "BENCH_URL": url, "BENCH_SCHEMA": schema}
    env["BENCH_CONCURRENCY"] = str(args.concurrency)
    async with WorkflowManager(client_config(url, schema)) as manager:  # migrates before the workers start
        command = [sys.executable, "-m", "benchmarks.composition", "--serve"]
        workers = [subprocess.Popen(command, cwd=ROOT, env=env) for _ in range(args.processes)]
        try:
            await _warm_up(manager)
            yield manager
        finally:
            stop_workers(workers)


async def _warm_up(manager: WorkflowManager) -> None:
    for _ in range(WARM_UP):
        await (await manager.run(kid, 0)).result(timeout=60)


async def fan_out_seconds(args: argparse.Namespace, url: str) -> float:
    async with caller(args, url) as manager:
        began = time.perf_counter()
        handle = await manager.run(fan_out, {"children": args.children})
        done = await handle.result(timeout=600)
        elapsed = time.perf_counter() - began
    assert done == args.children, done
    return elapsed


async def loop_seconds(args: argparse.Namespace, url: str) -> float:
    async with caller(args, url) as manager:
        began = time.perf_counter()
        handles = [await manager.run(kid, index) for index in range(args.children)]
        results = await asyncio.gather(*(handle.result(timeout=600) for handle in handles))
        elapsed = time.perf_counter() - began
    assert results == list(range(args.children))
    return elapsed


async def latencies(args: argparse.Namespace, url: str, spec: WorkflowDefinition[Any, Any], ms: float) -> list[float]:
    async with caller(args, url) as manager:
        seconds: list[float] = []
        for _ in range(args.runs):
            began = time.perf_counter()
            out = await (await manager.run(spec, {"ms": ms})).result(timeout=60)
            seconds.append(time.perf_counter() - began)
            assert out == list(range(BRANCHES)), out
    return seconds


def summarize(name: str, values: list[float], unit: str, **labels: Any) -> None:
    """The median of the rounds' figures, with their range when there is more than one."""
    spread = f"[{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else ""
    report(name, median(values), unit, rounds=len(values), range=spread or "-", **labels)


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--children", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=50, help="runs of each gather/sequential workflow")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="worker processes (placement other)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--step-ms", default="0,10", help="how long each gathered/sequential step sleeps, ms")
    parser.add_argument("--placement", choices=["other", "same"], help="default: other; same with --sqlite")
    parser.add_argument("--skip", default="", help="fan-out and/or gather, comma-separated")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve()
        return
    args.placement = args.placement or ("same" if args.sqlite else "other")
    labels = {"backend": backend_name(args), "placement": args.placement, "concurrency": args.concurrency}
    if args.placement == "other":
        labels["processes"] = args.processes
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        if "fan-out" not in skip:
            fan: list[float] = []
            loop: list[float] = []
            for _ in range(args.rounds):
                fan.append(await fan_out_seconds(args, url))
                loop.append(await loop_seconds(args, url))
                report("composition.fan_out_seconds", fan[-1], "s", children=args.children, **labels)
                report("composition.loop_seconds", loop[-1], "s", children=args.children, **labels)
            n = args.children
            summarize("composition.fan_out_children_per_s", [n / s for s in fan], "children/s", **labels)
            summarize("composition.loop_runs_per_s", [n / s for s in loop], "runs/s", **labels)
            summarize("composition.fan_out_seconds", fan, "s", children=n, **labels)
            summarize("composition.loop_seconds", loop, "s", children=n, **labels)
            summarize("composition.loop_over_fan_out", [b / a for a, b in zip(fan, loop, strict=True)], "x", **labels)
        if "gather" not in skip:
            for ms in [float(m) for m in args.step_ms.split(",")]:
                figures: dict[str, list[float]] = {}
                for _ in range(args.rounds):
                    for spec in (gathered, sequential):
                        seconds = await latencies(args, url, spec, ms)
                        for q in (50, 95):
                            name = f"composition.{SHORT[spec.name]}10.result.p{q}"
                            value = percentile(seconds, q) * 1000
                            figures.setdefault(name, []).append(value)
                            report(name, value, "ms", n=len(seconds), step_ms=f"{ms:g}", **labels)
                for name, values in figures.items():
                    summarize(name, values, "ms", step_ms=f"{ms:g}", **labels)


if __name__ == "__main__":
    asyncio.run(main())
