"""A benchmark worker process, configured by BENCH_* environment variables."""

from __future__ import annotations

import asyncio
import logging
import os

from benchmarks.bench_workflows import ALL
from sonamu_tasks import WorkflowManager, define_config


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    config = define_config(
        database_url=os.environ["BENCH_URL"],
        schema=os.environ["BENCH_SCHEMA"],
        tasks={
            "worker_options": {
                "concurrency": int(os.environ.get("BENCH_CONCURRENCY", "16")),
                "listen_delay": float(os.environ.get("BENCH_LISTEN_DELAY", "0")),
                "poll_interval_ms": int(os.environ.get("BENCH_POLL_INTERVAL_MS", "1000")),
            }
        },
    )
    asyncio.run(WorkflowManager(config, workflows=ALL).serve())


if __name__ == "__main__":
    main()
