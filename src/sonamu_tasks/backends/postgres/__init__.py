"""The PostgreSQL backend: psycopg 3, named queries, numbered migrations, LISTEN/NOTIFY."""

from __future__ import annotations

from .backend import PostgresBackend

__all__ = ["PostgresBackend"]
