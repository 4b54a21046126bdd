"""Where a cross-process start goes: run() in one process, the step in a worker process, runs one after another.

    python -m benchmarks.start_path [--url URL] [--runs 300] [--rounds 1]

The placement of benchmarks.latency's `other` (listen_delay 0, concurrency 16, an idle worker each time), with
the worker process noting, on one clock (`time.time()`, compared across the two processes), when the
notification of each new run arrives and when its take by id (Worker._take -> Backend.take_run) is sent and
answered. Medians, in ms:
  run_returns     the producer's run() call: validating, the insert, its commit (WAL flush) and the answer
  heard           run() called -> the worker has the notification (the insert's commit, then PostgreSQL's
                  delivery to the worker's LISTEN connection)
  take_sent       heard -> the take's statement starts (the worker's own Python)
  take_answered   the take's round trip (the statement, its commit, the answer, the pool)
  step_starts     take_answered -> the step's first line runs (the attempt's set-up)
  start           run() called -> the step's first line (the figure benchmarks.peers compares)
  result          run() called -> result() returns

A diagnostic, not a figure to track: the worker wraps two private functions of the PostgreSQL backend
(`_dispatch`, `PostgresBackend.take_run`) to take its notes, and fails at start when they are gone. It is this
module too, started by bench_common.start_workers with BENCH_NOTES set (the file of its notes), and otherwise
benchmarks.bench_worker. Runs the
worker did not take by id (another worker, a claim instead) are left out of the take figures; their count is
printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    arguments,
    client_config,
    database,
    new_schema,
    report,
    start_workers,
    stop_workers,
)
from benchmarks.latency import CONCURRENCY, WARM_UP
from sonamu_tasks import WorkflowManager

SPEC = {"name": "stamped", "version": "1"}


def worker() -> None:
    """The worker process: benchmarks.bench_worker's, noting each notification of a new run and each take in
    the file BENCH_NOTES."""
    import sonamu_tasks.backends.postgres.backend as postgres
    from benchmarks import bench_worker

    notes = open(os.environ["BENCH_NOTES"], "a", buffering=1)  # noqa: SIM115 - open for the process's life
    dispatch, take_run = postgres._dispatch, postgres.PostgresBackend.take_run

    def noting_dispatch(payload: str, notifications: Any) -> None:
        if payload.startswith("a:"):  # "a:" + workflow + "\x1f" + the run's id (a lone run())
            run_id = payload.partition("\x1f")[2]
            notes.write(json.dumps({"run": run_id, "heard": time.time()}) + "\n")
        dispatch(payload, notifications)

    async def noting_take(self: Any, worker_id: str, run_id: str, *args: Any, **kwargs: Any) -> Any:
        sent = time.time()
        taken = await take_run(self, worker_id, run_id, *args, **kwargs)
        notes.write(json.dumps({"run": run_id, "sent": sent, "answered": time.time(), "taken": taken is not None}))
        notes.write("\n")
        return taken

    postgres._dispatch = noting_dispatch  # type: ignore[assignment]
    postgres.PostgresBackend.take_run = noting_take  # type: ignore[method-assign]
    bench_worker.main()


async def one_round(url: str, runs: int, notes_path: Path) -> dict[str, list[float]]:
    schema = new_schema()
    notes_path.write_text("")
    options = {"concurrency": CONCURRENCY, "listen_delay": 0, "notes": notes_path}
    workers = start_workers(url, schema, 1, module="benchmarks.start_path", **options)
    calls: list[tuple[str, float, float, float, float]] = []  # run id, called, returned, step started, result
    try:
        async with WorkflowManager(client_config(url, schema)) as manager:
            for index in range(WARM_UP + runs):
                called = time.time()
                handle = await manager.run(SPEC, {"steps": 1})
                returned = time.time()
                started = await handle.result(timeout=60)
                if index >= WARM_UP:
                    calls.append((handle.id, called, returned, started["time"], time.time()))
    finally:
        stop_workers(workers)
    notes: dict[str, dict[str, Any]] = {}
    for line in notes_path.read_text().splitlines():
        note = json.loads(line)
        notes.setdefault(note.pop("run"), {}).update(note)
    names = ("run_returns", "heard", "take_sent", "take_answered", "step_starts", "start", "result")
    figures: dict[str, list[float]] = {name: [] for name in names}
    for run_id, called, returned, started, finished in calls:
        note = notes.get(run_id, {})
        figures["run_returns"].append(returned - called)
        figures["start"].append(started - called)
        figures["result"].append(finished - called)
        if "heard" in note:
            figures["heard"].append(note["heard"] - called)
        if note.get("taken"):
            figures["take_sent"].append(note["sent"] - note["heard"])
            figures["take_answered"].append(note["answered"] - note["sent"])
            figures["step_starts"].append(started - note["answered"])
    return figures


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for round_ in range(1, args.rounds + 1):
            figures = await one_round(url, args.runs, Path(tmp) / "notes.jsonl")
            for name, values in figures.items():
                if values:
                    report(f"start_path.{name}", statistics.median(values) * 1000, "ms", round=round_)
            report("start_path.taken_by_id", len(figures["take_answered"]), "runs", of=args.runs, round=round_)


if __name__ == "__main__":
    if "BENCH_NOTES" in os.environ:  # the worker process, which one_round starts with this module
        worker()
    else:
        asyncio.run(main())
