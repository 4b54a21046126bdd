"""DBOS's side of benchmarks/peers.py: the throughput of 1-step workflows. Runs with the Python of the venv
peers.py made for it (it imports DBOS, never sonamu_tasks); prints one JSON object.

    python peer_dbos.py throughput URL --workflows 10000 --concurrency 128 [--polling 0.01]
    python peer_dbos.py worker URL --concurrency C --polling P        (started by the one above)

throughput: the system database is created by launching DBOS once (its migrations); then --workflows runs of a
workflow of one step are enqueued on a queue with DBOSClient (16 threads), and a worker process started (DBOS
launched, the queue registered with worker_concurrency --concurrency and polling_interval_sec --polling; the
default polling is 1 s, which would cap a drain at concurrency runs per second). Clock: the worker's start to
the last workflow in status SUCCESS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
from dbos import DBOS, DBOSClient, DBOSConfig

QUEUE = "bench"


@DBOS.step()
def first() -> int:
    return 1


@DBOS.workflow(name="one_step")
def one_step() -> int:
    return first()


def launch(url: str, concurrency: int, polling: float) -> None:
    config: DBOSConfig = {"name": "peer-bench", "system_database_url": url}
    DBOS(config=config)
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=concurrency, polling_interval_sec=polling)


def worker(args: argparse.Namespace) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    launch(args.url, args.concurrency, args.polling)
    stop.wait()
    DBOS.destroy()


def throughput(args: argparse.Namespace) -> None:
    setup = subprocess.run(
        [
            sys.executable,
            __file__,
            "setup",
            args.url,
            "--concurrency",
            str(args.concurrency),
            "--polling",
            str(args.polling),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if setup.returncode != 0:
        raise RuntimeError(f"DBOS setup failed: {setup.stderr[-2000:]}")
    client = DBOSClient(system_database_url=args.url)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda _: client.enqueue({"queue_name": QUEUE, "workflow_name": "one_step"}), range(args.workflows)
            )
        )
    client.destroy()
    began = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "worker",
            args.url,
            "--concurrency",
            str(args.concurrency),
            "--polling",
            str(args.polling),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with psycopg.connect(args.url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while True:
                row = conn.execute("SELECT count(*) FROM dbos.workflow_status WHERE status = 'SUCCESS'").fetchone()
                if row is not None and row[0] >= args.workflows:
                    break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise TimeoutError(f"workflows unfinished (worker exit code {process.poll()})")
                time.sleep(0.05)
            elapsed = time.perf_counter() - began
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print(
        json.dumps(
            {
                "figure": "dbos.workflows_per_s",
                "value": args.workflows / elapsed,
                "concurrency": args.concurrency,
                "workflows": args.workflows,
                "polling_s": args.polling,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "worker", "setup"])
    parser.add_argument("url")
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--polling", type=float, default=0.01)
    args = parser.parse_args()
    os.environ.setdefault("PGAPPNAME", "dbos")
    if args.mode == "worker":
        worker(args)
    elif args.mode == "setup":
        launch(args.url, args.concurrency, args.polling)
        DBOS.destroy()
    else:
        throughput(args)


if __name__ == "__main__":
    main()
