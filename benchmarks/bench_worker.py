"""A benchmark worker process, configured by BENCH_* environment variables."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from benchmarks.bench_workflows import ALL
from sonamu_tasks import WorkflowManager, define_config


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    # BENCH_QUEUES: queues to declare (a JSON list of Queue arguments); BENCH_SERVE: the queues to claim from
    # (comma-separated; default: the workflows' queues, i.e. "default").
    queues = json.loads(os.environ.get("BENCH_QUEUES", "[]"))
    serve = os.environ.get("BENCH_SERVE")
    config = define_config(
        database_url=os.environ["BENCH_URL"],
        schema=os.environ["BENCH_SCHEMA"],
        tasks={
            "worker_options": {
                "concurrency": int(os.environ.get("BENCH_CONCURRENCY", "16")),
                "listen_delay": float(os.environ.get("BENCH_LISTEN_DELAY", "0")),
                "poll_interval_ms": int(os.environ.get("BENCH_POLL_INTERVAL_MS", "1000")),
                **({"queues": serve.split(",")} if serve else {}),
            },
            "queues": queues,
        },
    )
    asyncio.run(WorkflowManager(config, workflows=ALL).serve())


if __name__ == "__main__":
    main()
