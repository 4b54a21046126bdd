"""`manage.py sonamu_worker`: run a sonamu-tasks worker (and the cron scheduler) until SIGTERM or SIGINT.

On the signal it stops claiming, lets running steps finish (`shutdown_grace_ms`) and hands the rest back,
then exits 0. Run as many as you like, on any machine that reaches the database (one machine for SQLite).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sonamu_tasks import ConfigError, WorkflowManager

from ...client import tasks_config


class Command(BaseCommand):
    help = "Run a sonamu-tasks worker until SIGTERM or SIGINT, then shut down gracefully."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=int, help="runs executed at once (default: from SONAMU_TASKS)")

    def handle(self, *args: Any, **options: Any) -> None:
        config = tasks_config()
        worker_options = config.tasks.worker_options
        if options["concurrency"] is not None:
            try:
                worker_options = dataclasses.replace(worker_options, concurrency=options["concurrency"])
            except ConfigError as error:
                raise CommandError(str(error)) from None
        tasks = dataclasses.replace(config.tasks, enable_worker=True, worker_options=worker_options)
        config = dataclasses.replace(config, tasks=tasks)
        packages = ", ".join(config.workflows) or "(none configured)"
        database = _without_password(config.resolved_database_url())
        self.stdout.write(f"sonamu worker: database {database}; workflows from {packages}; stop with Ctrl-C or SIGTERM")
        self.stdout.flush()
        asyncio.run(WorkflowManager(config).serve())
        self.stdout.write("sonamu worker: stopped")


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
