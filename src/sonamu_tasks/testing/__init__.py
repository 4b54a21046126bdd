"""Helpers for testing applications built on sonamu-tasks (and for sonamu-tasks' own tests)."""

from __future__ import annotations

from .env import TestClock, TestRunHandle, WorkflowTestEnv
from .pgbouncer import PgBouncer, PgBouncerNotInstalled
from .postgres_cluster import PostgresCluster, PostgresNotInstalled, StandbyCluster, find_postgres_bin

__all__ = [
    "PgBouncer",
    "PgBouncerNotInstalled",
    "PostgresCluster",
    "PostgresNotInstalled",
    "StandbyCluster",
    "TestClock",
    "TestRunHandle",
    "WorkflowTestEnv",
    "find_postgres_bin",
]
