"""Pick the backend a database URL names."""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .base import Backend


def backend_for(config: Config) -> Backend:
    url = config.resolved_database_url()
    pool_size = config.tasks.worker_options.concurrency + 4
    if url.startswith(("postgresql://", "postgres://")) or url.startswith(("host=", "dbname=")):
        from .postgres import PostgresBackend

        return PostgresBackend(url, schema=config.schema, pool_size=pool_size)
    if url.startswith("sqlite://"):
        try:
            from .sqlite import SqliteBackend
        except ImportError as error:
            raise ConfigError("the SQLite backend is not available in this build; use a PostgreSQL URL") from error
        return SqliteBackend.from_url(url)
    raise ConfigError(
        f"database_url {url!r} is neither postgresql://... nor sqlite:///path; "
        "set database_url in the config or SONAMU_TASKS_DATABASE_URL"
    )
