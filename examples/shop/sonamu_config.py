"""The example application's configuration (the seed's sonamu.config.ts).

Run from this directory:  sonamu-tasks worker   |   sonamu-tasks dev   |   sonamu-tasks schedules
The database is the SQLite file ./sonamu_tasks.db unless SONAMU_TASKS_DATABASE_URL names another.
"""

from __future__ import annotations

from typing import Any

from sonamu_tasks import define_config


def provide_context(default: dict[str, Any]) -> dict[str, Any]:
    return {**default, "currency": "KRW"}


config = define_config(
    timezone="Asia/Seoul",
    workflows=["app.application"],
    tasks={
        "enable_worker": True,
        "worker_options": {"concurrency": 4, "listen_delay": 0},
        "context_provider": provide_context,
    },
)
