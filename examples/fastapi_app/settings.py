"""The example's settings, from the environment.

ORDERS_RUN_WORKER     1 (default): each web process also runs a worker; 0: web processes only start runs,
                      and workers run apart: `sonamu-tasks --config examples.fastapi_app.settings:config worker`
ORDERS_CONCURRENCY    runs one worker executes at once (default 4)
SONAMU_TASKS_DATABASE_URL   postgresql://... or sqlite:///path; default: the SQLite file ./sonamu_tasks.db
"""

from __future__ import annotations

import os

from sonamu_tasks import Config, define_config

RUN_WORKER = os.environ.get("ORDERS_RUN_WORKER", "1").strip().lower() not in {"0", "false", "no", "off"}
CONCURRENCY = int(os.environ.get("ORDERS_CONCURRENCY", "4"))


def make_config(*, run_worker: bool = RUN_WORKER, concurrency: int = CONCURRENCY) -> Config:
    return define_config(
        workflows=["examples.fastapi_app"],  # the syncer finds orders_workflow.py
        tasks={"enable_worker": run_worker, "worker_options": {"concurrency": concurrency}},
    )


config = make_config()
