"""Helpers for testing applications built on sonamu-tasks (and for sonamu-tasks' own tests)."""

from __future__ import annotations

from .env import Registration, TestClock, TestRunHandle, WorkflowTestEnv
from .mocks import MockExhausted
from .pgbouncer import PgBouncer, PgBouncerNotInstalled
from .postgres_cluster import PostgresCluster, PostgresNotInstalled, StandbyCluster, find_postgres_bin

__all__ = [
    "MockExhausted",
    "PgBouncer",
    "PgBouncerNotInstalled",
    "PostgresCluster",
    "PostgresNotInstalled",
    "Registration",
    "StandbyCluster",
    "TestClock",
    "TestRunHandle",
    "WorkflowTestEnv",
    "find_postgres_bin",
]
