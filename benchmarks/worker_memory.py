"""A long-lived worker's memory: its RSS and its /metrics page as it runs workflows whose step names carry ids.

    python -m benchmarks.worker_memory [--runs 24000] [--every 2000] [--batch 500] [--spelled]

One worker process (`sonamu-tasks worker --metrics-port`, benchmarks.bench_workflows) on a fresh SQLite file,
and this process starting `charge_items` runs of two items each in batches of --batch, waiting for each batch to
finish: every run adds two step names never seen before (`charge-17`; with --spelled, `charge-bh`, ids written in
letters). Every --every runs: the worker's RSS, the size of its /metrics page and how many step series it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.bench_workflows import charge_items
from sonamu_tasks import RunStatus, WorkflowManager, define_config

CONFIG = """
import os
from sonamu_tasks import define_config
config = define_config(database_url=os.environ["BENCH_URL"], workflows=["benchmarks.bench_workflows"],
                       tasks={"worker_options": {"concurrency": 64, "listen_delay": 0}})
"""


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return -1


def scrape(port: int) -> tuple[int, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        body = response.read()
    return len(body), body.count(b"\nsonamu_tasks_step_duration_seconds_count{")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=24000)
    parser.add_argument("--every", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--spelled", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{directory}/bench.db"
        Path(directory, "memory_config.py").write_text(CONFIG)
        port = free_port()
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "BENCH_URL": url, "PYTHONPATH": os.pathsep.join([directory, root, *sys.path[1:]])}
        command = ["-m", "sonamu_tasks", "--config", "memory_config:config", "worker", "--metrics-port", str(port)]
        log = Path(directory, "worker.log")
        with log.open("w") as output:
            worker = subprocess.Popen([sys.executable, *command], env=env, cwd=directory, stdout=output, stderr=output)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    scrape(port)
                    break
                except OSError:
                    if time.monotonic() > deadline or worker.poll() is not None:
                        raise SystemExit(f"the worker did not start:\n{log.read_text()[-2000:]}") from None
                    await asyncio.sleep(0.2)
            config = define_config(database_url=url, tasks={"enable_worker": False})
            async with WorkflowManager(config, workflows=[charge_items]) as manager:
                size, series = scrape(port)
                print(
                    f"{0:6d} runs  rss {rss_mb(worker.pid):4d} MB  /metrics {size / 1000:9.1f} kB  {series} step series"
                )
                done = 0
                while done < args.runs:
                    inputs = [
                        {"items": [(done + k) * 2, (done + k) * 2 + 1], "spelled": args.spelled}
                        for k in range(args.batch)
                    ]
                    handles = await manager.run_many(charge_items, inputs)
                    for handle in handles:
                        run = await manager.wait_until_finished(handle.id, timeout=600)
                        assert run.status is RunStatus.COMPLETED, run.error
                    done += args.batch
                    if done % args.every == 0:
                        size, series = scrape(port)
                        print(
                            f"{done:6d} runs  rss {rss_mb(worker.pid):4d} MB  /metrics {size / 1000:9.1f} kB  "
                            f"{series} step series",
                            flush=True,
                        )
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)


if __name__ == "__main__":
    asyncio.run(main())
