"""The database's commit ceiling, and how close the engine gets to it.

    python -m benchmarks.pg_limit [-T 10] [--clients 1,16] [--workflows 5000] [--concurrency 128] [--sqlite]

On the same kind of server the other benchmarks use (fsync on), pgbench commits tiny single-row INSERT
transactions at each client count for -T seconds and prints commits/s. The workflow ceiling is that
divided by WRITES_PER_WORKFLOW. Then one throughput round (3-step workflows, one worker process) runs on
the same server, and its workflows/s is printed as a fraction of each ceiling.

With --sqlite, threads (one connection each, WAL, synchronous=FULL, BEGIN IMMEDIATE: the engine's
settings) commit the same INSERTs into a SQLite file, and the round runs on the SQLite backend.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sqlite3
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from benchmarks.bench_common import arguments, backend_name, database, report
from benchmarks.throughput import one_round
from sonamu_tasks.testing import find_postgres_bin

# The transactions one 3-step workflow needs on the worker side: its claim (an UPDATE), the checkpoints of
# its first two steps (INSERTs into steps), and the last step's checkpoint with its completion (one
# statement) = 4. Not counted: the INSERT that enqueues it (made by the caller, before the round's clock
# starts), the reads (seconds_until_due, list_runs; no WAL flush) and heartbeats (one per worker every
# lease/3, not per run). The engine claims many runs per statement and group-commits concurrent checkpoints
# and completions, so several runs share one commit: it can beat this one-commit-per-write ceiling, and a
# fraction above 1 is that batching at work.
WRITES_PER_WORKFLOW = 4
STEPS = 3

TABLE = "bench_commit_limit"


def pgbench_commits(url: str, clients: int, seconds: int, tmp: Path) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int NOT NULL)")
    script = tmp / "insert.sql"
    script.write_text(f"INSERT INTO {TABLE} (v) VALUES (1);\n")
    command = [str(find_postgres_bin() / "pgbench"), "-n", "-f", str(script), "-c", str(clients)]
    command += ["-j", str(min(clients, 2)), "-T", str(seconds), url]  # the URL as dbname: libpq expands it
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=True)
    match = re.search(r"^tps = ([0-9.]+)", result.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no tps in pgbench output:\n{result.stdout}\n{result.stderr}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {TABLE}")
    return float(match.group(1))


def sqlite_commits(path: str, clients: int, seconds: int) -> float:
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
    setup.close()
    stop_at = time.perf_counter() + seconds

    def client() -> int:
        # sqlite3 releases the GIL while SQLite works, so threads contend for the file as processes would.
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA synchronous = FULL")
        commits = 0
        while time.perf_counter() < stop_at:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"INSERT INTO {TABLE} (v) VALUES (1)")
            conn.execute("COMMIT")
            commits += 1
        conn.close()
        return commits

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(lambda _: client(), range(clients)))
    return total / (time.perf_counter() - began)


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("-T", dest="seconds", type=int, default=10, help="seconds per client count")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--workflows", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=128)
    args: argparse.Namespace = parser.parse_args()
    backend = backend_name(args)
    ceilings: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for clients in [int(c) for c in args.clients.split(",")]:
            if args.sqlite:
                commits = sqlite_commits(str(Path(tmp) / "limit.db"), clients, args.seconds)
            else:
                commits = pgbench_commits(url, clients, args.seconds, Path(tmp))
            ceilings[clients] = commits / WRITES_PER_WORKFLOW
            report("pg_limit.commits_per_s", commits, "commits/s", backend=backend, clients=clients)
            report(
                "pg_limit.workflow_ceiling",
                ceilings[clients],
                "workflows/s",
                backend=backend,
                clients=clients,
                writes_per_workflow=WRITES_PER_WORKFLOW,
            )
        elapsed = await one_round(url, args.workflows, STEPS, 1, args.concurrency)
        ours = args.workflows / elapsed
        labels = {"backend": backend, "processes": 1, "concurrency": args.concurrency, "S": STEPS}
        report("pg_limit.our_workflows_per_s", ours, "workflows/s", **labels)
        for clients, ceiling in ceilings.items():
            report("pg_limit.fraction_of_ceiling", ours / ceiling, "x", ceiling_clients=clients, **labels)


if __name__ == "__main__":
    asyncio.run(main())
