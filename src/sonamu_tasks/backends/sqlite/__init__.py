"""The embedded SQLite backend: the standard library's sqlite3, named queries, numbered migrations, polling."""

from __future__ import annotations

from .backend import SqliteBackend

__all__ = ["SqliteBackend"]
