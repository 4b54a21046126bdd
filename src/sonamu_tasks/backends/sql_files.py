"""The SQL files of a backend package: `queries.sql` (each query under a `-- name --` header line) and
numbered migrations (`migrations/0001_initial.sql`, ...), read once from the installed package."""

from __future__ import annotations

import re
from importlib.resources import files

_HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)
_MIGRATION = re.compile(r"^\d{4}_\w+\.sql$")


def load_queries(text: str) -> dict[str, str]:
    """Split `queries.sql` text into {name: query}; comment lines are dropped."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


def package_queries(package: str) -> dict[str, str]:
    """The named queries of `package`'s `queries.sql`."""
    return load_queries(files(package).joinpath("queries.sql").read_text(encoding="utf-8"))


def package_migrations(package: str) -> list[tuple[str, str]]:
    """(name, sql) of every numbered migration file of `package`, in order."""
    folder = files(package).joinpath("migrations")
    names = sorted(entry.name for entry in folder.iterdir() if _MIGRATION.match(entry.name))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text(encoding="utf-8")) for name in names]
