"""Settings of the example project: what Django needs to serve JSON views, and SONAMU_TASKS."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]

INSTALLED_APPS = [
    "sonamu_django",  # the integration: settings check, SyncClient, `manage.py sonamu_worker`
    "invoices",  # the example's workflow and views
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "invoicing_site.urls"
WSGI_APPLICATION = "invoicing_site.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}  # the example stores nothing of its own; runs live in SONAMU_TASKS
USE_TZ = True

# The keyword arguments of sonamu_tasks.define_config (or a Config it made). Without "database_url" runs are
# stored in the SQLite file ./sonamu_tasks.db of the working directory; SONAMU_TASKS_DATABASE_URL overrides
# it (postgresql://... in production). Start runserver and sonamu_worker from the same directory.
SONAMU_TASKS = {
    "workflows": ["invoices"],  # packages the worker scans for *_workflow.py modules
    "tasks": {"worker_options": {"concurrency": 4}},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"sonamu_tasks": {"handlers": ["console"], "level": "INFO"}},
}
