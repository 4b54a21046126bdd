"""What a SQLite claim, a worker's poll and a retention batch cost with many rows they should not read.

    python -m benchmarks.sqlite_scans [--runs 50000] [--finished 100000,300000] [--calls 30] [--skip claims,retention]

claims: on a fresh file per case, `--runs` pending runs are created (run_many batches of 5,000), then `--calls`
times one `claim_runs` (limit 4, the four workflows below) and one `seconds_until_due`, each timed from the
caller (the backend's thread hop included); median and min. Cases: no runs; runs of a workflow no worker serves,
due now and starting in a day; runs of a served workflow, due now (each claim takes 4) and starting in a day;
a worker serving 100 (workflow, version) pairs, with no runs and with a served backlog.

retention: `--finished` completed runs (1,000 characters of input, 3 steps each) finished a day ago, inserted with
plain SQL into a migrated file; then `count_finished_runs` and 5 batches of `delete_finished_runs` (500 runs),
with nothing expired (retention 30 days) and all expired (1 hour): median, min and max of the batches. Each
batch is one write transaction, so its time is how long every other writer of the file waits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sonamu_tasks.backends.base import FinishedRuns, NewRun
from sonamu_tasks.backends.sqlite import SqliteBackend
from sonamu_tasks.ids import new_run_id

SERVED = [("audited", "1"), ("flaky", "1"), ("sleeper", "1"), ("waiter", "1")]
MANY = [(f"wf{i}", "1") for i in range(99)] + [("audited", "1")]


def ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):7.2f} ms (min {1000 * min(values):6.2f})"


async def claims_case(
    path: Path,
    label: str,
    calls: int,
    runs: int,
    name: str | None,
    delay: timedelta | None,
    served: Sequence[tuple[str, str]],
) -> None:
    backend = SqliteBackend(str(path))
    await backend.migrate()
    for start in range(0, runs if name else 0, 5000):
        batch = [NewRun(new_run_id(), name or "", "1", "{}", start_delay=delay) for _ in range(min(5000, runs - start))]
        await backend.create_runs(batch)
    claim_times, due_times, taken = [], [], 0
    for _ in range(calls):
        began = time.perf_counter()
        taken = len(await backend.claim_runs("probe", served, 4, timedelta(seconds=60)))
        claim_times.append(time.perf_counter() - began)
        began = time.perf_counter()
        await backend.seconds_until_due(served)
        due_times.append(time.perf_counter() - began)
    await backend.close()
    print(f"{label:38s} claim {ms(claim_times)} took {taken}   seconds_until_due {ms(due_times)}", flush=True)


async def claims(folder: Path, n: int, calls: int) -> None:
    day = timedelta(days=1)
    cases = [
        ("no runs", 0, None, None, SERVED),
        (f"{n} unserved, due", n, "ghost", None, SERVED),
        (f"{n} unserved, starting in a day", n, "ghost", day, SERVED),
        (f"{n} served, due", n, "audited", None, SERVED),
        (f"{n} served, starting in a day", n, "audited", day, SERVED),
        ("100 served pairs, no runs", 0, None, None, MANY),
        (f"100 served pairs, {n} served due", n, "audited", None, MANY),
    ]
    for i, (label, runs, name, delay, served) in enumerate(cases):
        await claims_case(folder / f"claims{i}.db", label, calls, runs, name, delay, served)


async def retention(folder: Path, finished: int) -> None:
    path = folder / f"finished{finished}.db"
    backend = SqliteBackend(str(path))
    await backend.migrate()
    await backend.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    day_ago = time.time_ns() // 1000 - 86_400_000_000
    payload = json.dumps({"pad": "x" * 1000})
    for k in range(finished):
        run_id, at = str(uuid.uuid4()), day_ago + k
        conn.execute(
            "INSERT INTO runs (id, workflow_name, version, status, input, output, available_at, created_at,"
            " started_at, finished_at, updated_at) VALUES (?, 'audited', '1', 'completed', ?, '3', ?, ?, ?, ?, ?)",
            (run_id, payload, at, at, at, at + 500, at + 500),
        )
        conn.executemany(
            "INSERT INTO steps (run_id, name, kind, status, output, started_at, finished_at)"
            " VALUES (?, ?, 'call', 'completed', '1', ?, ?)",
            [(run_id, f"s{s}", at, at) for s in range(3)],
        )
    conn.execute("COMMIT")
    conn.close()
    backend = SqliteBackend(str(path))
    for older_than, what in ((timedelta(days=30), "nothing expired"), (timedelta(hours=1), "all expired")):
        began = time.perf_counter()
        count = await backend.count_finished_runs(FinishedRuns(older_than, workflow="audited"))
        counted = time.perf_counter() - began
        batches, deleted = [], 0
        for _ in range(5):
            began = time.perf_counter()
            deleted = await backend.delete_finished_runs(FinishedRuns(older_than, workflow="audited"), 500)
            batches.append(time.perf_counter() - began)
        print(
            f"{finished} finished, {what:16s} count {count} in {1000 * counted:.1f} ms; a batch deleting {deleted}:"
            f" {ms(batches)}, max {1000 * max(batches):.1f} ms",
            flush=True,
        )
    await backend.close()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if "claims" not in args.skip:
            await claims(Path(tmp), args.runs, args.calls)
        if "retention" not in args.skip:
            for finished in args.finished:
                await retention(Path(tmp), finished)


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50_000)
    parser.add_argument("--finished", type=_numbers, default=[100_000, 300_000])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--skip", default="", help="claims, retention")
    asyncio.run(main(parser.parse_args()))
