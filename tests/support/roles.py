"""A PostgreSQL role that may only read a test's schema: the read-only credentials an operator looks with."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg


@contextmanager
def reader_role(postgres_url: str) -> Iterator[str]:
    """A new login role, dropped afterwards: the URL it connects with, to the suite's server (whatever user
    `postgres_url` names: SONAMU_TASKS_TEST_DATABASE_URL may name any)."""
    name = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'secret'")
    server = urlsplit(postgres_url)
    try:
        yield urlunsplit(server._replace(netloc=f"{name}:secret@{server.netloc.rpartition('@')[2]}"))
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")


def grant_reading(postgres_url: str, schema: str, role_url: str) -> None:
    """USAGE on the schema and SELECT on its tables (once they exist), and nothing else."""
    role = urlsplit(role_url).username
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
