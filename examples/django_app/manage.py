#!/usr/bin/env python
"""Django's command-line utility for the example project.

    python examples/django_app/manage.py runserver          # the web process (starts runs, reads results)
    python examples/django_app/manage.py sonamu_worker      # a worker, until SIGTERM or SIGINT

Run both from the same directory: they share the SQLite file ./sonamu_tasks.db of the working directory
(or the database SONAMU_TASKS_DATABASE_URL names).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "invoicing_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
