"""A chaos worker process: `python -m chaos.worker`, configured by CHAOS_* environment variables."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from sonamu_tasks import WorkflowManager, define_config

from . import workflows


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    options: dict[str, float] = {
        "concurrency": int(os.environ.get("CHAOS_CONCURRENCY", "4")),
        "listen_delay": 0,
        "lease_ms": float(os.environ.get("CHAOS_LEASE_MS", "1500")),
        "shutdown_grace_ms": 2000,
    }
    if os.environ.get("CHAOS_POLL_MS"):
        options["poll_interval_ms"] = float(os.environ["CHAOS_POLL_MS"])
    config = define_config(
        database_url=os.environ["CHAOS_URL"],
        schema=os.environ["CHAOS_SCHEMA"],
        tasks={"enable_worker": True, "worker_options": options},
        listen_url=os.environ.get("CHAOS_LISTEN_URL") or None,
        pool_mode=os.environ.get("CHAOS_POOL_MODE") or "session",
    )
    names = os.environ.get("CHAOS_WORKFLOWS", "chain").split(",")
    chosen = [getattr(workflows, name) for name in names]
    asyncio.run(WorkflowManager(config, workflows=chosen).serve())


if __name__ == "__main__":
    main()
