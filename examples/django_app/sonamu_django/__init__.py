"""sonamu-tasks in a Django project: copy this app, add it to INSTALLED_APPS, set SONAMU_TASKS.

- `tasks_config()`: the SONAMU_TASKS setting as a Config (checked when Django starts);
- `get_client()`: this process's SyncClient, for sync views (made on first use, closed at exit);
- `manage.py sonamu_worker`: a worker that runs until SIGTERM or SIGINT.
"""
