"""The queries both backends share: written once with SQLite's placeholders, rewritten for psycopg."""

from __future__ import annotations

import re

import pytest

from sonamu_tasks.backends.postgres.queries import QUERIES as POSTGRES
from sonamu_tasks.backends.sql_files import shared_queries, to_psycopg
from sonamu_tasks.backends.sqlite.backend import QUERIES as SQLITE


def test_placeholders_become_psycopg_ones_and_the_clock_now() -> None:
    query = "UPDATE runs SET updated_at = :now, error = :error WHERE id = :run_id AND x::text = 'a:b :c'"
    assert to_psycopg(query) == (
        "UPDATE runs SET updated_at = now(), error = %(error)s WHERE id = %(run_id)s AND x::text = 'a:b :c'"
    )
    assert to_psycopg("SELECT :nowhere, :now_or_never") == "SELECT %(nowhere)s, %(now_or_never)s"


def test_a_percent_sign_or_a_comment_inside_a_line_is_refused_rather_than_misread() -> None:
    with pytest.raises(ValueError, match="holds '%'"):
        to_psycopg("SELECT name FROM runs WHERE name LIKE 'a%'")
    with pytest.raises(ValueError, match="comment at the end of a line"):
        to_psycopg("SELECT status FROM runs -- the run's\nWHERE id = :run_id")


def test_both_backends_run_every_shared_query_and_only_postgres_sees_it_rewritten() -> None:
    written = shared_queries(psycopg=False)
    assert written and written == shared_queries(psycopg=False)
    for name, query in written.items():
        assert SQLITE[name] == query
        assert POSTGRES[name] == to_psycopg(query)
        unquoted = re.sub(r"'[^']*'", "''", POSTGRES[name])
        assert re.search(r"(?<![:\w]):\w", unquoted) is None  # no SQLite placeholder left for psycopg
