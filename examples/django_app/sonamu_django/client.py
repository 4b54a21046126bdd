"""One SyncClient per process, for sync views.

It is made on first use, not at import or in `AppConfig.ready()`: a server that forks its workers after
loading the project (gunicorn --preload) must not share one client's thread and connections between
processes, so each process makes its own (a fork is noticed by its pid). It is closed when the interpreter
exits. The client runs no worker: runs are executed by `manage.py sonamu_worker`.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from django.conf import settings

from sonamu_tasks import Config, SyncClient, define_config

_lock = threading.Lock()
_client: SyncClient | None = None
_client_pid = 0
_close_registered = False

# Closed before Python shuts its thread pools down, where the SQLite backend closes its connection: a plain
# `atexit` handler runs after that, and works too (every transaction has ended; the file is closed by the
# process's exit), but this way the connection is closed as usual. `threading._register_atexit` is the hook
# concurrent.futures itself uses to run first; plain `atexit` where it is missing.
_at_exit = getattr(threading, "_register_atexit", atexit.register)


def tasks_config() -> Config:
    """The SONAMU_TASKS setting (define_config's keyword arguments, or a Config) as a Config."""
    value: Any = getattr(settings, "SONAMU_TASKS", None) or {}
    return value if isinstance(value, Config) else define_config(**value)


def get_client() -> SyncClient:
    """This process's SyncClient (thread-safe; one for every thread of the process)."""
    global _client, _client_pid, _close_registered
    with _lock:
        if _client is None or _client_pid != os.getpid():
            _client = SyncClient(tasks_config())  # a forked child's inherited client is left alone
            _client_pid = os.getpid()
            if not _close_registered:
                _at_exit(close_client)
                _close_registered = True
        return _client


def close_client() -> None:
    """Close this process's client (at exit; a later get_client() makes a new one)."""
    global _client
    with _lock:
        client, _client = _client, None
        if client is not None and _client_pid == os.getpid():
            client.close()
