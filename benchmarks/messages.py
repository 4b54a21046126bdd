"""Messages: how fast a send wakes a waiting receive, what waiting runs cost, and a receive beside a million
unconsumed messages.

    python -m benchmarks.messages [--runs 200] [--rounds 3] [--waiting 10000] [--sample 10]
                                  [--backlog 1000000] [--skip latency,waiting,backlog] [--listen-delay 0]
                                  [--url URL]

latency   one after another, on an idle worker (`listen_delay` 0 unless `--listen-delay`, concurrency 16): a run
          of `receiver` (step.receive on topic "t", then a step `stamp` that returns the moment it starts) is
          started and parks as `waiting`; then `send()` -> `stamp` starts, p50/p95/p99. Two placements: `same` (the
          sender's own WorkflowManager runs the worker; perf_counter) and `other` (a worker process of this
          script, `--serve`; the sender is a manager without a worker; time.time()). With `other`, on the
          same worker process, also run() -> the first step starts (`stamped`, as benchmarks/latency.py), and
          the ratio send->continue p50 / run->start p50 (goal: at most 1.5). With `--listen-delay 500` (the
          default configuration): a woken run is claimed at once whatever listen_delay (migration 0017), a new
          run after it.
waiting   one worker process (concurrency 16); `--waiting` runs of `receiver` are started and all park;
          worker RSS (VmRSS) before and while they wait (largest of 5 samples over `--sample` seconds), CPU%
          over that time (100 = one core); then one message to each (sent 500 at a time), and the time from
          the first send to every run completed (runs/s), and RSS after.
backlog   on a worker process as in `latency`: send->continue p50/p99 with the messages table empty, then
          with `--backlog` unconsumed messages for 1,000 other runs (one INSERT ... SELECT generate_series,
          then ANALYZE), and the ratio (goal: within 20%). Also the take itself: `take_message` (queries.sql)
          under EXPLAIN (ANALYZE, BUFFERS), taking the one message of a run made `running` for it inside a
          transaction that is rolled back: execution time p50 (empty / backlog), and the plan with the backlog.

Each measurement gets a fresh schema, and 5 uncounted warm-up runs. With --rounds R, every figure is printed
per round, then the median of the rounds (min-max in brackets). PostgreSQL only (SQLite has no notifications;
a receive there waits for a poll).
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
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_common import (
    ROOT,
    arguments,
    client_config,
    cpu_seconds,
    database,
    median,
    new_schema,
    percentile,
    report,
    rss_mb,
    stop_workers,
)
from benchmarks.bench_workflows import stamp, stamped
from sonamu_tasks import RunStatus, WorkflowDefinition, WorkflowManager, define_config, workflow
from sonamu_tasks.backends.postgres.queries import QUERIES

POLL_INTERVAL_MS = 1000  # as in bench_worker.py
CONCURRENCY = 16
WARM_UP = 5
OTHER_RUNS = 1000  # the runs the backlog's messages are for
UNFINISHED = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING]


@workflow(version="1")
async def receiver(step: Any) -> dict[str, Any]:
    """Waits for one message on topic "t"; the step after it returns when it started."""
    message = await step.receive("r", topic="t")
    started: dict[str, float] = await step.define("stamp", stamp).run()
    return {"message": message, **started}


ALL: list[WorkflowDefinition[Any, Any]] = [receiver, stamped]
RECEIVER = {"name": "receiver", "version": "1"}


def _worker_options() -> dict[str, Any]:
    listen_delay = int(os.environ.get("BENCH_LISTEN_DELAY", "0"))  # set by main() for its worker processes too
    return {"concurrency": CONCURRENCY, "listen_delay": listen_delay, "poll_interval_ms": POLL_INTERVAL_MS}


async def serve() -> None:
    """A worker process (`--serve`), configured by BENCH_URL and BENCH_SCHEMA."""
    logging.basicConfig(level=logging.WARNING)
    config = define_config(
        database_url=os.environ["BENCH_URL"],
        schema=os.environ["BENCH_SCHEMA"],
        tasks={"worker_options": _worker_options()},
    )
    await WorkflowManager(config, workflows=ALL).serve()


@asynccontextmanager
async def caller(url: str, placement: str) -> AsyncIterator[tuple[WorkflowManager, str, int | None]]:
    """A manager on a fresh schema (its schema, and the worker process's pid or None): the worker in this
    process (`same`) or in a process of its own (`other`)."""
    schema = new_schema()
    if placement == "same":
        config = define_config(database_url=url, schema=schema, tasks={"worker_options": _worker_options()})
        async with WorkflowManager(config, workflows=ALL) as manager:
            await _warm_up(manager)
            yield manager, schema, None
        return
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "BENCH_URL": url, "BENCH_SCHEMA": schema}
    async with WorkflowManager(client_config(url, schema)) as manager:  # migrates before the worker starts
        worker = subprocess.Popen([sys.executable, "-m", "benchmarks.messages", "--serve"], cwd=ROOT, env=env)
        try:
            await _warm_up(manager)
            yield manager, schema, worker.pid
        finally:
            stop_workers([worker])


async def _warm_up(manager: WorkflowManager) -> None:
    for _ in range(WARM_UP):
        await (await manager.run(stamped, {"steps": 1})).result(timeout=60)
    await send_to_continue(manager, WARM_UP, across=True)


async def _until_waiting(handle: Any) -> None:
    deadline = time.monotonic() + 30
    while await handle.status() is not RunStatus.WAITING:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {handle.id} never parked")
        await asyncio.sleep(0.002)


async def send_to_continue(manager: WorkflowManager, runs: int, across: bool) -> list[float]:
    """Seconds from send() to the start of the step after the receive, for `runs` parked runs in turn."""
    seconds: list[float] = []
    for index in range(runs):
        handle = await manager.run(receiver)
        await _until_waiting(handle)
        wall, perf = time.time(), time.perf_counter()
        await manager.send(handle.id, index, topic="t")
        out = await handle.result(timeout=60)
        assert out["message"] == index, out
        seconds.append(out["time"] - wall if across else out["perf"] - perf)
    return seconds


async def run_to_start(manager: WorkflowManager, runs: int) -> list[float]:
    """Seconds from run() to the first step's start across processes (as benchmarks/latency.py)."""
    seconds: list[float] = []
    for _ in range(runs):
        wall = time.time()
        out = await (await manager.run(stamped, {"steps": 1})).result(timeout=60)
        seconds.append(out["time"] - wall)
    return seconds


def summarize(name: str, values: list[float], unit: str, **labels: Any) -> None:
    """The median of the rounds' figures, with their range when there is more than one."""
    spread = f"[{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else ""
    report(name, median(values), unit, rounds=len(values), range=spread or "-", **labels)


class Figures:
    """Per-round figures, printed as they come, and their medians at the end."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, tuple[tuple[str, Any], ...]], list[float]] = {}

    def add(self, name: str, value: float, unit: str, **labels: Any) -> None:
        report(name, value, unit, **labels)
        labels.pop("n", None)
        self.values.setdefault((name, unit, tuple(labels.items())), []).append(value)

    def percentiles(self, name: str, seconds: list[float], quantiles: tuple[int, ...], **labels: Any) -> None:
        for q in quantiles:
            self.add(f"{name}.p{q}", percentile(seconds, q) * 1000, "ms", n=len(seconds), **labels)

    def summary(self) -> None:
        print("-- medians of the rounds --", flush=True)
        for (name, unit, labels), values in self.values.items():
            summarize(name, values, unit, **dict(labels))


# --- latency -------------------------------------------------------------------------------------------------


async def latency(url: str, args: argparse.Namespace, figures: Figures) -> None:
    for placement in ("same", "other"):
        async with caller(url, placement) as (manager, _, _):
            across = placement == "other"
            sends = await send_to_continue(manager, args.runs, across)
            delay = args.listen_delay
            figures.percentiles(
                "messages.send_to_continue", sends, (50, 95, 99), placement=placement, listen_delay=delay
            )
            if across:
                starts = await run_to_start(manager, args.runs)
                figures.percentiles(
                    "messages.run_to_step_start", starts, (50, 95, 99), placement=placement, listen_delay=delay
                )
                ratio = percentile(sends, 50) / percentile(starts, 50)
                figures.add("messages.send_over_run_p50", ratio, "x", placement=placement, goal="<=1.5")


# --- many waiting runs ---------------------------------------------------------------------------------------


async def waiting(url: str, args: argparse.Namespace, figures: Figures) -> None:
    labels = {"runs": args.waiting, "concurrency": CONCURRENCY}
    async with caller(url, "other") as (manager, _, pid):
        assert pid is not None
        figures.add("messages.waiting.rss_before", rss_mb(pid), "MiB", **labels)
        began = time.perf_counter()
        handles: list[Any] = []
        for start in range(0, args.waiting, 500):
            count = min(500, args.waiting - start)
            handles += await asyncio.gather(*(manager.run(receiver) for _ in range(count)))
        await _until_none(manager, [RunStatus.PENDING, RunStatus.RUNNING], timeout_s=600)
        figures.add("messages.waiting.start_and_park", time.perf_counter() - began, "s", **labels)
        rss: list[float] = []
        cpu_began, wall_began = cpu_seconds(pid), time.perf_counter()
        for _ in range(5):
            await asyncio.sleep(args.sample / 5)
            rss.append(rss_mb(pid))
        cpu = (cpu_seconds(pid) - cpu_began) / (time.perf_counter() - wall_began) * 100
        figures.add("messages.waiting.rss_while_waiting", max(rss), "MiB", samples=5, **labels)
        figures.add("messages.waiting.cpu_while_waiting", cpu, "%", seconds=args.sample, **labels)

        began = time.perf_counter()
        for start in range(0, len(handles), 500):
            batch = handles[start : start + 500]
            await asyncio.gather(*(manager.send(h.id, i, topic="t") for i, h in enumerate(batch, start)))
        sent = time.perf_counter() - began
        await _until_none(manager, UNFINISHED, timeout_s=600)
        done = time.perf_counter() - began
        figures.add("messages.waiting.send_all", sent, "s", **labels)
        figures.add("messages.waiting.first_send_to_all_done", done, "s", **labels)
        figures.add("messages.waiting.wake_and_finish_rate", args.waiting / done, "runs/s", **labels)
        figures.add("messages.waiting.rss_after", rss_mb(pid), "MiB", **labels)
        outputs = [await h.result(timeout=60) for h in handles[:: max(1, len(handles) // 100)]]
        assert all(out["message"] is not None for out in outputs), outputs[:3]


async def _until_none(manager: WorkflowManager, statuses: list[RunStatus], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (await manager.list_runs(status=statuses, limit=1)).items:
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs still {statuses} after {timeout_s:.0f}s")
        await asyncio.sleep(0.05)


# --- a million unconsumed messages ---------------------------------------------------------------------------

BACKLOG_SQL = """
INSERT INTO messages (run_id, topic, payload)
SELECT others.ids[1 + g %% cardinality(others.ids)], 't', jsonb_build_object('n', g)
FROM generate_series(0, %(count)s - 1) AS g,
     (SELECT array_agg(id ORDER BY id) AS ids FROM runs WHERE workflow_name = 'nobody') AS others
"""

# The run whose take is explained: made `running` with a known lease token and given one message, inside a
# transaction that is rolled back.
CLAIM_FOR_EXPLAIN = "UPDATE runs SET status = 'running', lease_token = %(lease_token)s WHERE id = %(run_id)s"
MESSAGE_FOR_EXPLAIN = "INSERT INTO messages (run_id, topic, payload) VALUES (%(run_id)s, 't', '0')"


async def backlog(url: str, args: argparse.Namespace, figures: Figures) -> None:
    labels = {"backlog": args.backlog}
    async with caller(url, "other") as (manager, schema, _):
        for start in range(0, OTHER_RUNS, 500):  # runs no worker serves: the messages are for them
            count = min(500, OTHER_RUNS - start)
            await asyncio.gather(*(manager.run({"name": "nobody", "version": "1"}) for _ in range(count)))
        target = (await manager.run({"name": "target", "version": "1"})).id  # no worker serves either
        with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
            conn.execute("ANALYZE")
            plain = await send_to_continue(manager, args.runs, across=True)
            take_plain = await asyncio.to_thread(_take_times, conn, target, 50, False)
            began = time.perf_counter()
            await asyncio.to_thread(conn.execute, BACKLOG_SQL, {"count": args.backlog})
            await asyncio.to_thread(conn.execute, "ANALYZE messages")
            figures.add("messages.backlog.insert", time.perf_counter() - began, "s", **labels)
            full = await send_to_continue(manager, args.runs, across=True)
            take_full = await asyncio.to_thread(_take_times, conn, target, 50, args.show_plan)
            args.show_plan = False  # once
            unconsumed = conn.execute("SELECT count(*) FROM messages WHERE consumed_at IS NULL").fetchone()
        assert unconsumed is not None and unconsumed[0] == args.backlog, unconsumed
        for label, seconds in (("empty", plain), ("backlog", full)):
            figures.percentiles("messages.backlog.send_to_continue", seconds, (50, 99), table=label, **labels)
        ratio = percentile(full, 50) / percentile(plain, 50)
        figures.add("messages.backlog.send_to_continue_ratio", ratio, "x", goal="<=1.2", **labels)
        for label, ms in (("empty", take_plain), ("backlog", take_full)):
            figures.add("messages.backlog.take_execution.p50", percentile(ms, 50), "ms", table=label, **labels)
        figures.add("messages.backlog.take_ratio", percentile(take_full, 50) / percentile(take_plain, 50), "x")


def _take_times(conn: psycopg.Connection[Any], run_id: str, count: int, show: bool) -> list[float]:
    """Execution times (ms, from EXPLAIN ANALYZE) of take_message taking the one message of run `run_id`,
    each inside a transaction that is rolled back."""
    times: list[float] = []
    for index in range(count):
        params = {
            "run_id": run_id,
            "lease_token": uuid.uuid4(),
            "name": "r",
            "topic": "t",
            "started_at": "now",
            "waits_for": '{"topic": "t"}',
        }
        with conn.transaction(force_rollback=True):
            conn.execute(CLAIM_FOR_EXPLAIN, params)
            conn.execute(MESSAGE_FOR_EXPLAIN, params)
            cursor = psycopg.ClientCursor(conn)
            plan = [str(r[0]) for r in cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {QUERIES['take_message']}", params)]
        times.append(_execution_ms(plan))
        if show and index == count - 1:
            print("EXPLAIN (ANALYZE, BUFFERS) take_message, with the backlog:", flush=True)
            print("\n".join(f"    {line}" for line in plan), flush=True)
    return times


def _execution_ms(plan: list[str]) -> float:
    line = next(line for line in plan if line.startswith("Execution Time:"))
    return float(line.split()[2])


SECTIONS: dict[str, Callable[[str, argparse.Namespace, Figures], Any]] = {
    "latency": latency,
    "waiting": waiting,
    "backlog": backlog,
}


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--runs", type=int, default=200, help="sends (and run() calls) per latency measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--waiting", type=int, default=10_000, help="runs waiting at once")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds of RSS/CPU samples while they wait")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="unconsumed messages for other runs")
    parser.add_argument("--skip", default="", help="latency, waiting and/or backlog, comma-separated")
    parser.add_argument("--listen-delay", type=int, default=0, help="the workers' listen_delay in ms (latency)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.serve:
        os.environ["BENCH_LISTEN_DELAY"] = str(args.listen_delay)
    if args.serve:
        await serve()
        return
    if args.sqlite:
        parser.error("PostgreSQL only: SQLite has no notifications")
    args.show_plan = True
    skip = set(args.skip.split(","))
    figures = Figures()
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for round_ in range(args.rounds):
            print(f"-- round {round_ + 1} of {args.rounds} --", flush=True)
            for name, section in SECTIONS.items():
                if name not in skip:
                    await section(url, args, figures)
    figures.summary()


if __name__ == "__main__":
    asyncio.run(main())
