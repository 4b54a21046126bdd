"""The SQL files: `backends/queries.sql`, the queries both backends share, and each backend package's own
`queries.sql` (each query under a `-- name --` header line) and numbered migrations
(`migrations/0001_initial.sql`, ...), read once from the installed package."""

from __future__ import annotations

import re
from importlib.resources import files

from ..errors import ConfigError

_HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)
_MIGRATION = re.compile(r"^\d{4}_\w+\.sql$")
# In a shared query: a quoted literal (left as it is), or a `:name` placeholder (not a `::` cast).
_LITERAL_OR_PLACEHOLDER = re.compile(r"'[^']*'|(?<![:\w]):(\w+)")


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


def backend_queries(package: str, *, psycopg: bool) -> dict[str, str]:
    """A backend's queries: the shared ones (in psycopg's placeholders when `psycopg`) and its own. A name in
    both is refused: which one runs would depend on the order they were read in."""
    shared = shared_queries(psycopg=psycopg)
    own = package_queries(package)
    if twice := sorted(shared.keys() & own.keys()):
        raise RuntimeError(f"{package}/queries.sql defines queries that backends/queries.sql shares: {twice}")
    return {**shared, **own}


def shared_queries(*, psycopg: bool) -> dict[str, str]:
    """`backends/queries.sql`, as written (SQLite's `:name` and `:now`), or with `:now` as `now()` and every
    other `:name` as `%(name)s` for psycopg."""
    queries = package_queries(__package__ or "sonamu_tasks.backends")
    return {name: to_psycopg(query) for name, query in queries.items()} if psycopg else queries


def to_psycopg(query: str) -> str:
    """A query with SQLite's placeholders in psycopg's: `:now` -> `now()`, `:name` -> `%(name)s`; quoted
    literals untouched. A `%` would need doubling for psycopg, so it is refused instead; so is a comment at the
    end of a line (an apostrophe in it would read as a literal's start): comments go on lines of their own."""
    if "%" in query:
        raise ValueError(f"a shared query holds '%', which psycopg reads as a placeholder: {query[:60]!r}")
    if "--" in query:
        raise ValueError(f"a shared query has a comment at the end of a line: {query[:60]!r}")

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)
        return "now()" if name == "now" else f"%({name})s"

    return _LITERAL_OR_PLACEHOLDER.sub(replace, query)


def package_migrations(package: str) -> list[tuple[str, str]]:
    """(name, sql) of every numbered migration file of `package`, in order."""
    folder = files(package).joinpath("migrations")
    names = sorted(entry.name for entry in folder.iterdir() if _MIGRATION.match(entry.name))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text(encoding="utf-8")) for name in names]


def newer_than_code(applied: set[str], known: list[tuple[str, str]]) -> str | None:
    """A warning when the database has migrations this code does not know (a newer release applied them): this
    release's statements may not fit the schema, and it cannot tell. None when there are none."""
    unknown = sorted(applied - {name for name, _ in known})
    if not unknown:
        return None
    return (
        f"the database has {len(unknown)} migration(s) this release of sonamu-tasks does not have "
        f"({', '.join(unknown)}): a newer release migrated it; this process may misbehave on it (upgrade it to "
        "the release that wrote them)"
    )


def check_applied(where: str, applied: set[str] | None, known: list[tuple[str, str]]) -> str | None:
    """For a start that does not migrate: ConfigError when `where` (the schema, or the SQLite file) has no
    migrations table (`applied` None) or lacks some of `known`; otherwise `newer_than_code`'s warning, if any."""
    if applied is None:
        raise ConfigError(
            f"{where} has no sonamu-tasks tables: it was never migrated (a mistyped schema or path?). Nothing was "
            "created; `sonamu-tasks migrate` creates them"
        )
    missing = [name for name, _ in known if name not in applied]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(
            f"{where} is older than this release of sonamu-tasks: {len(missing)} migration(s) not applied "
            f"({listed}). Run `sonamu-tasks migrate` with a role that may change the schema (a read-only start "
            "does not migrate)"
        )
    return newer_than_code(applied, known)
