"""Load `queries.sql` once: each query sits under a `-- name --` header line."""

from __future__ import annotations

import re
from importlib.resources import files

_HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


QUERIES = load_queries(files(__package__).joinpath("queries.sql").read_text(encoding="utf-8"))


def migrations() -> list[tuple[str, str]]:
    """(name, sql) of every numbered migration file, in order."""
    folder = files(__package__).joinpath("migrations")
    names = sorted(entry.name for entry in folder.iterdir() if re.match(r"^\d{4}_\w+\.sql$", entry.name))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text(encoding="utf-8")) for name in names]
