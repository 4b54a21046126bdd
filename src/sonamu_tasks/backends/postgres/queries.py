"""The PostgreSQL backend's named queries and migrations (see `..sql_files`)."""

from __future__ import annotations

from ..sql_files import package_migrations, package_queries

_PACKAGE = __name__.rpartition(".")[0]

QUERIES = package_queries(_PACKAGE)


def migrations() -> list[tuple[str, str]]:
    """(name, sql) of every numbered migration file, in order."""
    return package_migrations(_PACKAGE)
