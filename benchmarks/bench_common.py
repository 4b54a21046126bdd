"""Shared by the benchmark scripts: a throwaway PostgreSQL (fsync on), worker processes, statistics."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sonamu_tasks.testing import PostgresCluster

ROOT = Path(__file__).resolve().parents[1]


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", help="PostgreSQL URL (default: start a throwaway cluster with fsync on)")
    parser.add_argument("--sqlite", action="store_true", help="Measure the embedded SQLite backend instead")
    return parser


@contextmanager
def database(args: argparse.Namespace, tmp: Path) -> Iterator[str]:
    if args.sqlite:
        yield f"sqlite:///{tmp / 'bench.db'}"
    elif args.url:
        yield args.url
    else:
        with PostgresCluster(fsync=True, settings={"shared_buffers": "256MB", "max_wal_size": "2GB"}) as cluster:
            yield cluster.url


def start_workers(url: str, schema: str, count: int, **options: Any) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_URL": url, "BENCH_SCHEMA": schema}
    env.update({f"BENCH_{key.upper()}": str(value) for key, value in options.items()})
    return [
        subprocess.Popen([sys.executable, "-m", "benchmarks.bench_worker"], cwd=ROOT, env=env) for _ in range(count)
    ]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(name: str, value: float, unit: str, **labels: Any) -> None:
    tags = " ".join(f"{k}={v}" for k, v in labels.items())
    print(f"{name:<34} {value:>12.2f} {unit:<14} {tags}", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)
