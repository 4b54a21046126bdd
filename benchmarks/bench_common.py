"""Shared by the benchmark scripts: a throwaway PostgreSQL (fsync on), worker processes, statistics."""

from __future__ import annotations

import argparse
import asyncio
import os
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


def client_config(url: str, schema: str) -> Config:
    """A process that only starts runs and waits for them (no worker)."""
    return define_config(database_url=url, schema=schema, tasks={"enable_worker": False})


def start_workers(url: str, schema: str, count: int, **options: Any) -> list[subprocess.Popen[bytes]]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "BENCH_URL": url, "BENCH_SCHEMA": schema}
    env.update({f"BENCH_{key.upper()}": str(value) for key, value in options.items()})
    return [
        subprocess.Popen([sys.executable, "-m", "benchmarks.bench_worker"], cwd=ROOT, env=env) for _ in range(count)
    ]


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
