"""Shared by the benchmark scripts: a throwaway PostgreSQL (fsync on), worker processes, statistics."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sonamu_tasks import Config, RunStatus, WorkflowManager, define_config
from sonamu_tasks.testing import PostgresCluster

ROOT = Path(__file__).resolve().parents[1]
UNFINISHED = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING]


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="PostgreSQL URL (default: start a throwaway cluster with fsync on)")
    parser.add_argument("--sqlite", action="store_true", help="Measure the embedded SQLite backend instead")
    return parser


def backend_name(args: argparse.Namespace) -> str:
    return "sqlite" if args.sqlite else "postgres"


@contextmanager
def database(args: argparse.Namespace, tmp: Path) -> Iterator[str]:
    if args.sqlite:
        yield f"sqlite:///{tmp / 'bench.db'}"
    elif args.url:
        yield args.url
    else:
        with PostgresCluster(fsync=True, settings={"shared_buffers": "256MB", "max_wal_size": "2GB"}) as cluster:
            yield cluster.url


def new_schema() -> str:
    """A fresh PostgreSQL schema per measurement, so no round sees another's runs (ignored by SQLite)."""
    return f"bench_{uuid.uuid4().hex[:8]}"


def client_config(url: str, schema: str, queues: list[dict[str, Any]] | None = None) -> Config:
    """A process that only starts runs and waits for them (no worker); `queues` (Queue arguments) are declared,
    so their limits are stored before any run is enqueued."""
    return define_config(database_url=url, schema=schema, tasks={"enable_worker": False, "queues": queues or []})


def start_workers(
    url: str, schema: str, count: int, *, module: str = "benchmarks.bench_worker", **options: Any
) -> list[subprocess.Popen[bytes]]:
    """`count` worker processes (`python -m module`, bench_worker's unless said), configured by BENCH_* variables:
    the server, the schema, and each of `options` (BENCH_CONCURRENCY for concurrency=...)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "BENCH_URL": url, "BENCH_SCHEMA": schema}
    env.update({f"BENCH_{key.upper()}": str(value) for key, value in options.items()})
    return [subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env) for _ in range(count)]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


async def enqueue(
    client: WorkflowManager, spec: dict[str, str], input: Any, count: int, batch: int = 500, **run_options: Any
) -> None:
    """Start `count` runs with the same input and run options, `batch` at a time."""
    for start in range(0, count, batch):
        runs = (client.run(spec, input, **run_options) for _ in range(start, min(start + batch, count)))
        await asyncio.gather(*runs)


async def wait_until_finished(
    client: WorkflowManager, timeout_s: float, *, workflow: str | None = None, interval_s: float = 0.05
) -> None:
    """Return once no run (of `workflow`) is pending, running or sleeping; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (await client.list_runs(status=UNFINISHED, workflow=workflow, limit=1)).items:
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs still unfinished after {timeout_s:.0f}s")
        await asyncio.sleep(interval_s)


def rss_mb(pid: int) -> float:
    """Resident set size of a process (VmRSS from /proc/PID/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of the line


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL server's main process if it runs on this machine (its /proc readable), else None."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    try:
        parent = int(Path(f"/proc/{row[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
        Path(f"/proc/{parent}/stat").read_text()
    except (OSError, ValueError):
        return None
    return parent


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time of a PostgreSQL server so far: the postmaster, its exited children (cutime + cstime: the
    backends of closed connections) and its live children (backends, autovacuum, WAL writer...)."""
    clock = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / clock  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / clock
    return total


def children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children (worker processes once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds spent by the worker processes (this process's children) and the PostgreSQL server between
    `start()` and `stop()` (after the workers have been waited for). The server part is None when the server
    is not on this machine."""

    def __init__(self, url: str) -> None:
        self.postmaster = None if url.startswith("sqlite") else postmaster_pid(url)
        self.functions: dict[str, tuple[int, float]] = {}  # calls and ms of SQL functions, if a caller reads them

    def start(self) -> None:
        self._workers = children_cpu_seconds()
        self._server = server_cpu_seconds(self.postmaster) if self.postmaster else 0.0

    def stop(self) -> tuple[float, float | None]:
        workers = children_cpu_seconds() - self._workers
        server = server_cpu_seconds(self.postmaster) - self._server if self.postmaster else None
        self.last = (workers, server)
        return self.last

    def per_item_us(self, items: int, overhead_s: float = 0.0) -> float:
        """The last measurement's CPU (workers + server), less `overhead_s`, per item, in microseconds."""
        workers, server = self.last
        return (workers + (server or 0.0) - overhead_s) / items * 1e6

    async def startup(self, url: str, processes: int, settle_s: float = 3.0, **worker_options: Any) -> float:
        """CPU seconds that starting and stopping `processes` workers costs with nothing to do (imports,
        connections, the first claims), to subtract from a round's."""
        schema = new_schema()
        async with WorkflowManager(client_config(url, schema, worker_options.pop("declared", None))):
            self.start()
            workers = start_workers(url, schema, processes, **worker_options)
            await asyncio.sleep(settle_s)
            stop_workers(workers)
            workers_s, server_s = self.stop()
        return workers_s + (server_s or 0.0)


def enable_function_stats(url: str) -> None:
    """`track_functions = 'pl'` for the database (new connections): pg_stat_user_functions counts the calls."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{conn.info.dbname}\" SET track_functions = 'pl'")


async def function_stats(client: WorkflowManager, schema: str) -> dict[str, tuple[int, float]]:
    """Calls and total milliseconds of the schema's SQL functions (pg_stat_user_functions; `track_functions`
    is set to 'pl' for the database when a queue limit is compared), the workers' backends having exited."""
    backend: Any = client.backend
    if not hasattr(backend, "_pool"):
        return {}
    async with backend._pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT funcname, calls, total_time FROM pg_stat_user_functions WHERE schemaname = %s", [schema]
        )
        return {name: (calls, total) for name, calls, total in await cursor.fetchall()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(name: str, value: float, unit: str, **labels: Any) -> None:
    tags = " ".join(f"{k}={v}" for k, v in labels.items())
    print(f"{name:<34} {value:>12.2f} {unit:<14} {tags}", flush=True)


def report_percentiles(
    name: str, seconds: list[float], quantiles: tuple[int, ...] = (50, 95, 99), **labels: Any
) -> None:
    """One line per percentile of durations given in seconds, printed in milliseconds."""
    for q in quantiles:
        report(f"{name}.p{q}", percentile(seconds, q) * 1000, "ms", n=len(seconds), **labels)


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratios(figures: dict[str, float], pairs: dict[str, tuple[str, str]]) -> dict[str, float]:
    """`name: over / under` for each pair whose two figures were measured."""
    return {
        name: figures[over] / figures[under] for name, (over, under) in pairs.items() if {over, under} <= figures.keys()
    }


def report_medians(prefix: str, figures: dict[str, list[float]]) -> None:
    """The median of each figure over the rounds, with its range."""
    print("# median of the rounds", flush=True)
    for key, values in figures.items():
        report(
            f"{prefix}.median.{key}",
            median(values),
            "",
            rounds=len(values),
            low=f"{min(values):.2f}",
            high=f"{max(values):.2f}",
        )
