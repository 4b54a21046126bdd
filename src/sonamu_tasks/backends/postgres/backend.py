"""PostgresBackend: the Backend protocol on PostgreSQL through psycopg 3."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ...errors import BackendClosed, BackendUnavailable, ConfigError, StorageError
from ...log import FailureEpisodes
from ...queue import DEFAULT_QUEUE, Queue
from ...reconnect import connection_wait
from ...status import RunStatus, StepStatus
from ..base import (
    CANCELED_ERROR,
    FOREVER,
    Checkpoint,
    ChildOutcome,
    ClaimedRun,
    CutValue,
    FinishedRuns,
    LeaseLost,
    MessageRecord,
    MessageSent,
    NewRun,
    Notifications,
    OverdueRun,
    QueueStats,
    RunEventRecord,
    RunQuery,
    RunRecord,
    RunWrite,
    ScheduleDeletion,
    ScheduleRecord,
    StepRecord,
    TimedWait,
    WorkerRecord,
    retention_declarations,
    selection_workflow,
)
from ..group_commit import GroupCommit
from ..sql_files import check_applied, newer_than_code
from .queries import QUERIES, migrations
from .types import register_adapters
from .wakeups import Wakeups

logger = logging.getLogger("sonamu_tasks.postgres")

P = ParamSpec("P")
T = TypeVar("T")

# The NOTIFY channel is "sonamu_tasks:" + schema, and a channel name holds at most 63 bytes.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,49}$")

# SQLSTATE classes after which the same call can simply be made again: the connection or the server went
# away (08, 57P01-57P03 admin/crash shutdown, 53 out of resources), or PostgreSQL chose this transaction as a
# victim (40001 serialization, 40P01 deadlock), or a lock or statement timeout (55P03, 57014). Anything else
# (a value the column refuses: 22; a constraint: 23; a too large index row: 54 ...) fails the same way again.
_TRANSIENT_STATES = ("08", "53", "57", "58", "40", "55P03")
# How long one diagnosis of a pool timeout answers the calls that time out after it.
_PROBE_REUSE_S = 5.0
# The error a worker's write stores when it meets a stored cancel request (retry_run, park_run, release_runs).
_CANCELED = Jsonb(CANCELED_ERROR)
# How long one of the pool's reconnection attempts lasts before it starts over (see `_new_pool`).
RECONNECT_ATTEMPT_S = 5.0
# The LISTEN connection: how long without a notification before a probe, how long the probe (and the connect)
# may take before the connection counts as dead, and the TCP keepalives that notice a dead peer meanwhile
# (client-side socket options: a pooler never sees them).
LISTEN_IDLE_S = 5.0
LISTEN_ANSWER_S = 5
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# How long the diagnosis of a pool timeout waits for its own new connection (less when its caller gives up sooner).
_PROBE_TIMEOUT_S = 5
# A watch of a run whose stripe a finish holds is asked again after 1 ms, then 2, 4 ... 50 ms: a finish commits
# within milliseconds, and a long one (a cancel cascading to thousands of runs) is not asked 1,000 times a second.
WATCH_RETRY_S = 0.001
WATCH_RETRY_MAX_S = 0.05


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, psycopg_pool.PoolTimeout):
        return True
    if not isinstance(error, psycopg.Error):
        return False
    state = error.sqlstate
    if state is None:  # raised by the client: the connection is broken or could not be made
        # InternalError: the client lost track of the protocol, as behind PgBouncer when the server behind it
        # stopped ("received 2 results from command 'BEGIN'"); the connection is discarded, the call retried.
        return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError | psycopg.InternalError)
    return state.startswith(_TRANSIENT_STATES)


async def _try_again(pool: psycopg_pool.AsyncConnectionPool[Any]) -> None:
    """A reconnection attempt gave up: start a new one (`check` grows a pool short of connections). Otherwise
    nothing would try until a new call asks for a connection, and calls already waiting wait out their timeout."""
    if not pool.closed:
        await pool.check()


def _server(url: str) -> str:
    """Where `url` connects, for a message: host:port/database, never the password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the configured database_url"
    host = params.get("host") or params.get("hostaddr") or "the default host"
    database = params.get("dbname")
    return f"{host}:{params.get('port') or 5432}" + (f"/{database}" if database else "")


def _transient(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Connection-level failures become BackendUnavailable (retried); data errors become StorageError."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
            if isinstance(error, psycopg_pool.PoolClosed):  # retrying cannot help: nothing reopens the pool
                raise BackendClosed(f"{method.__name__}: the manager was stopped ({error})") from error
            if _is_transient(error):
                # A private method (_insert_runs, a group commit's flush) serves calls of other names: not named.
                during = "" if method.__name__.startswith("_") else f" during {method.__name__}"
                raise BackendUnavailable(f"PostgreSQL unavailable{during}: {error}") from error
            state = getattr(error, "sqlstate", None)
            raise StorageError(f"PostgreSQL refused {method.__name__} (SQLSTATE {state}): {error}") from error

    return wrapper


class PostgresBackend:
    pushes_notifications = True

    def __init__(
        self,
        url: str,
        *,
        schema: str = "sonamu_tasks",
        pool_size: int = 10,
        listen_url: str | None = None,
        read_url: str | None = None,
        pool_mode: str = "session",
        pool_timeout_s: float = 30.0,
    ) -> None:
        """`url`: the primary, directly or through a pooler (`pool_mode` says which kind). `listen_url`: a direct
        connection for LISTEN and the retention lock (required in transaction mode). `read_url`: a replica for
        the lists and the metrics. `pool_timeout_s`: how long a call waits for a pooled connection."""
        if not _SCHEMA_NAME.match(schema):
            raise ConfigError(
                f"schema {schema!r} must be a lowercase SQL identifier (letters, digits, _) of at most 50 characters"
            )
        if pool_mode not in ("session", "transaction"):
            raise ConfigError(f"pool_mode must be 'session' or 'transaction', got {pool_mode!r}")
        if pool_mode == "transaction" and not listen_url:
            raise ConfigError("pool_mode 'transaction' needs listen_url, a direct connection for LISTEN and locks")
        self.url = url
        self.listen_url = listen_url or url
        self.read_url = read_url
        self.schema = schema
        self.channel = f"sonamu_tasks:{schema}"
        self._pool_timeout_s = pool_timeout_s
        # Why calls wait out the pool, per URL: (when found, the answer). One probe at a time, its answer shared
        # for a few seconds, so callers timing out together do not each open a connection to a busy server.
        self._no_connection: dict[str, tuple[float, str]] = {}
        self._probing = asyncio.Lock()
        # In transaction mode a pooled connection carries no session state: no prepared statement (psycopg
        # prepares a query run often; the next transaction may be on another server connection, which has it
        # or lacks it), no session search_path: each checkout is one transaction that sets it (`_connection`).
        self._per_transaction = pool_mode == "transaction"
        self._connect_kwargs: dict[str, Any] = {"autocommit": True, "application_name": "sonamu_tasks"}
        if self._per_transaction:
            self._connect_kwargs["prepare_threshold"] = None
        self._set_search_path = sql.SQL("SET search_path TO {}").format(sql.Identifier(schema))
        self._begin = sql.SQL("BEGIN; SET LOCAL search_path TO {}").format(sql.Identifier(schema))
        self._watch_in_one_query = (
            self._begin + sql.SQL("; ") + sql.SQL(QUERIES["watch_runs"]) + sql.SQL("; COMMIT")  # see _watch
        )
        self._pool_size = max(2, pool_size)
        self._pool, self._read_pool = self._new_pools()
        self._pools_closed = False  # by close(): a closed psycopg pool cannot be opened again, so open() makes new ones
        # Checkpoints and completions of concurrent runs: (run id, lease token, checkpoints, output JSON or None).
        self._writes: GroupCommit[RunWrite, bool] = GroupCommit(self._write_runs)
        # run() calls in flight together: one insert statement, one commit. result() watches likewise.
        self._inserts: GroupCommit[NewRun, tuple[str, bool]] = GroupCommit(self._insert_runs)
        self._watches: GroupCommit[str, bool] = GroupCommit(self._watch_runs)
        # "Runs of these workflows are due": NOTIFYs after the inserting commits, one in flight (migration 0013).
        self._wakeups = Wakeups(self._notify_workers)

    def _new_pools(
        self,
    ) -> tuple[psycopg_pool.AsyncConnectionPool[Any], psycopg_pool.AsyncConnectionPool[Any]]:
        """The primary's pool, and the replica's (without one, lists read from the primary's)."""
        pool = self._new_pool(self.url, self._pool_size, f"sonamu_tasks:{self.schema}")
        if not self.read_url:
            return pool, pool
        return pool, self._new_pool(self.read_url, 4, f"sonamu_tasks:{self.schema}:read")

    def _new_pool(self, url: str, size: int, name: str) -> psycopg_pool.AsyncConnectionPool[Any]:
        return psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=size,
            kwargs=self._connect_kwargs,
            open=False,
            timeout=self._pool_timeout_s,
            # Short attempts, each followed at once by a fresh one (guarantee 7: the server may come back at any
            # time). One attempt retries at doubling gaps with no cap (1, 2, 4 ... 64 s under a long timeout), so
            # work resumed up to half an outage's length after the server was back. Given up after
            # RECONNECT_ATTEMPT_S, an attempt (gaps of 1 and 2 s) starts over through `check()`, which grows the
            # pool again with an immediate try: a connection is tried every 2 s at most however long the outage.
            # (Not 0: psycopg_pool would give up after the first failure and never start over.)
            reconnect_timeout=RECONNECT_ATTEMPT_S,
            reconnect_failed=_try_again,
            name=name,
            configure=self._configure,
        )

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Every new pooled connection: times past the year 9999 read clamped, not as errors; and, unless each
        transaction sets it, the schema as search_path. (Not a startup `options` parameter: PgBouncer refuses
        it.)"""
        register_adapters(conn.adapters)
        if not self._per_transaction:
            await conn.execute(self._set_search_path)

    async def _connect(self, url: str) -> psycopg.AsyncConnection[Any]:
        """A connection of its own (not pooled), set up like the pool's, with the session's search_path."""
        conn = await psycopg.AsyncConnection.connect(url, **self._connect_kwargs)
        register_adapters(conn.adapters)
        await conn.execute(self._set_search_path)
        return conn

    @contextlib.asynccontextmanager
    async def _connection(
        self, *, read: bool = False, begin: bool = True
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for one unit of work (`read`: from the replica's pool, when there is one).

        In transaction mode the unit is one transaction that first sets the search_path (a pooler gives each
        transaction whichever server connection is free); `conn.transaction()` inside it is a savepoint.
        `begin=False`: the caller sends its transaction itself (search_path included)."""
        pool = self._read_pool if read else self._pool
        try:
            # No longer than the caller will wait (until_available's deadline), or stop() with the database down
            # would wait out the pool's timeout past its grace period. Only the wait for a connection: a
            # statement cut short might have committed, unknown to its caller.
            conn = await pool.getconn(connection_wait(self._pool_timeout_s))
        except psycopg_pool.PoolTimeout as error:
            url = self.read_url if read and self.read_url else self.url
            raise psycopg_pool.PoolTimeout(f"{error}; {await self._why_no_connection(url, pool)}") from error
        try:
            async with conn:  # as pool.connection() does: a transaction left open is rolled back
                if not self._per_transaction or not begin:
                    yield conn
                    return
                await conn.execute(self._begin)
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")
        finally:
            await pool.putconn(conn)

    @contextlib.asynccontextmanager
    async def _statistics_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A read connection in a transaction without JIT, for the counts over every unfinished run (see
        no_jit in queries.sql). Its own transaction: SET LOCAL outside one does nothing."""
        async with self._connection(read=True) as conn, conn.transaction():
            await conn.execute(QUERIES["no_jit"])
            yield conn

    async def _why_no_connection(self, url: str, pool: psycopg_pool.AsyncConnectionPool[Any]) -> str:
        """Why a call waited out the pool's timeout: the server refuses new connections (its reason), or it
        accepts them and the pool's connections were all taken, or the pool holds fewer than it may (still
        reconnecting, or a new connection failing its setup)."""
        async with self._probing:
            found = self._no_connection.get(url)
            if found is not None and time.monotonic() - found[0] < _PROBE_REUSE_S:
                return found[1]
            limit = connection_wait(_PROBE_TIMEOUT_S)
            try:
                async with asyncio.timeout(limit):  # a connection being made: nothing to leave unknown
                    probe = await psycopg.AsyncConnection.connect(
                        url, connect_timeout=_PROBE_TIMEOUT_S, **self._connect_kwargs
                    )
            except psycopg.Error as error:
                answer = f"a new connection fails: {str(error).strip()}"
            except TimeoutError:
                answer = f"a new connection did not answer within {limit:.1f}s"
            else:
                await probe.close()
                stats = pool.get_stats()
                held, waiting = stats.get("pool_size", 0), stats.get("requests_waiting", 0)
                if held >= pool.max_size:
                    answer = (
                        f"the server accepts connections, and all {pool.max_size} of the pool's are in use "
                        f"({waiting} calls waiting): more calls in flight than the pool holds (a manager's pool "
                        "holds worker_options.concurrency + 4)"
                    )
                else:
                    answer = (
                        f"the server accepts connections, but the pool holds {held} of its {pool.max_size} "
                        "(reconnecting after an outage, or new connections failing their setup: see the log)"
                    )
            self._no_connection[url] = (time.monotonic(), answer)
            return answer

    # lifecycle

    async def open(self) -> None:
        if self._pools_closed:  # started again after a stop (a second FastAPI lifespan, a test client per test)
            self._pool, self._read_pool = self._new_pools()
            self._probing = asyncio.Lock()  # the previous one may belong to the previous event loop
            self._pools_closed = False
        await self._pool.open(wait=False)
        if self._read_pool is not self._pool:
            await self._read_pool.open(wait=False)

    async def close(self) -> None:
        await self._wakeups.flush()  # a run() just before shutdown still wakes a worker
        self._pools_closed = True
        if self._read_pool is not self._pool:
            await self._read_pool.close()
        await self._pool.close()

    @_transient
    async def migrate(self) -> list[str]:
        applied: list[str] = []
        # Connected as the pool connects, so a connection the server or a pooler refuses says why here, at start-up.
        connect = psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs)
        async with await connect as conn, conn.transaction():
            # Every process migrates at start-up: the lock makes all but one wait, then find it done.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [self.channel])
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema)))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cursor = await conn.execute(QUERIES["applied_migrations"])
            done = {row[0] for row in await cursor.fetchall()}
            if (newer := newer_than_code(done, migrations())) is not None:
                logger.warning("schema %s: %s", self.schema, newer)
            for name, text in migrations():
                if name in done:
                    continue
                await conn.execute(text.encode())  # bytes: a migration is a script, not a query
                await conn.execute("INSERT INTO migrations (name) VALUES (%s)", [name])
                applied.append(name)
        for name in applied:
            logger.info("applied migration %s to schema %s", name, self.schema)
        return applied

    async def check_schema(self) -> None:
        try:
            applied = await self.applied_migrations()
        except BackendUnavailable as error:
            # Named by its server: what is down matters to the reader, not which call found it.
            raise BackendUnavailable(f"PostgreSQL at {_server(self.url)}: {error.__cause__ or error}") from error
        where = f"PostgreSQL schema {self.schema!r} (database at {_server(self.url)})"
        if (newer := check_applied(where, applied, migrations())) is not None:
            logger.warning("schema %s: %s", self.schema, newer)

    @_transient
    async def applied_migrations(self) -> set[str] | None:
        """The migrations recorded in the schema; None when it has no migrations table (or is not there)."""
        async with self._connection() as conn:
            cursor = await conn.execute(QUERIES["migrations_table"], {"schema": self.schema})
            found = await cursor.fetchone()
            if found is None or not found[0]:
                return None
            _, usage, select, role = found
            if not (usage and select):
                raise ConfigError(
                    f"role {role!r} may not read schema {self.schema!r} (database at {_server(self.url)}): "
                    f'GRANT USAGE ON SCHEMA "{self.schema}" TO "{role}"; '
                    f'GRANT SELECT ON ALL TABLES IN SCHEMA "{self.schema}" TO "{role}"'
                )
            cursor = await conn.execute(QUERIES["applied_migrations"])
            return {row[0] for row in await cursor.fetchall()}

    async def _notify_workers(self, payloads: list[str]) -> None:
        async with self._connection() as conn:
            await conn.execute(QUERIES["notify_workers"], {"channel": self.channel, "payloads": payloads})

    async def listen(self, notifications: Notifications) -> None:
        delay = 0.1
        lost = FailureEpisodes(
            logger,
            "LISTEN connection lost (%s); reconnecting, said again when it is back",
            "LISTEN connection back, after %.1fs",
        )
        # A connection that goes silent (a frozen server, a dropped NAT entry) must not be waited on forever:
        # it would stop every wake-up, with nothing in the log, until TCP gave up (15 min to hours). The
        # connect and the probe are bounded, and TCP keepalives notice a dead peer without a probe too.
        connect = {**self._connect_kwargs, **_KEEPALIVES, "connect_timeout": LISTEN_ANSWER_S}
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.listen_url, **connect) as conn:
                    async with asyncio.timeout(LISTEN_ANSWER_S):
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    delay = 0.1
                    lost.succeeded()
                    notifications.reconnected()  # events may have been missed while we were away
                    while True:
                        async for notify in conn.notifies(timeout=LISTEN_IDLE_S):
                            _dispatch(notify.payload, notifications)
                        # No event for a while: prove the connection is alive, or reconnect. (Cut short, a
                        # SELECT 1 leaves nothing unknown; psycopg cancels it and closes the connection.)
                        async with asyncio.timeout(LISTEN_ANSWER_S):
                            await conn.execute("SELECT 1")
            except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
                lost.failed(" ".join(str(error).split()))  # psycopg's text spans lines; a log line must not
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except TimeoutError:
                logger.warning(
                    "LISTEN connection silent: no answer within %.0fs (a frozen server or a dropped network path); "
                    "reconnecting",
                    LISTEN_ANSWER_S,
                )

    # runs

    async def create_run(self, run: NewRun) -> tuple[str, bool]:
        # The run() calls of this process in flight together share one insert statement and one commit (a lone
        # call goes at once): the producer's cost per run is the statement's, not a round trip and a commit.
        return await self._inserts.submit(run)

    async def create_runs(self, runs: Sequence[NewRun], *, alike: bool = False) -> list[tuple[str, bool]]:
        # A large batch of alike runs (a run_many without keys) is streamed into one COPY as it is prepared (runs
        # may be a RunBatch, which prepares its runs as they are read): the server inserts the first runs while
        # this process prepares the next, instead of after it prepared them all.
        if alike and len(runs) >= COPY_AT_LEAST:
            copied = await self._copy_runs(runs, prepared=False)
            if copied is None:  # a statement_timeout holds: prepare them all first, so that it counts only the COPY
                runs = list(runs)
                copied = await self._copy_runs(runs, prepared=True)
            if copied:
                return [(run.id, True) for run in runs]
        return await self._insert_runs(list(runs))

    @_transient
    async def _copy_runs(self, runs: Sequence[NewRun], *, prepared: bool) -> bool | None:
        """Insert `runs` (alike: see create_runs in base.py) by one COPY; False when one of their ids is taken,
        nothing inserted (the batch sent again after its commit's answer was lost: create_runs' INSERT then
        finds which are its own). None, nothing done, when a statement_timeout holds and `runs` are not all
        `prepared`: the COPY would count the time taken to prepare them (a slow input schema could make it time
        out, again at every retry)."""
        first = runs[0]
        due = _due_names([first])  # alike: all start as the first does
        # Its NOTIFY is sent after the commit (Wakeups), not in its transaction: a COPY lasts as long as its
        # runs take to prepare and insert, and holding this process's NOTIFY turn that long would hold back the
        # wake-ups of every other run() meanwhile (they only gather during a turn).
        params = {"queue": first.queue, "workflow_name": first.workflow_name, "version": first.version}
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    row = await (await conn.execute(QUERIES["copy_runs_setup"], params)).fetchone()
                    assert row is not None  # a SELECT without FROM: always one row
                    now, queue, timed = row
                    if timed and not prepared:
                        return None
                    async with conn.cursor().copy(QUERIES["copy_runs"]) as copy:
                        for rows in _copy_data(runs, now, queue, conn.info.encoding):
                            await copy.write(rows)
            except psycopg.errors.UniqueViolation:
                return False
        if due:
            self._wakeups.runs_due(due)
        return True

    @_transient
    async def _insert_runs(self, runs: Sequence[NewRun]) -> list[tuple[str, bool]]:
        """Insert `runs` in one statement; (id, created) per run, in order. A run whose id or idempotency key
        is taken gives the run that holds it."""
        outcome: dict[str, tuple[str, bool]] = {}
        pending = runs
        while pending:
            due = _due_names(pending)
            # With no NOTIFY of this process in flight, the insert carries it (no extra round trip, and its
            # commit is the only one of this process that takes the notification lock); otherwise the NOTIFY in
            # flight is followed by one for every run committed meanwhile (Wakeups).
            with self._wakeups.turn(wanted=bool(due)) as along:
                if len(pending) == 1:  # a lone call: the single-row statement, quicker than the batch's
                    query = QUERIES["create_run"]
                    params = {**_new_run_params(pending[0]), "notify": along, "channel": self.channel}
                else:
                    query = QUERIES["create_runs"]
                    params = {**_runs_params(pending), "notify": due if along else [], "channel": self.channel}
                async with self._connection() as conn:
                    inserted = {row[0] for row in await (await conn.execute(query, params)).fetchall()}
                    everyone = len(inserted) == len(pending)  # the common case: nothing to look up
                    collided = [] if everyone else [run for run in pending if run.id not in inserted]
                    holders: dict[str, str] = {}
                    if collided:
                        keys = [run.idempotency_key for run in collided if run.idempotency_key]
                        ids = [run.id for run in collided]
                        found = await conn.execute(QUERIES["find_runs"], {"keys": keys, "ids": ids})
                        for run_id, key in await found.fetchall():
                            holders[key or run_id] = run_id
                            holders[run_id] = run_id
            if inserted and not along:
                self._wakeups.runs_due(_due_names(pending if everyone else [r for r in pending if r.id in inserted]))
            if everyone and pending is runs:
                return [(run.id, True) for run in runs]
            for run in pending:
                if run.id in inserted:
                    outcome[run.id] = (run.id, True)
                elif (holder := holders.get(run.idempotency_key or run.id)) is not None:
                    # Its own id: this call's earlier attempt committed it and the answer was lost, so the run is
                    # still this call's creation (not one found by its idempotency key).
                    outcome[run.id] = (holder, holder == run.id)
            # A colliding run deleted in between leaves its item unresolved: insert it again.
            pending = [run for run in collided if run.id not in outcome]
        return [outcome[run.id] for run in runs]

    @_transient
    async def create_debounced_run(self, run: NewRun) -> tuple[str, bool]:
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["create_debounced_run"], _new_run_params(run))).fetchone()
        # No row: its own id is taken, an earlier attempt of this call inserted it and the answer was lost
        run_id, created = (run.id, True) if row is None else (row[0], bool(row[1]))
        if created and _due_soon(run):  # its start is fixed by the first call: the later ones change no timer
            self._wakeups.runs_due([run.workflow_name])
        return run_id, created

    @_transient
    async def create_claimed_run(
        self, run: NewRun, worker_id: str, lease: timedelta
    ) -> tuple[str, bool, ClaimedRun | None]:
        if run.queue is None:
            raise ValueError(f"create_claimed_run needs the queue of run {run.id}: only its own process claims it")
        params = {**_new_run_params(run), "worker_id": worker_id, "lease": lease}
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["create_claimed_run"], params)).fetchone()
            if row is not None:
                if row[6] is None:  # a limited queue's run is inserted pending: the claim weighs it, workers hear
                    self._wakeups.runs_due([run.workflow_name])
                return row[0], True, (ClaimedRun(*row) if row[6] is not None else None)
            existing = await (await conn.execute(QUERIES["find_run_by_key"], params)).fetchone()
        if existing is None:
            return run.id, False, None
        return existing[0], existing[0] == run.id, None  # its own id: an earlier attempt inserted it (_insert_runs)

    # queues

    @_transient
    async def register_queues(self, queues: Sequence[Queue], workflow_queues: Sequence[tuple[str, str, str]]) -> None:
        # One transaction per queue, holding only that queue's lock: never waiting for a second lock while
        # holding one (the lock's rules are in migration 0012). One checkout each: in transaction mode a checkout
        # is one transaction.
        for queue in queues:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(QUERIES["lock_queue"], {"name": queue.name})
                await self._save_queue(conn, queue)
        if workflow_queues:
            rows = [{"name": n, "version": v, "queue": q} for n, v, q in workflow_queues]
            async with self._connection() as conn:
                await conn.execute(QUERIES["save_workflow_queues"], {"workflows": json.dumps(rows)})

    @staticmethod
    async def _save_queue(conn: psycopg.AsyncConnection[Any], queue: Queue) -> None:
        rate = queue.rate
        params = {
            "name": queue.name,
            "concurrency": queue.concurrency,
            "worker_concurrency": queue.worker_concurrency,
            "rate_limit": rate[0] if rate else None,
            "rate_period": rate[1] if rate else None,
            "per_key_concurrency": queue.per_key_concurrency,
        }
        (key_limit_changed,) = await (await conn.execute(QUERIES["save_queue"], params)).fetchone() or (False,)
        if key_limit_changed:  # what was set aside under the old limit is weighed again under the new one
            await conn.execute(QUERIES["unpark_queue"], {"name": queue.name})

    @_transient
    async def queue_stats(self) -> list[QueueStats]:
        async with self._statistics_connection() as conn:
            rows = await (await conn.execute(QUERIES["queue_stats"])).fetchall()
        return [QueueStats(*row) for row in rows]

    # schedules

    @_transient
    async def sync_schedules(self, schedules: Sequence[ScheduleRecord], workflows: Sequence[str]) -> None:
        async with self._connection() as conn, conn.transaction():
            for schedule in schedules:
                await conn.execute(
                    QUERIES["upsert_schedule"],
                    {
                        "name": schedule.name,
                        "workflow_name": schedule.workflow_name,
                        "version": schedule.version,
                        "expression": schedule.expression,
                        "timezone": schedule.timezone,
                        "input": json.dumps(schedule.input),
                        "next_fire_at": schedule.next_fire_at,
                    },
                )
            keep = [schedule.name for schedule in schedules]
            await conn.execute(QUERIES["delete_stale_schedules"], {"workflows": list(workflows), "keep": keep})

    @_transient
    async def list_schedules(self) -> list[ScheduleRecord]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["list_schedules"])).fetchall()
        return [ScheduleRecord(*row) for row in rows]

    @_transient
    async def delete_schedule(self, name: str, workflow_name: str, stale_after: float) -> ScheduleDeletion:
        params = {"name": name, "workflow_name": workflow_name, "stale_after": stale_after}
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["delete_schedule"], params)).fetchone()
        assert row is not None
        deleted, live = row
        return "deleted" if deleted else "in_use" if live else "missing"

    @_transient
    async def fire_schedule(
        self, name: str, expected: datetime, fire_at: datetime, next_fire_at: datetime, run: NewRun | None
    ) -> bool:
        params = {
            "name": name,
            "expected": expected,
            "fire_at": fire_at,
            "next_fire_at": next_fire_at,
            "run_id": run.id if run else None,
            "version": run.version if run else None,
        }
        async with self._connection() as conn, conn.transaction():
            if await (await conn.execute(QUERIES["advance_schedule"], params)).fetchone() is None:
                return False
            if run is not None:
                # The run's idempotency key (schedule and fire time) is the second, unique guard.
                await conn.execute(QUERIES["create_run"], _new_run_params(run))
        if run is not None:
            self._wakeups.runs_due([run.workflow_name])
        return True

    @_transient
    async def claim_runs(
        self,
        worker_id: str,
        workflows: Sequence[tuple[str, str]],
        limit: int,
        lease: timedelta,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        held: Sequence[tuple[str, str]] = (),
    ) -> list[ClaimedRun]:
        if limit <= 0 or not workflows or not queues:
            return []
        params = {
            "worker_id": worker_id,
            **_served(workflows, queues),
            "limit": limit,
            "lease": lease,
            "held_tokens": _uuid_array(token for _, token in held),
        }
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["claim_runs"], params)).fetchall()
        return [ClaimedRun(*row) for row in rows]

    @_transient
    async def take_run(
        self,
        worker_id: str,
        run_id: str,
        workflows: Sequence[tuple[str, str]],
        lease: timedelta,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
    ) -> ClaimedRun | None:
        if not workflows or not queues:
            return None
        params = {
            "worker_id": worker_id,
            "id": run_id,
            **_served(workflows, queues),
            "lease": lease,
        }
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["take_run"], params)).fetchone()
        return None if row is None else ClaimedRun(*row)

    @_transient
    async def seconds_until_due(
        self,
        workflows: Sequence[tuple[str, str]],
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        held: Sequence[tuple[str, str]] = (),
    ) -> float | None:
        if not workflows or not queues:
            return None
        params = {
            **_served(workflows, queues),
            "held_tokens": _uuid_array(token for _, token in held),
        }
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["seconds_until_due"], params)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    @_transient
    async def heartbeat(
        self, worker_id: str, held: Sequence[tuple[str, str]], lease: timedelta
    ) -> dict[str, str | None]:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(QUERIES["touch_worker"], {"worker_id": worker_id})
            if not held:
                return {}
            params = {"ids": [i for i, _ in held], "tokens": [t for _, t in held], "lease": lease}
            rows = await (await conn.execute(QUERIES["heartbeat_runs"], params)).fetchall()
        return {row[0]: row[1] for row in rows}

    # steering runs from outside

    @_transient
    async def cancel_run(self, run_id: str, error: dict[str, Any]) -> RunStatus | None:
        return await self._steer("cancel_run", {"run_id": run_id, "error": json.dumps(error)})

    @_transient
    async def pause_run(self, run_id: str) -> RunStatus | None:
        return await self._steer("pause_run", {"run_id": run_id})

    @_transient
    async def resume_run(self, run_id: str) -> RunStatus | None:
        return await self._steer("resume_run", {"run_id": run_id})

    @_transient
    async def restart_run(self, run_id: str) -> RunStatus | None:
        params = {"run_id": run_id}
        async with self._connection() as conn, conn.transaction():
            children = await (await conn.execute(QUERIES["restart_children"], params)).fetchall()
            row = await (await conn.execute(QUERIES["restart_run"], params)).fetchone()
            if row is None:
                row = await (await conn.execute(QUERIES["run_status"], params)).fetchone()
            else:
                for restarted in [run_id, *(child for child, status in children if status == "pending")]:
                    await conn.execute(QUERIES["restart_steps"], {"run_id": restarted})
        return None if row is None else RunStatus(row[0])

    @_transient
    async def settle_request(self, run_id: str, lease_token: str, error: dict[str, Any]) -> RunStatus:
        params = {"run_id": run_id, "lease_token": lease_token, "error": json.dumps(error)}
        return RunStatus((await self._fenced("settle_request", params))[0])

    async def _steer(self, query: str, params: dict[str, Any]) -> RunStatus | None:
        """Apply a steering update; when it does not apply, report the status the run has."""
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES[query], params)).fetchone()
            if row is None:
                row = await (await conn.execute(QUERIES["run_status"], params)).fetchone()
        return None if row is None else RunStatus(row[0])

    @_transient
    async def release_runs(self, held: Sequence[tuple[str, str]]) -> None:
        if not held:
            return
        async with self._connection() as conn:
            params = {"ids": [i for i, _ in held], "tokens": [t for _, t in held], "canceled_error": _CANCELED}
            await conn.execute(QUERIES["release_runs"], params)

    @_transient
    async def run_versions(self, run_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["run_versions"], {"ids": _uuid_array(run_ids)})).fetchall()
        return {run_id: (name, version) for run_id, name, version in rows}

    @_transient
    async def get_run(
        self, run_id: str, *, with_steps: bool = False, value_limit: int | None = None
    ) -> RunRecord | None:
        params = {"run_id": run_id, "limit": value_limit}
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            query = QUERIES["get_run" if value_limit is None else "get_run_capped"]
            row = await (await cursor.execute(query, params)).fetchone()
            if row is None:
                return None
            steps = await self._load_steps(conn, run_id, value_limit) if with_steps else {}
        row["status"] = RunStatus(row["status"])
        return RunRecord(**_with_cuts(row, "input", "output"), steps=tuple(steps.values()))

    async def watch_run(self, run_id: str) -> bool:
        # The result() calls of this process in flight together share one statement (a lone one goes at once).
        return await self._watches.submit(run_id)

    @_transient
    async def _watch_runs(self, run_ids: list[str]) -> list[bool]:
        # A run whose stripe a finish holds comes back busy, not watched: the statement never waits for a lock
        # (migration 0032). Those are asked again shortly, until the finish commits (then the run is finished:
        # not watched, the waiter reads it) or the stripe is free.
        ids, pause = sorted(set(run_ids)), WATCH_RETRY_S
        watched: set[str] = set()
        while True:
            rows = await self._watch(ids)
            watched.update(run_id for run_id, busy in rows if not busy)
            ids = sorted(run_id for run_id, busy in rows if busy)
            if not ids:
                return [run_id in watched for run_id in run_ids]
            await asyncio.sleep(pause)
            pause = min(pause * 2, WATCH_RETRY_MAX_S)

    async def _watch(self, run_ids: list[str]) -> list[tuple[str, bool]]:
        params = {"run_ids": run_ids}
        if not self._per_transaction:
            async with self._connection() as conn:
                return await (await conn.execute(QUERIES["watch_runs"], params)).fetchall()
        # In transaction mode a COMMIT is a statement of its own, and the stripes the watch took would stay locked
        # until the client sent it: a waiter stalled in between (a blocked event loop, a stopped process) would
        # hold up every finish of those stripes. So the whole transaction is one query, which the server runs to
        # its COMMIT on its own: the simple protocol, whose parameters psycopg binds on this side (ClientCursor).
        async with self._connection(begin=False) as conn:
            cursor = psycopg.AsyncClientCursor(conn)
            await cursor.execute(self._watch_in_one_query, params)
            while cursor.description is None and cursor.nextset():
                pass  # the results of BEGIN and SET LOCAL come first
            return await cursor.fetchall()

    @_transient
    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        params = list_params(query)
        async with self._connection(read=True) as conn:
            cursor = conn.cursor(row_factory=dict_row)
            # Never prepared: a plan made for the filters of one call, its "IS NULL OR"s dropped, reads the index they
            # fit; a generic plan, which psycopg's prepared statement could settle on after five calls, cannot.
            rows = await (await cursor.execute(QUERIES["list_runs"], params, prepare=False)).fetchall()
        records = []
        for row in rows:
            row["status"] = RunStatus(row["status"])
            records.append(RunRecord(**_with_cuts(row, "input", "output")))
        return records

    # fenced writes of a claimed run

    @_transient
    async def load_steps(self, run_id: str) -> dict[str, StepRecord]:
        async with self._connection() as conn:
            return await self._load_steps(conn, run_id)

    async def save_step(
        self,
        run_id: str,
        lease_token: str,
        name: str,
        output_json: str,
        started_at: datetime,
        finished_at: datetime,
        kind: str = "call",
    ) -> None:
        step = Checkpoint(name, output_json, started_at, finished_at, kind)
        if not await self._writes.submit((run_id, lease_token, (step,), None)):
            raise LeaseLost(run_id)

    @_transient
    async def park_run(
        self, run_id: str, lease_token: str, waits: Sequence[TimedWait], children: Sequence[str]
    ) -> tuple[RunStatus, datetime]:
        waits_json = json.dumps(
            [
                {
                    "name": wait.name,
                    "kind": wait.kind,
                    "started_at": wait.started_at.isoformat(),
                    "seconds": None if wait.duration is None else wait.duration.total_seconds(),
                    "wake_at": None if wait.wake_at is None else wait.wake_at.isoformat(),
                    "waits_for": wait.waits_for,
                }
                for wait in waits
            ]
        )
        topics = sorted({str(w.waits_for["topic"]) for w in waits if w.kind == "receive" and w.waits_for})
        events = sorted(
            {(str(w.waits_for["event"]), str(w.waits_for["key"])) for w in waits if w.kind == "event" and w.waits_for}
        )
        async with self._connection() as conn, conn.transaction():
            owned = await (
                await conn.execute(QUERIES["lock_parking_run"], {"run_id": run_id, "lease_token": lease_token})
            ).fetchone()
            if owned is None:
                raise LeaseLost(run_id)
            ready = False
            if topics:
                row = await (
                    await conn.execute(QUERIES["messages_waiting"], {"run_id": run_id, "topics": topics})
                ).fetchone()
                ready = bool(row and row[0])
            for name, key in events:
                await conn.execute(QUERIES["lock_event"], {"name": name, "key": key})
                found = await conn.execute(QUERIES["event_emitted"], {"name": name, "key": key, "since": owned[0]})
                ready = ready or await found.fetchone() is not None
            if children:
                locked = await conn.execute(QUERIES["lock_children"], {"children": list(children)})
                ready = any(RunStatus(status).finished for (status,) in await locked.fetchall()) or ready
            params = {
                "run_id": run_id,
                "lease_token": lease_token,
                "waits": waits_json,
                "ready": ready,
                "waiting": bool(children) or any(wait.kind != "sleep" for wait in waits),
                "forever": FOREVER,
                "canceled_error": _CANCELED,
            }
            row = await (await conn.execute(QUERIES["park_run"], params)).fetchone()
        if row is None:
            raise LeaseLost(run_id)
        return RunStatus(row[0]), row[1]

    @_transient
    async def take_message(
        self, run_id: str, lease_token: str, name: str, topic: str, started_at: datetime
    ) -> tuple[bool, Any]:
        params = {
            "run_id": run_id,
            "lease_token": lease_token,
            "name": name,
            "topic": topic,
            "started_at": started_at,
            "waits_for": json.dumps({"topic": topic}),
        }
        return await self._take("take_message", params)

    @_transient
    async def take_event(
        self, run_id: str, lease_token: str, name: str, event: str, key: str, started_at: datetime
    ) -> tuple[bool, Any]:
        params = {
            "run_id": run_id,
            "lease_token": lease_token,
            "name": name,
            "event": event,
            "key": key,
            "started_at": started_at,
            "waits_for": json.dumps({"event": event, "key": key}),
        }
        return await self._take("take_event", params)

    async def _take(self, query: str, params: dict[str, Any]) -> tuple[bool, Any]:
        async with self._connection() as conn:
            owned, taken, payload = await self._one(conn, query, params)
        if not owned:
            raise LeaseLost(str(params["run_id"]))
        return bool(taken), payload

    @_transient
    async def complete_wait(
        self, run_id: str, lease_token: str, name: str, kind: str, started_at: datetime, waits_for: dict[str, Any]
    ) -> None:
        params = {
            "run_id": run_id,
            "lease_token": lease_token,
            "name": name,
            "kind": kind,
            "started_at": started_at,
            "waits_for": json.dumps(waits_for),
        }
        await self._fenced("complete_wait", params)

    @_transient
    async def set_run_event(self, run_id: str, lease_token: str, name: str, key: str, value_json: str) -> None:
        params = {"run_id": run_id, "lease_token": lease_token, "name": name, "key": key, "value": value_json}
        async with self._connection() as conn:
            owned, _ = await self._one(conn, "set_run_event", params)
        if not owned:
            raise LeaseLost(run_id)

    @_transient
    async def get_run_event(self, run_id: str, key: str) -> tuple[RunStatus | None, bool, Any]:
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["get_run_event"], {"run_id": run_id, "key": key})).fetchone()
        if row is None:
            return None, False, None
        return RunStatus(row[0]), bool(row[1]), row[2]

    @_transient
    async def list_run_events(self, run_id: str) -> list[RunEventRecord]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["list_run_events"], {"run_id": run_id})).fetchall()
        return [RunEventRecord(*row) for row in rows]

    @_transient
    async def list_messages(self, run_id: str, limit: int) -> list[MessageRecord]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["list_messages"], {"run_id": run_id, "limit": limit})).fetchall()
        return [MessageRecord(*row) for row in rows]

    @_transient
    async def send_message(
        self, run_id: str, topic: str, payload_json: str, idempotency_key: str | None
    ) -> MessageSent:
        params = {"run_id": run_id, "topic": topic, "payload": payload_json, "idempotency_key": idempotency_key}
        with self._wakeups.turn() as along:  # the statement carries the NOTIFY if it wakes the run
            async with self._connection() as conn:
                found, taken, stored, woke, _, prior = await self._one(
                    conn, "send_message", {**params, "notify": along, "channel": self.channel}
                )
        if woke is not None and not along:
            self._wakeups.runs_woken([woke])
        if not found:
            return "no_run"
        if not taken:
            return "repeated" if prior else "completed"
        return "stored" if stored else "repeated"

    @_transient
    async def emit_event(self, name: str, key: str, payload_json: str) -> int:
        params = {"name": name, "key": key, "payload": payload_json}
        with self._wakeups.turn() as along:  # as in send_message
            async with self._connection() as conn, conn.transaction():
                await conn.execute(QUERIES["lock_event"], params)
                woken, workflows, _ = await self._one(
                    conn, "emit_event", {**params, "notify": along, "channel": self.channel}
                )
        if workflows and not along:
            self._wakeups.runs_woken(workflows)
        return int(woken)

    async def _one(self, conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]) -> tuple[Any, ...]:
        row: tuple[Any, ...] | None = await (await conn.execute(QUERIES[query], params)).fetchone()
        assert row is not None, f"{query} returns one row"
        return row

    @_transient
    async def start_children(
        self,
        run_id: str,
        lease_token: str,
        step_name: str,
        started_at: datetime,
        output_json: str,
        children: Sequence[NewRun],
    ) -> None:
        # Inputs are JSON text already: the array is assembled around them.
        rows = ",".join(
            f'{{"id":"{child.id}","workflow_name":{json.dumps(child.workflow_name)},'
            f'"version":{json.dumps(child.version)},"input":{child.input_json},'
            f'"parent_step":{json.dumps(child.parent_step)},"detached":{json.dumps(child.detached)},'
            f'"trace_context":{child.trace_context or "null"},"queue":{json.dumps(child.queue)},'
            f'"priority":{child.priority},"concurrency_key":{json.dumps(child.concurrency_key)},'
            f'"deadline_at":{_json_moment(child.deadline_at)},"deadline_delay":{_json_seconds(child.deadline_delay)}}}'
            for child in children
        )
        params = {
            "run_id": run_id,
            "lease_token": lease_token,
            "name": step_name,
            "started_at": started_at,
            "output": output_json,
            "children": f"[{rows}]",
        }
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["start_children"], params)).fetchone()
        if row is None or row[0] == 0:
            raise LeaseLost(run_id)
        self._wakeups.runs_due({child.workflow_name for child in children})

    @_transient
    async def fork_run(self, source_id: str, from_step: str, run: NewRun, step_names: Sequence[str]) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(QUERIES["create_run"], _new_run_params(run))
            params = {"new_id": run.id, "source_id": source_id, "names": list(step_names), "from_step": from_step}
            await conn.execute(QUERIES["fork_steps"], params)
            await conn.execute(QUERIES["mark_forked"], params)
        if _due_soon(run):
            self._wakeups.runs_due([run.workflow_name])

    @_transient
    async def unfinished_by_version(self) -> list[tuple[str, str, RunStatus, int, datetime]]:
        async with self._connection(read=True) as conn:
            rows = await (await conn.execute(QUERIES["unfinished_by_version"])).fetchall()
        return [(name, version, RunStatus(status), int(n), oldest) for name, version, status, n, oldest in rows]

    @_transient
    async def due_backlog(self) -> list[tuple[str, str, str, int, float]]:
        async with self._statistics_connection() as conn:
            rows = await (await conn.execute(QUERIES["due_backlog"])).fetchall()
        return [(queue, name, version, int(count), float(oldest)) for queue, name, version, count, oldest in rows]

    @_transient
    async def count_children(self, run_id: str) -> dict[RunStatus, int]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["count_children"], {"run_id": run_id})).fetchall()
        return {RunStatus(status): int(count) for status, count in rows}

    @_transient
    async def load_children(self, run_id: str) -> dict[str, ChildOutcome]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["load_children"], {"run_id": run_id})).fetchall()
        return {id: ChildOutcome(id, RunStatus(status), output, error) for id, status, output, error in rows}

    @_transient
    async def complete_sleep(self, run_id: str, lease_token: str, name: str) -> None:
        await self._fenced("complete_sleep", {"run_id": run_id, "lease_token": lease_token, "name": name})

    async def complete_run(
        self, run_id: str, lease_token: str, output_json: str, last_steps: Sequence[Checkpoint] = ()
    ) -> None:
        if not await self._writes.submit((run_id, lease_token, tuple(last_steps), output_json)):
            raise LeaseLost(run_id)

    @_transient
    async def _write_runs(self, batch: list[RunWrite]) -> list[bool]:
        # Step outputs and run outputs are JSON text already: the batch is assembled around them.
        rows = ",".join(
            f'{{"run_id":"{run_id}","lease_token":"{token}"{fields}}}'
            for run_id, token, steps, output in batch
            for fields in [*map(_step_fields, steps), *([] if output is None else [_output_fields(output)])]
        )
        async with self._connection() as conn:
            written = await (await conn.execute(QUERIES["write_runs"], {"batch": f"[{rows}]"})).fetchall()
        accepted = {row[0] for row in written}
        return [run_id in accepted for run_id, *_ in batch]

    @_transient
    async def fail_attempt(
        self,
        run_id: str,
        lease_token: str,
        error: dict[str, Any],
        step: tuple[str, datetime] | None,
        retry_delay: timedelta | None,
    ) -> RunStatus:
        error_json = json.dumps(error)
        params = {
            "run_id": run_id,
            "lease_token": lease_token,
            "error": error_json,
            "delay": retry_delay,
            "canceled_error": _CANCELED,  # typed jsonb: the other branch of the CASE, :error, is then jsonb too
        }
        query = QUERIES["fail_run" if retry_delay is None else "retry_run"]
        async with self._connection() as conn, conn.transaction():
            row = await (await conn.execute(query, params)).fetchone()
            if row is None:
                raise LeaseLost(run_id)
            if step is not None:
                step_params = {"run_id": run_id, "name": step[0], "started_at": step[1], "error": error_json}
                await conn.execute(QUERIES["record_step_failure"], step_params)
        return RunStatus(row[0])

    @_transient
    async def fail_overdue_runs(self, limit: int) -> list[OverdueRun]:
        async with self._connection() as conn, conn.transaction():
            rows = await (await conn.execute(QUERIES["fail_overdue_runs"], {"limit": limit})).fetchall()
            # A keyed run failed may have held its key's turn: the key's next run must not wait for the sweep.
            for queue in sorted({row[4] for row in rows if row[5] is not None}):
                await conn.execute(QUERIES["unpark_queue"], {"name": queue})
        return [OverdueRun(*row[:4]) for row in rows]

    # workers

    @_transient
    async def register_worker(self, worker: WorkerRecord) -> None:
        params = {
            "id": worker.id,
            "host": worker.host,
            "pid": worker.pid,
            "workflows": json.dumps([list(key) for key in worker.workflows]),
            "concurrency": worker.concurrency,
            "queues": json.dumps(worker.queues),
        }
        async with self._connection() as conn:
            await conn.execute(QUERIES["register_worker"], params)

    @_transient
    async def list_workers(self) -> list[WorkerRecord]:
        async with self._connection(read=True) as conn:
            rows = await (await conn.execute(QUERIES["list_workers"])).fetchall()
        return [
            WorkerRecord(id, host, pid, [(n, v) for n, v in pairs], concurrency, started, heartbeat, queues, running)
            for id, host, pid, pairs, concurrency, started, heartbeat, queues, running in rows
        ]

    @_transient
    async def remove_worker(self, worker_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(QUERIES["remove_worker"], {"worker_id": worker_id})

    # helpers

    async def _fenced(self, query: str, params: dict[str, Any]) -> tuple[Any, ...]:
        async with self._connection() as conn:
            row: tuple[Any, ...] | None = await (await conn.execute(QUERIES[query], params)).fetchone()
        if row is None:
            raise LeaseLost(str(params["run_id"]))
        return row

    async def _load_steps(
        self, conn: psycopg.AsyncConnection[Any], run_id: str, value_limit: int | None = None
    ) -> dict[str, StepRecord]:
        cursor = conn.cursor(row_factory=dict_row)
        query = QUERIES["load_steps" if value_limit is None else "load_steps_capped"]
        rows = await (await cursor.execute(query, {"run_id": run_id, "limit": value_limit})).fetchall()
        steps = {}
        for row in rows:
            row["status"] = StepStatus(row["status"])
            steps[row["name"]] = StepRecord(**_with_cuts(row, "output"))
        return steps

    # retention

    @_transient
    async def save_retention(self, policies: Mapping[tuple[str, str], timedelta | None]) -> None:
        rows = [
            {"name": name, "version": version, "seconds": None if retention is None else retention.total_seconds()}
            for (name, version), retention in sorted(policies.items())
        ]
        async with self._connection() as conn:
            await conn.execute(QUERIES["save_retention"], {"policies": json.dumps(rows)})

    @_transient
    async def list_retention(self) -> dict[str, list[timedelta | None]]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["list_retention"])).fetchall()
        return retention_declarations(rows)

    @contextlib.asynccontextmanager
    async def retention_lock(self) -> AsyncIterator[bool]:
        """A session advisory lock on a connection of its own, held until the block ends (closing the
        connection releases it, also when this process dies)."""
        try:
            conn = await self._connect(self.listen_url)  # a session lock: never through a transaction pooler
        except psycopg.Error as error:
            raise BackendUnavailable(f"PostgreSQL unavailable during retention_lock: {error}") from error
        try:
            try:
                row = await (await conn.execute(QUERIES["try_retention_lock"])).fetchone()
            except psycopg.Error as error:
                raise BackendUnavailable(f"PostgreSQL unavailable during retention_lock: {error}") from error
            yield bool(row and row[0])
        finally:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    @_transient
    async def finished_workflows(self) -> list[str]:
        async with self._connection() as conn:
            rows = await (await conn.execute(QUERIES["finished_workflows"])).fetchall()
        return [row[0] for row in rows]

    @_transient
    async def delete_finished_runs(self, selection: FinishedRuns, limit: int) -> int:
        async with self._connection() as conn:
            deleted, _ = await self._one(conn, "delete_finished_runs", {**selection_params(selection), "limit": limit})
        return int(deleted)

    @_transient
    async def count_finished_runs(self, selection: FinishedRuns) -> int:
        async with self._connection() as conn:
            (count,) = await self._one(conn, "count_finished_runs", selection_params(selection))
        return int(count)

    @_transient
    async def unreachable_events_horizon(self, margin: timedelta) -> datetime | None:
        async with self._connection() as conn:
            (horizon,) = await self._one(conn, "unreachable_events_horizon", {"margin": margin})
        return horizon if isinstance(horizon, datetime) else None

    @_transient
    async def delete_events_before(self, horizon: datetime, limit: int) -> int:
        async with self._connection() as conn:
            deleted, _ = await self._one(conn, "delete_events_before", {"horizon": horizon, "limit": limit})
        return int(deleted)

    @_transient
    async def count_events_before(self, horizon: datetime) -> int:
        async with self._connection() as conn:
            (count,) = await self._one(conn, "count_events_before", {"horizon": horizon})
        return int(count)


def _served(workflows: Sequence[tuple[str, str]], queues: Sequence[str]) -> dict[str, list[str]]:
    """What a worker serves, as the claim's queries take it: the queues, and its (workflow, version) streams as
    two arrays of the same length."""
    return {
        "queues": list(queues),
        "names": [name for name, _ in workflows],
        "versions": [version for _, version in workflows],
    }


def _uuid_array(values: Iterable[str]) -> str:
    """UUIDs as one array literal, for a `::uuid[]` parameter. A worker's claim sends the lease tokens it holds:
    psycopg adapting a list of 128 strings added 0.24 ms to each call (a claim of one run takes 0.34 ms); the
    one string, 0.07 ms."""
    return "{" + ",".join(values) + "}"


def _step_fields(step: Checkpoint) -> str:
    return (
        f',"step_name":{json.dumps(step.name)},"step_kind":"{step.kind}","step_output":{step.output_json},'
        f'"started_at":"{step.started_at.isoformat()}","finished_at":"{step.finished_at.isoformat()}"'
    )


def _output_fields(output: str) -> str:
    return f',"completes":true,"output":{output}'


def _awaited(waits: Sequence[TimedWait]) -> tuple[list[str], list[tuple[str, str]]]:
    """The topics and (event, key) pairs a park waits on, sorted (locks are taken in this order)."""
    topics = {str(w.waits_for["topic"]) for w in waits if w.kind == "receive" and w.waits_for}
    events = {(str(w.waits_for["event"]), str(w.waits_for["key"])) for w in waits if w.kind == "event" and w.waits_for}
    return sorted(topics), sorted(events)


WAKE_HORIZON = timedelta(seconds=5)
"""Runs due sooner than this wake the workers: a worker's claim loop otherwise looks again only at its next
poll (worker.PUSHED_POLL_MS, 5 s), and would start a run due in 1 s up to 5 s late. One due later is found in
time by that poll, which reads the next due time."""


# A run_many of at least this many runs goes by COPY (copy_runs) when it can: below it, the INSERT's one round trip
# costs less than the COPY's four (at 500 runs they cost the same: benchmarks/README.md, the tenth session).
COPY_AT_LEAST = 500

# Binary COPY data (PostgreSQL's "COPY ... FORMAT BINARY"): a header, then per row the number of fields and each
# field as its length and its type's binary form (-1: NULL), then a trailer. _copy_data writes it itself rather
# than through psycopg's write_row: the runs of a run_many differ only by id, input and concurrency key, so the
# other eleven fields are encoded once, and a row costs a join instead of a dumper per field.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # the signature, no flags, no header extension
_COPY_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_ROW_START = (14).to_bytes(2, "big") + (16).to_bytes(4, "big")  # 14 fields, the first a uuid (16 bytes)
_POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_COPY_CHUNK = 256  # rows per write: the server starts on the first while the next are prepared


def _copy_data(runs: Sequence[NewRun], now: datetime, queue: str, encoding: str) -> Iterator[bytes]:
    """`runs` (alike: see create_runs in base.py) as copy_runs' data, in chunks of rows. Their start and
    deadline are reckoned from the transaction's time `now` as create_runs reckons them from now() (elapsed
    time: `now` in UTC, where adding a day never meets a daylight-saving change of the session's time zone);
    `queue` is the one looked up when the runs name none. Text goes in the connection's `encoding`, as the
    server reads it (the inputs are JSON escaped to ASCII)."""
    now = now.astimezone(UTC)
    first = runs[0]
    available_at = first.start_at or (now + first.start_delay if first.start_delay is not None else now)
    deadline_at = first.deadline_at or (now + first.deadline_delay if first.deadline_delay is not None else None)
    shared = b"".join(
        _field(value)
        for value in (
            first.workflow_name.encode(encoding),
            first.version.encode(encoding),
            b"pending",
            _timestamp(available_at),
            None if deadline_at is None else _timestamp(deadline_at),
            None if first.parent_id is None else _uuid(first.parent_id),
            None if first.parent_step is None else first.parent_step.encode(encoding),
            b"\x01" if first.detached else b"\x00",
            None if first.trace_context is None else b"\x01" + first.trace_context.encode(encoding),
            queue.encode(encoding),
            first.priority.to_bytes(4, "big", signed=True),
        )
    )
    chunk = [_COPY_HEADER]
    for count, run in enumerate(runs, 1):
        data = run.input_json.encode()
        key = run.concurrency_key
        chunk += (
            _ROW_START,
            _uuid(run.id),
            (len(data) + 1).to_bytes(4, "big"),
            b"\x01",  # jsonb's binary form: a version byte, then the JSON text
            data,
            _NULL if key is None else _field(key.encode(encoding)),
            shared,
        )
        if count % _COPY_CHUNK == 0:
            yield b"".join(chunk)
            chunk = []
    chunk.append(_COPY_TRAILER)
    yield b"".join(chunk)


def _field(value: bytes | None) -> bytes:
    return _NULL if value is None else len(value).to_bytes(4, "big") + value


def _uuid(value: str) -> bytes:
    return bytes.fromhex(value.replace("-", ""))


def _timestamp(moment: datetime) -> bytes:
    """A timestamptz's binary form: microseconds since 2000-01-01 UTC."""
    return ((moment - _POSTGRES_EPOCH) // timedelta(microseconds=1)).to_bytes(8, "big", signed=True)


def _due_names(runs: Sequence[NewRun]) -> list[str]:
    """The workflows of `runs` whose workers must hear of them, sorted."""
    return sorted({run.workflow_name for run in runs if _due_soon(run)})


def _due_soon(run: NewRun) -> bool:
    """Whether a new run is due within WAKE_HORIZON: its workers must hear of it, to claim it now or to set
    their timer to its start time (a claim that finds nothing reads when the next run is due)."""
    if run.debounce is not None:  # due a window after the first call of its key
        return run.debounce < WAKE_HORIZON
    if run.start_delay is not None:
        return run.start_delay < WAKE_HORIZON
    return run.start_at is None or run.start_at < datetime.now(UTC) + WAKE_HORIZON


def _dispatch(payload: str, notifications: Notifications) -> None:
    kind, _, value = payload.partition(":")
    if kind == "a":  # "a:" + workflow, or for one new run (create_run) "a:" + workflow + "\x1f" + its id
        workflow_name, _, run_id = value.partition("\x1f")
        notifications.run_available(workflow_name, run_id or None)
    elif kind == "w":  # a waiting run woken (migration 0017): claimed at once, not after listen_delay
        notifications.run_woken(value)
    elif kind == "f":
        notifications.run_finished(value)
    elif kind == "o":  # completed, with its output (migration 0013): "o:" + id + ":" + output JSON
        run_id, _, output_json = value.partition(":")
        notifications.run_finished(run_id, output_json)
    elif kind == "r":
        notifications.run_requested(value)


def _with_cuts(row: dict[str, Any], *names: str) -> dict[str, Any]:
    """A row of a capped read (get_run_capped, load_steps_capped, list_runs with a value limit) as the record's
    fields: a value cut there becomes a CutValue of its excerpt and length (None: not measured, with a limit
    of 0)."""
    for name in names:
        excerpt, length = row.pop(f"{name}_excerpt", None), row.pop(f"{name}_length", None)
        if excerpt is not None:
            row[name] = CutValue(excerpt, None if length is None else int(length))
    return row


# The fields of NewRun that create_runs takes once for the batch when every run has the same (the scalar
# parameter), else one per run (a JSON array, the parameter of the plural name); with how each goes in JSON.
_SHARED_FIELDS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("workflow_name", "workflow_names", lambda value: value),
    ("version", "versions", lambda value: value),
    ("idempotency_key", "idempotency_keys", lambda value: value),
    ("start_at", "start_ats", lambda moment: moment.isoformat()),
    ("start_delay", "start_delays", lambda duration: duration.total_seconds()),
    ("deadline_at", "deadline_ats", lambda moment: moment.isoformat()),
    ("deadline_delay", "deadline_delays", lambda duration: duration.total_seconds()),
    ("parent_id", "parent_ids", lambda value: value),
    ("parent_step", "parent_steps", lambda value: value),
    ("detached", "detacheds", lambda value: value),
    ("trace_context", "trace_contexts", lambda value: value),  # JSON text, parsed per run
    ("queue", "queues", lambda value: value),
    ("priority", "priorities", lambda value: value),
    ("concurrency_key", "concurrency_keys", lambda value: value),
)


def _runs_params(runs: Sequence[NewRun]) -> dict[str, Any]:
    """The runs as create_runs' parameters: the ids as a uuid[] and the inputs as a JSON array (their JSON text
    already), and each other field once when every run has the same, else as a JSON array, one per run."""
    params: dict[str, Any] = {
        "ids": "{" + ",".join([run.id for run in runs]) + "}",
        "inputs": "[" + ",".join([run.input_json for run in runs]) + "]",
    }
    for field, plural, to_json in _SHARED_FIELDS:
        values = [getattr(run, field) for run in runs]
        if values.count(values[0]) == len(values):
            params[field], params[plural] = _scalar(values[0]), None
        else:
            params[field] = None
            params[plural] = json.dumps([None if value is None else to_json(value) for value in values])
    return params


def _scalar(value: Any) -> Any:
    """A field given once: as psycopg adapts it, but a duration as seconds (as in the JSON arrays)."""
    return value.total_seconds() if isinstance(value, timedelta) else value


def _new_run_params(run: NewRun) -> dict[str, Any]:
    return {
        # create_run NOTIFYs only when told (and given the channel); else Wakeups does it after the commit.
        "notify": False,
        "channel": "",
        "id": run.id,
        "workflow_name": run.workflow_name,
        "version": run.version,
        "input": run.input_json,
        "idempotency_key": run.idempotency_key,
        "start_at": run.start_at,
        "start_delay": run.start_delay,
        "deadline_at": run.deadline_at,
        "deadline_delay": run.deadline_delay,
        "parent_id": run.parent_id,
        "parent_step": run.parent_step,
        "detached": run.detached,
        "trace_context": run.trace_context,
        "queue": run.queue,
        "priority": run.priority,
        "concurrency_key": run.concurrency_key,
        "debounce_key": run.debounce_key,
        "debounce": run.debounce,
    }


def list_params(query: RunQuery) -> dict[str, Any]:
    """list_runs' parameters for `query`."""
    above_id = query.above_id()
    return {
        "workflow": query.workflow,
        "statuses": list(query.statuses) if query.statuses is not None else None,
        "above_id": above_id,
        "created_after": query.created_after,
        "created_before": query.created_before,
        "limit": query.limit,
        "parent_id": query.parent_id,
        "queue": query.queue,
        "version": query.version,
        "value_limit": query.value_limit,
    }


def selection_params(selection: FinishedRuns) -> dict[str, Any]:
    return {
        "older_than": selection.older_than,
        "statuses": list(selection.statuses),
        "workflow": selection_workflow(selection),
    }


def _json_moment(moment: datetime | None) -> str:
    return "null" if moment is None else f'"{moment.isoformat()}"'


def _json_seconds(delay: timedelta | None) -> str:
    return "null" if delay is None else repr(delay.total_seconds())
