"""Pick the backend a database URL names, and build a second one like it for another thread."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ..config import DEFAULT_SCHEMA, Config
from ..errors import ConfigError
from .base import Backend


def backend_for(config: Config, *, pool_size: int | None = None) -> Backend:
    """The backend `config` names. `pool_size` bounds its PostgreSQL pool (default: concurrency + 4)."""
    url = config.resolved_database_url()
    if pool_size is None:
        pool_size = config.tasks.worker_options.concurrency + 4
    recipe = _Recipe(
        url,
        config.schema,
        pool_size,
        listen_url=config.resolved_listen_url(),
        read_url=config.resolved_read_url(),
        pool_mode=config.resolved_pool_mode(),
    )
    return _build(recipe)


def another_like(backend: Backend, *, pool_size: int = 2) -> Callable[[], Backend] | None:
    """A way to build another backend on the database `backend` uses, or None when `backend` was not built by
    `backend_for` (an object passed in by the caller: nothing says how to make a second one).

    The PostgreSQL pool and the SQLite connection thread belong to the event loop that first uses them, so a
    thread running its own event loop (the worker's heartbeat) needs a backend of its own; the answer is a
    function so that it can be called on that thread. The URL is the one resolved when `backend` was built,
    so a later change of the environment cannot point the second backend at another database.
    """
    recipe = _recipes.get(backend)
    if recipe is None:
        return None
    twin = dataclasses.replace(recipe, pool_size=pool_size, read_url=None)  # its work is writes: no replica pool
    return lambda: _build(twin)


@dataclass(frozen=True)
class _Recipe:
    url: str
    schema: str
    pool_size: int
    listen_url: str | None = None
    read_url: str | None = None
    pool_mode: str = "session"


logger = logging.getLogger("sonamu_tasks.config")

_schema_warned: set[str] = set()  # SQLite files whose ignored schema was said once in this process

# How each backend made by `backend_for` was made; weak, so it never keeps a closed backend alive.
_recipes: weakref.WeakKeyDictionary[Backend, _Recipe] = weakref.WeakKeyDictionary()


def _build(recipe: _Recipe) -> Backend:
    url = recipe.url
    backend: Backend
    if url.startswith(("postgresql://", "postgres://")) or url.startswith(("host=", "dbname=")):
        from .postgres import PostgresBackend

        backend = PostgresBackend(
            url,
            schema=recipe.schema,
            pool_size=recipe.pool_size,
            listen_url=recipe.listen_url,
            read_url=recipe.read_url,
            pool_mode=recipe.pool_mode,
        )
    elif url.startswith("sqlite://"):
        try:
            from .sqlite import SqliteBackend
        except ImportError as error:
            raise ConfigError("the SQLite backend is not available in this build; use a PostgreSQL URL") from error
        sqlite = SqliteBackend.from_url(url)
        if recipe.schema != DEFAULT_SCHEMA and sqlite.path not in _schema_warned:
            _schema_warned.add(sqlite.path)
            logger.warning(
                "schema=%r is ignored on SQLite: apps sharing the file %s share its runs (workers run each other's "
                "workflows of the same name and version, and retention deletes by either's rules); give each app "
                "its own file",
                recipe.schema,
                sqlite.path,
            )
        if sqlite.path == ":memory:":
            return sqlite  # a second connection would open another, empty database: no recipe
        # The absolute path: a relative one would name another file after a change of directory.
        recipe = _Recipe(f"sqlite:///{sqlite.path}", recipe.schema, recipe.pool_size)  # no listen/read URLs
        backend = sqlite
    else:
        raise ConfigError(
            f"database_url {url!r} is neither postgresql://... nor sqlite:///path; "
            "set database_url in the config or SONAMU_TASKS_DATABASE_URL"
        )
    _recipes[backend] = recipe
    return backend
