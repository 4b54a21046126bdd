"""Helpers for testing applications built on sonamu-tasks (and for sonamu-tasks' own tests)."""

from __future__ import annotations

from .postgres_cluster import PostgresCluster, PostgresNotInstalled, find_postgres_bin

__all__ = ["PostgresCluster", "PostgresNotInstalled", "find_postgres_bin"]
