"""The PostgreSQL backend's named queries and migrations (see `..sql_files`)."""

from __future__ import annotations

from ..sql_files import backend_queries, package_migrations

_PACKAGE = __name__.rpartition(".")[0]

QUERIES = backend_queries(_PACKAGE, psycopg=True)


def migrations() -> list[tuple[str, str]]:
    """(name, sql) of every numbered migration file, in order."""
    return package_migrations(_PACKAGE)
