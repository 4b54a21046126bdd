"""Procrastinate's side of benchmarks/peers.py. Runs with the Python of the venv peers.py made for it (it imports
Procrastinate, never sonamu_tasks); prints one JSON object per figure.

    python peer_procrastinate.py latency URL --runs 300
    python peer_procrastinate.py throughput URL --jobs 10000 --concurrency 128
    python peer_procrastinate.py worker URL --concurrency C --report-port P   (started by the two above)

latency: a worker process (listen_notify on, concurrency 16), jobs deferred one after another from this
process: defer -> the task starts (the task sends time.time() at its start to this process over a UDP socket on
127.0.0.1), and defer -> done, where done is the `at` of the job's `succeeded` event (written by the finishing
transaction, just before its commit: slightly earlier than any waiter could learn of it). The next job is
deferred once the previous one is done.
throughput: --jobs trivial jobs deferred first (batch_defer_async, 1,000 per call), then the worker process
started; jobs/s from its start to the last job succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import procrastinate
import psycopg

WARM_UP = 5
_report: tuple[str, int] | None = None
_socket: socket.socket | None = None


def make_app(url: str) -> procrastinate.App:
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))


def register(app: procrastinate.App) -> tuple[Any, Any]:
    @app.task(name="stamp")
    async def stamp(n: int) -> None:
        started = time.time()
        if _socket is not None and _report is not None:
            _socket.sendto(f"{n} {started}".encode(), _report)

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return stamp, noop


def worker(args: argparse.Namespace) -> None:
    global _report, _socket
    if args.report_port:
        _report = ("127.0.0.1", args.report_port)
        _socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app = make_app(args.url)
    register(app)

    async def serve() -> None:
        async with app.open_async():
            await app.run_worker_async(concurrency=args.concurrency, listen_notify=True, wait=True)

    asyncio.run(serve())


def start_worker(url: str, concurrency: int, report_port: int = 0) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "worker", url, "--concurrency", str(concurrency)]
    command += ["--report-port", str(report_port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def apply_schema(url: str) -> None:
    app = make_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


class Stamps(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        n, moment = data.decode().split()
        self.started[int(n)] = float(moment)
        self.arrived.set()


async def latency(args: argparse.Namespace) -> None:
    await apply_schema(args.url)
    loop = asyncio.get_running_loop()
    transport, stamps = await loop.create_datagram_endpoint(Stamps, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    process = start_worker(args.url, 16, port)
    app = make_app(args.url)
    stamp, _ = register(app)
    to_start: list[float] = []
    to_done: list[float] = []
    try:
        async with app.open_async(), await psycopg.AsyncConnection.connect(args.url, autocommit=True) as conn:
            for n in range(WARM_UP + args.runs):
                deferred = time.time()
                job_id = await stamp.defer_async(n=n)
                deadline = time.monotonic() + 60
                while n not in stamps.started:
                    stamps.arrived.clear()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"job {n} did not start within 60 s")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stamps.arrived.wait(), remaining)
                done = None
                while done is None:  # the task has started: it is done within a few ms
                    row = await (
                        await conn.execute(
                            "SELECT extract(epoch FROM at)::float8 FROM procrastinate_events"
                            " WHERE job_id = %s AND type = 'succeeded'",
                            [job_id],
                        )
                    ).fetchone()
                    if row is None:
                        await asyncio.sleep(0.001)
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"job {n} did not finish within 60 s")
                    else:
                        done = row[0]
                if n >= WARM_UP:
                    to_start.append(stamps.started[n] - deferred)
                    to_done.append(done - deferred)
    finally:
        stop(process)
        transport.close()
    emit("procrastinate.defer_to_start", to_start, runs=args.runs)
    emit("procrastinate.defer_to_done", to_done, runs=args.runs)


async def throughput(args: argparse.Namespace) -> None:
    await apply_schema(args.url)
    app = make_app(args.url)
    _, noop = register(app)
    async with app.open_async():
        for start in range(0, args.jobs, 1000):
            await noop.batch_defer_async(*({} for _ in range(start, min(start + 1000, args.jobs))))
    began = time.perf_counter()
    process = start_worker(args.url, args.concurrency)
    try:
        async with await psycopg.AsyncConnection.connect(args.url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while True:
                row = await (
                    await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
                ).fetchone()
                if row is not None and row[0] >= args.jobs:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("jobs unfinished after 600 s")
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - began
    finally:
        stop(process)
    print(
        json.dumps(
            {
                "figure": "procrastinate.jobs_per_s",
                "value": args.jobs / elapsed,
                "concurrency": args.concurrency,
                "jobs": args.jobs,
            }
        ),
        flush=True,
    )


def emit(name: str, seconds: list[float], **labels: Any) -> None:
    ordered = sorted(seconds)
    figures = {
        "p50": statistics.median(ordered) * 1000,
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000,
        "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000,
    }
    print(json.dumps({"figure": name, "unit": "ms", **figures, **labels}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["latency", "throughput", "worker"])
    parser.add_argument("url")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--report-port", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("PGAPPNAME", "procrastinate")
    if args.mode == "worker":
        worker(args)
    elif args.mode == "latency":
        asyncio.run(latency(args))
    else:
        asyncio.run(throughput(args))


if __name__ == "__main__":
    main()
