from __future__ import annotations

from django.apps import AppConfig


class SonamuDjangoConfig(AppConfig):
    name = "sonamu_django"
    verbose_name = "sonamu-tasks"

    def ready(self) -> None:
        # A mistyped option in SONAMU_TASKS stops Django at start-up, naming the option, instead of failing
        # the first request. Nothing connects here: the client is made on first use.
        from .client import tasks_config

        tasks_config()
