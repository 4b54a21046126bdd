"""Side by side with Procrastinate and DBOS, on one throwaway PostgreSQL (fsync on), in one run.

    python -m benchmarks.peers [--rounds 3] [--runs 300] [--workflows 10000] [--concurrency 128] [--skip ...]

The peers are installed by this script, each into a venv of its own under benchmarks/.peers/ (git-ignored;
`pip install procrastinate==3.10.0 psycopg[binary]`, `pip install dbos==3.4.0`, made once and reused), and run
there by benchmarks/peer_procrastinate.py and benchmarks/peer_dbos.py, each in a database of its own on the same
server. Per round:
  latency     across processes, runs one after another on an idle worker process (concurrency 16):
              ours  run() -> the step starts (the step's time.time()) and run() -> result() (the caller's clock),
                    a 1-step workflow, listen_delay 0 (benchmarks.latency's `other` placement);
              Procrastinate  defer -> the task starts (the task's time.time()) and defer -> done (the `at` of the
                    job's succeeded event, written just before the finishing commit: a little earlier than a
                    waiter could know).
  throughput  a backlog of --workflows drained by one worker process at --concurrency: ours 1-step workflows
              (benchmarks.throughput), Procrastinate trivial jobs, DBOS 1-step workflows (a queue polled every
              10 ms; its default of 1 s would cap it at --concurrency per second).
Prints every figure per round, then medians, then our ratios to Procrastinate (taken per round, then the median).
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_common import ROOT, arguments, database, percentile, ratios, report, report_medians
from benchmarks.latency import WARM_UP, caller, measure
from benchmarks.throughput import one_round

PEERS = ROOT / "benchmarks" / ".peers"
PACKAGES = {
    "procrastinate": ["procrastinate==3.10.0", "psycopg[binary]"],
    "dbos": ["dbos==3.4.0"],
}


def peer_python(name: str) -> Path:
    """The Python of the peer's own venv, made (and the peer installed) on first use."""
    venv = PEERS / name
    python = venv / "bin" / "python"
    if not python.exists():
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES[name]], check=True)
    return python


def peer_database(url: str, name: str) -> str:
    """A fresh database for a peer on the same server (its tables live in their own schema or in public)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return url.rsplit("/", 1)[0] + "/" + name


def run_peer(name: str, *args: str) -> list[dict[str, Any]]:
    script = ROOT / "benchmarks" / f"peer_{name}.py"
    result = subprocess.run(
        [str(peer_python(name)), str(script), *args], capture_output=True, text=True, timeout=1800, cwd=ROOT
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


async def our_latency(url: str, runs: int) -> dict[str, float]:
    async with caller(url, "other", 0.0) as manager:
        await measure(manager, WARM_UP, 1, True)
        to_start, to_result = await measure(manager, runs, 1, True)
    return {
        "ours.run_to_start.p50": percentile(to_start, 50) * 1000,
        "ours.run_to_start.p99": percentile(to_start, 99) * 1000,
        "ours.run_to_result.p50": percentile(to_result, 50) * 1000,
        "ours.run_to_result.p99": percentile(to_result, 99) * 1000,
    }


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--skip", default="", help="comma-separated: latency,throughput,procrastinate,dbos")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    figures: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp, database(args, Path(tmp)) as url:
        for round_ in range(1, args.rounds + 1):
            this: dict[str, float] = {}
            if "latency" not in skip:
                this.update(await our_latency(url, args.runs))
                if "procrastinate" not in skip:
                    peer_url = peer_database(url, f"peer_procrastinate_{round_}")
                    for figure in run_peer("procrastinate", "latency", peer_url, "--runs", str(args.runs)):
                        for q in ("p50", "p99"):
                            this[f"{figure['figure']}.{q}"] = figure[q]
            if "throughput" not in skip:
                elapsed = await one_round(url, args.workflows, 1, 1, args.concurrency)
                this["ours.workflows_per_s"] = args.workflows / elapsed
                if "procrastinate" not in skip:
                    peer_url = peer_database(url, f"peer_procrastinate_t{round_}")
                    jobs = ["--jobs", str(args.workflows), "--concurrency", str(args.concurrency)]
                    for figure in run_peer("procrastinate", "throughput", peer_url, *jobs):
                        this[figure["figure"]] = figure["value"]
                if "dbos" not in skip:
                    peer_url = peer_database(url, f"peer_dbos_{round_}")
                    runs = ["--workflows", str(args.workflows), "--concurrency", str(args.concurrency)]
                    for figure in run_peer("dbos", "throughput", peer_url, *runs):
                        this[figure["figure"]] = figure["value"]
            pairs = {
                "ratio.start_p50": ("ours.run_to_start.p50", "procrastinate.defer_to_start.p50"),
                "ratio.start_p99": ("ours.run_to_start.p99", "procrastinate.defer_to_start.p99"),
                "ratio.result_p50_over_done_p50": ("ours.run_to_result.p50", "procrastinate.defer_to_done.p50"),
                "ratio.throughput_over_procrastinate": ("ours.workflows_per_s", "procrastinate.jobs_per_s"),
                "ratio.throughput_over_dbos": ("ours.workflows_per_s", "dbos.workflows_per_s"),
            }
            this.update(ratios(this, pairs))
            for key, value in this.items():
                report(f"peers.{key}", value, "", round=round_)
                figures[key].append(value)
        report_medians("peers", figures)


if __name__ == "__main__":
    asyncio.run(main())
