"""Helpers for testing applications built on sonamu-tasks (and for sonamu-tasks' own tests)."""

from __future__ import annotations

from .env import TestClock, TestRunHandle, WorkflowTestEnv
from .postgres_cluster import PostgresCluster, PostgresNotInstalled, find_postgres_bin

__all__ = [
    "PostgresCluster",
    "PostgresNotInstalled",
    "TestClock",
    "TestRunHandle",
    "WorkflowTestEnv",
    "find_postgres_bin",
]
