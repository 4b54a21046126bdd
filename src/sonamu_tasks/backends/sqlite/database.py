"""One SQLite connection on one thread of its own, and the transactions run on it.

sqlite3 blocks, and a connection belongs to the thread that opened it: every call of a backend goes to
its single thread (`loop.run_in_executor`), so the event loop never waits on the file and the
connection never changes threads. Many processes share the file through WAL (readers never block the
writer) and BEGIN IMMEDIATE (a write transaction takes the file's write lock before it reads, so two
writers queue on the busy timeout instead of failing when one of them tries to upgrade a stale read).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ...errors import BackendClosed, BackendUnavailable, ConfigError

T = TypeVar("T")

Work = Callable[[sqlite3.Connection, int], T]
"""A transaction's body: the connection and the transaction's one clock reading (see `now_us`)."""

# SQLite 3.35 brought RETURNING, which every fenced write uses to learn whether it touched its run.
MINIMUM_VERSION = (3, 35, 0)

# Failures after which the same call can simply be made again: another process holds the write lock
# past the busy timeout, or the disk is briefly full or failing. Anything else is a bug or a bad path.
WAL_SIZE_LIMIT = 16 * 1024 * 1024
"""Bytes the WAL file is truncated to after a checkpoint that empties it."""

_TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_FULL}
_RECONNECT = {sqlite3.SQLITE_IOERR}


def now_us() -> int:
    """Microseconds since the Unix epoch. Every process sharing the file runs on this machine's clock."""
    return time.time_ns() // 1000


class Database:
    def __init__(self, path: str, *, busy_timeout_s: float, clock: Callable[[], int] = now_us) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._clock = clock  # microseconds since the epoch; a test clock in `testing.WorkflowTestEnv`
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None  # touched only on the executor's thread
        self._closed = False  # by close(), until open(): a call meanwhile is refused, not served by a new thread

    async def read(self, work: Work[T]) -> T:
        """Run `work` in one read transaction (one consistent snapshot)."""
        return await self._submit(lambda: self._transaction("BEGIN", work))

    async def write(self, work: Work[T]) -> T:
        """Run `work` in one write transaction, committed when it returns, rolled back when it raises."""
        return await self._submit(lambda: self._transaction("BEGIN IMMEDIATE", work))

    async def migrate(self, work: Work[T]) -> T:
        """Like `write`, with foreign keys off, as SQLite's table rebuilds need (dropping the old table must
        not cascade); they are checked before the commit."""

        def migrate() -> T:
            connection = self._connect()
            connection.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set it before
            try:

                def checked(conn: sqlite3.Connection, now: int) -> T:
                    result = work(conn, now)
                    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise sqlite3.IntegrityError(f"migration left {len(broken)} broken foreign keys")
                    return result

                return self._transaction("BEGIN IMMEDIATE", checked)
            finally:
                connection.execute("PRAGMA foreign_keys = ON")

        return await self._submit(migrate)

    def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # RuntimeError: the interpreter is shutting down (a close from an atexit handler) and thread pools take
        # no more work. Every transaction was committed or rolled back already; the process's exit closes the file.
        with contextlib.suppress(RuntimeError):
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        executor.shutdown(wait=True)

    # on the executor's thread

    def _transaction(self, begin: str, work: Work[T]) -> T:
        connection = self._connect()
        try:
            connection.execute(begin)
            # Read after BEGIN IMMEDIATE has the lock: clock readings follow the order of the writes.
            result = work(connection, self._clock())
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            raise
        return result

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        if sqlite3.sqlite_version_info < MINIMUM_VERSION:
            raise ConfigError(
                f"the SQLite backend needs SQLite {'.'.join(map(str, MINIMUM_VERSION))} or newer; this Python "
                f"has {sqlite3.sqlite_version}: upgrade Python, or use a PostgreSQL database_url"
            )
        # isolation_level=None: no implicit transactions; every one is begun and ended here explicitly.
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            # WAL lets readers work while one process writes; it is a property of the file, set once.
            connection.execute("PRAGMA journal_mode = WAL")
            # The WAL file keeps its largest size after a checkpoint unless told otherwise: a burst of writes
            # under steady readers would leave it tens of MB for good.
            connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            # FULL: a commit is on disk when it returns, so a power cut cannot lose a checkpoint either.
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")  # steps go with their run
            # A canceled run's trigger cancels its children, whose own trigger cancels theirs.
            connection.execute("PRAGMA recursive_triggers = ON")
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    # on the event loop

    async def _submit(self, call: Callable[[], T]) -> T:
        if self._closed:
            raise BackendClosed(f"SQLite database {self.path}: the manager was stopped")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sonamu-sqlite")
        executor = self._executor
        try:
            running = asyncio.get_running_loop().run_in_executor(executor, call)
        except RuntimeError as error:
            # The interpreter is exiting (a thread still calling after the main one ended) and thread pools
            # take no more work: nothing was done, and no later call could be.
            raise BackendClosed(f"SQLite database {self.path}: Python is shutting down ({error})") from error
        with self._translated_errors():
            return await running

    @contextlib.contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as error:
            code = error.sqlite_errorcode & 0xFF  # the primary code of an extended one
            if code in _RECONNECT and self._executor is not None:
                self._executor.submit(self._disconnect)  # queued: the next call opens a fresh connection
            if code in _TRANSIENT | _RECONNECT:
                raise BackendUnavailable(f"SQLite database {self.path} is busy or failing: {error}") from error
            if code == sqlite3.SQLITE_CANTOPEN:
                raise ConfigError(
                    f"cannot open the SQLite database {self.path} ({error}): does its directory exist and "
                    "is it writable?"
                ) from error
            if code == sqlite3.SQLITE_READONLY:
                raise ConfigError(
                    f"the SQLite database {self.path} is read-only ({error}): every process using it writes "
                    "(claims, leases, migrations), so it and its directory must be writable"
                ) from error
            raise
