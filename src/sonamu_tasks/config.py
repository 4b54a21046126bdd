"""Configuration: `define_config(...)`, the Python form of the seed's `sonamu.config.ts`.

The dict form of API.md and typed dataclasses are interchangeable: `define_config` turns the dicts into
`TasksConfig` / `WorkerOptions`, and unknown keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .duration import Duration, parse_duration
from .errors import ConfigError, InvalidDuration, InvalidValue
from .queue import DEFAULT_QUEUE, Queue, queue_name

DATABASE_URL_ENV = "SONAMU_TASKS_DATABASE_URL"
LISTEN_URL_ENV = "SONAMU_TASKS_LISTEN_URL"
READ_URL_ENV = "SONAMU_TASKS_READ_URL"
POOL_MODE_ENV = "SONAMU_TASKS_POOL_MODE"
POOL_MODES = ("session", "transaction")
DEFAULT_SQLITE_PATH = "sonamu_tasks.db"

ContextProvider = Callable[[dict[str, Any]], Any]


def _default_concurrency() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


DEFAULT_SCHEMA = "sonamu_tasks"
"""The PostgreSQL schema of the engine's tables when the config names none."""


@dataclass
class WorkerOptions:
    concurrency: int = field(default_factory=_default_concurrency)
    """Runs executed at once by one worker (sleeping runs hold no slot)."""
    use_pub_sub: bool = True
    """Wake on PostgreSQL NOTIFY; polling stays as the safety net."""
    listen_delay: float = 500
    """Milliseconds between a notification and the claim it triggers (the seed's default; 0 allowed)."""
    lease_ms: float = 30_000
    """How long a claimed run stays owned without a heartbeat; heartbeats every third of it."""
    poll_interval_ms: float | None = None
    """The longest a worker waits before looking for due runs when nothing woke it. Default: 5000 where
    the database pushes notifications (PostgreSQL), 250 where other processes can only be polled (SQLite)."""
    shutdown_grace_ms: float = 10_000
    """On shutdown, how long running steps may take to finish before their runs are handed back."""
    max_recoveries: int = 100
    """Take-overs after a lost lease before a run is failed (it keeps killing its workers)."""
    blocked_loop_limit_ms: float = 300_000
    """How long the worker's event loop may stay blocked (a workflow or async step running code that never
    awaits) before this worker gives up its runs. Leases are extended from a thread of their own, so a blocked
    loop keeps them; past this limit that thread stops extending them (and logs an error), and other workers
    take the runs over once their leases expire. A loop that comes back later finds its writes refused and
    drops those runs. Never less than `lease_ms` (a smaller value counts as `lease_ms`)."""
    queues: Sequence[str] | None = None
    """The queues this worker serves (names). Default: every queue of the workflows it registers. A run put in
    another queue with `run(queue=...)` is claimed only by workers that serve that queue."""
    metrics_port: int | None = None
    """Serve this worker process's Prometheus metrics at http://127.0.0.1:PORT/metrics (needs the `metrics`
    extra). `worker --metrics-port` sets it."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"worker_options.concurrency must be at least 1, got {self.concurrency}")
        if self.lease_ms < 100:
            raise ConfigError(f"worker_options.lease_ms must be at least 100, got {self.lease_ms}")
        for name in ("listen_delay", "poll_interval_ms", "shutdown_grace_ms", "blocked_loop_limit_ms"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"worker_options.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_recoveries < 1:
            raise ConfigError(f"worker_options.max_recoveries must be at least 1, got {self.max_recoveries}")
        if self.queues is not None:
            if isinstance(self.queues, str):
                self.queues = [self.queues]
            try:
                self.queues = tuple(queue_name(q, what="worker_options.queues") or DEFAULT_QUEUE for q in self.queues)
            except InvalidValue as error:
                raise ConfigError(str(error)) from None
            if not self.queues:
                raise ConfigError("worker_options.queues is empty: name at least one queue, or leave it out")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigError(f"worker_options.metrics_port must be a TCP port, got {self.metrics_port}")


@dataclass
class TasksConfig:
    enable_worker: bool = True
    worker_options: WorkerOptions = field(default_factory=WorkerOptions)
    context_provider: ContextProvider | None = None
    retention: Duration | None = None
    """How long finished runs are kept (`"30d"`) before the workers delete them with their steps, messages and
    events; a workflow's own `retention=` overrides it. None (the default): kept forever."""
    queues: Sequence[Queue | Mapping[str, Any]] = ()
    """Queues declared in the config (`Queue` objects or dicts of its arguments), stored by synchronize() with
    the queues the workflows declare."""
    retention_interval: Duration = "5m"
    """How often a worker looks for expired runs to delete (one worker at a time deletes them)."""

    def __post_init__(self) -> None:
        queues = []
        for item in self.queues:
            if isinstance(item, Queue):
                queues.append(item)
                continue
            if not isinstance(item, Mapping):
                raise ConfigError(f"tasks.queues: expected Queue objects or dicts, got {type(item).__name__}")
            _reject_unknown("tasks.queues[]", item, Queue)
            try:
                queues.append(Queue(**item))
            except (InvalidValue, TypeError) as error:
                raise ConfigError(f"tasks.queues: {error}") from None
        self.queues = tuple(queues)
        for name in ("retention", "retention_interval"):
            value = getattr(self, name)
            if value is None and name == "retention":
                continue
            try:
                duration = parse_duration(value, what=f"tasks.{name}")
            except InvalidDuration as error:
                raise ConfigError(str(error)) from error
            if name == "retention_interval" and not duration:
                raise ConfigError("tasks.retention_interval must be more than 0")


@dataclass
class Config:
    database_url: str | None = None
    """PostgreSQL URL (`postgresql://...`) or `sqlite:///path`; None: the embedded SQLite file."""
    schema: str = DEFAULT_SCHEMA
    """PostgreSQL schema holding the engine's tables."""
    timezone: str = "UTC"
    workflows: Sequence[str] = ()
    """Packages the syncer scans for `*_workflow.py` / `workflow.py` modules."""
    tasks: TasksConfig = field(default_factory=TasksConfig)
    listen_url: str | None = None
    """PostgreSQL only: a direct connection to the primary (never through a transaction-mode pooler) for the
    LISTEN connection and the retention's session lock. None: `database_url`."""
    read_url: str | None = None
    """PostgreSQL only: a replica the command line's and the dashboard's lists (runs, workers, queues, stranded runs)
    and the worker's backlog metrics read from. Never the claim, a run's own reads or any write. None: the
    primary."""
    pool_mode: str = "session"
    """How `database_url`'s connections are pooled: `"session"` (a direct server, or PgBouncer
    `pool_mode = session`) or `"transaction"` (PgBouncer `pool_mode = transaction`: no prepared statements,
    the search_path set inside each transaction, LISTEN and session locks on `listen_url`, which is required)."""

    def __post_init__(self) -> None:
        mode = self.resolved_pool_mode()
        if mode not in POOL_MODES:
            raise ConfigError(f"pool_mode must be one of {', '.join(POOL_MODES)}, got {mode!r}")
        if mode == "transaction" and not self.resolved_listen_url():
            raise ConfigError(
                "pool_mode 'transaction' needs listen_url: a direct PostgreSQL URL (not through the pooler) for "
                "LISTEN and session locks, which a transaction-mode pooler cannot carry"
            )

    def resolved_database_url(self) -> str:
        """The URL in force: the environment overrides the file; the embedded SQLite file by default."""
        return os.environ.get(DATABASE_URL_ENV) or self.database_url or f"sqlite:///{DEFAULT_SQLITE_PATH}"

    def resolved_listen_url(self) -> str | None:
        """The LISTEN connection's URL set by the environment or the file (None: the database URL's)."""
        return os.environ.get(LISTEN_URL_ENV) or self.listen_url

    def resolved_read_url(self) -> str | None:
        """The replica's URL set by the environment or the file (None: read from the primary)."""
        return os.environ.get(READ_URL_ENV) or self.read_url

    def resolved_pool_mode(self) -> str:
        return os.environ.get(POOL_MODE_ENV) or self.pool_mode


def define_config(
    *,
    database_url: str | None = None,
    schema: str = DEFAULT_SCHEMA,
    timezone: str = "UTC",
    workflows: Sequence[str] = (),
    tasks: TasksConfig | Mapping[str, Any] | None = None,
    listen_url: str | None = None,
    read_url: str | None = None,
    pool_mode: str = "session",
) -> Config:
    """Build a Config from keyword arguments; `tasks` may be a dict as in the seed."""
    if isinstance(workflows, str):
        workflows = [workflows]
    return Config(
        database_url=database_url,
        schema=schema,
        timezone=timezone,
        workflows=tuple(workflows),
        tasks=_tasks_config(tasks),
        listen_url=listen_url,
        read_url=read_url,
        pool_mode=pool_mode,
    )


def _tasks_config(value: TasksConfig | Mapping[str, Any] | None) -> TasksConfig:
    if value is None:
        return TasksConfig()
    if isinstance(value, TasksConfig):
        return value
    options = dict(value)
    worker_options = options.pop("worker_options", None)
    _reject_unknown("tasks", options, TasksConfig)
    if worker_options is not None and not isinstance(worker_options, WorkerOptions):
        worker_options = dict(worker_options)
        _reject_unknown("tasks.worker_options", worker_options, WorkerOptions)
        worker_options = WorkerOptions(**worker_options)
    return TasksConfig(**options, worker_options=worker_options or WorkerOptions())


def _reject_unknown(where: str, given: Mapping[str, Any], kind: type) -> None:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown {where} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
