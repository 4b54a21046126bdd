"""SqliteBackend: the Backend protocol on one SQLite file, shared by the worker processes of one machine.

Every method is one transaction on the backend's own thread (see `database.py`). Fencing needs no row
locks: a write transaction holds the file's only write lock from its first read, so checking the lease
token and writing cannot be split by a take-over. SQLite cannot push events to other processes, so
`pushes_notifications` is False: workers poll (`poll_interval_ms`) and wake each other within a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.request import pathname2url

from ...errors import ConfigError
from ...queue import DEFAULT_QUEUE, Queue
from ...status import RunStatus
from ..base import (
    CANCELED_ERROR,
    FOREVER,
    Checkpoint,
    ChildOutcome,
    ClaimedRun,
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
    ScheduleDeletion,
    ScheduleRecord,
    StepRecord,
    TimedWait,
    WorkerRecord,
    retention_declarations,
    selection_workflow,
)
from ..group_commit import GroupCommit
from ..sql_files import backend_queries, check_applied, newer_than_code, package_migrations
from . import records
from .database import Database
from .records import duration_micros, micros, pairs

logger = logging.getLogger("sonamu_tasks.sqlite")

_PACKAGE = __name__.rpartition(".")[0]
QUERIES = backend_queries(_PACKAGE, psycopg=False)
MIGRATIONS = package_migrations(_PACKAGE)

# Long enough to queue behind any healthy writer (transactions take milliseconds); past it the call
# raises BackendUnavailable and the engine retries it with backoff.
DEFAULT_BUSY_TIMEOUT_S = 10.0

# How often a queue's claims look for parked runs whose key has a free slot (sweep_parked_keys in queries.sql):
# PostgreSQL's claim_runs uses the same cadence.
KEY_SWEEP_EVERY_US = 5_000_000

# The error a worker's write stores when it meets a stored cancel request (retry_run, park_run, release_runs).
_CANCELED = json.dumps(CANCELED_ERROR)


class SqliteBackend:
    pushes_notifications = False

    def __init__(
        self,
        path: str,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """`clock`: the time every transaction runs at (default: this machine's); a test clock makes durable
        sleeps, timeouts, retry delays and deadlines follow it."""
        self.path = path if path == ":memory:" else os.path.abspath(path)
        if clock is None:
            self._db = Database(self.path, busy_timeout_s=busy_timeout_s)
        else:
            self._db = Database(self.path, busy_timeout_s=busy_timeout_s, clock=lambda: micros(clock()) or 0)
        # Checkpoints and completions of concurrent runs share one write transaction and one fsync.
        self._fenced_writes: GroupCommit[list[tuple[str, dict[str, Any]]], bool] = GroupCommit(
            self._write_fenced, in_flight=1
        )

    @classmethod
    def from_url(cls, url: str) -> SqliteBackend:
        """`sqlite:///relative/path.db` (from the working directory) or `sqlite:////absolute/path.db`."""
        path = url.removeprefix("sqlite:///")
        if path == url or not path or "?" in path:
            raise ConfigError(
                f"database_url {url!r} is not a SQLite URL: write sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (no host, no query)"
            )
        return cls(path)

    # lifecycle

    async def open(self) -> None:
        """Nothing to do yet: the connection opens at the first call, so a busy file is retried like any call."""
        self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def migrate(self) -> list[str]:
        # Every process migrates as it starts (not a read-only one): the write lock only when there is something
        # to apply, so a start does not wait for a busy writer (nor make one wait).
        done = await self._db.read(_recorded)
        if done is not None:
            if (newer := newer_than_code(done, MIGRATIONS)) is not None:
                logger.warning("%s: %s", self.path, newer)
            if all(name in done for name, _ in MIGRATIONS):
                return []

        def apply(conn: sqlite3.Connection, now: int) -> list[str]:
            # Under BEGIN IMMEDIATE: every other process migrating at once waits, then finds it done.
            conn.execute(QUERIES["create_migrations_table"])
            done = {row["name"] for row in conn.execute(QUERIES["applied_migrations"])}
            applied = []
            for name, text in MIGRATIONS:
                if name not in done:
                    for statement in _statements(text):
                        conn.execute(statement)
                    conn.execute(QUERIES["record_migration"], {"name": name, "now": now})
                    applied.append(name)
            return applied

        applied = await self._db.migrate(apply)
        for name in applied:
            logger.info("applied migration %s to %s", name, self.path)
        return applied

    async def check_schema(self) -> None:
        # A file that is not there stays so: connecting would create it. One that is there is read through a
        # read-only connection of its own: the backend's own sets WAL mode, which would change another tool's
        # file (or make a database of an empty one) before the check said it was not ours.
        if self.path == ":memory:":
            applied = await self._db.read(_recorded)
        elif os.path.exists(self.path):
            applied = await asyncio.to_thread(_recorded_read_only, self.path)
        else:
            applied = None
        if (newer := check_applied(f"SQLite database {self.path}", applied, MIGRATIONS)) is not None:
            logger.warning("%s: %s", self.path, newer)

    async def listen(self, notifications: Notifications) -> None:
        """Nothing to listen to: other processes are found by polling. Waits until cancelled."""
        await asyncio.Event().wait()

    # runs

    async def create_run(self, run: NewRun) -> tuple[str, bool]:
        def insert(conn: sqlite3.Connection, now: int) -> tuple[str, bool]:
            params = {**_new_run_params(run), "now": now}
            row = _first(conn, "create_run", params)
            if row is not None:
                return row["id"], True
            # The same transaction holds the write lock: the colliding run cannot vanish in between.
            return _collided(run, _first(conn, "find_run_by_key", params))

        return await self._db.write(insert)

    async def create_runs(self, runs: Sequence[NewRun], *, alike: bool = False) -> list[tuple[str, bool]]:
        runs = list(runs)  # prepared here (a RunBatch prepares as it is read), not in the database's thread

        def insert(conn: sqlite3.Connection, now: int) -> list[tuple[str, bool]]:
            results = []
            for run in runs:
                params = {**_new_run_params(run), "now": now}
                row = _first(conn, "create_run", params)
                if row is not None:
                    results.append((str(row["id"]), True))
                else:
                    results.append(_collided(run, _first(conn, "find_run_by_key", params)))
            return results

        return await self._db.write(insert)

    async def create_debounced_run(self, run: NewRun) -> tuple[str, bool]:
        def insert(conn: sqlite3.Connection, now: int) -> tuple[str, bool]:
            row = _first(conn, "create_debounced_run", {**_new_run_params(run), "now": now})
            if row is None:  # its own id: an earlier attempt of this call inserted it, and the answer was lost
                return run.id, True
            return str(row["id"]), bool(row["created"])

        return await self._db.write(insert)

    async def create_claimed_run(
        self, run: NewRun, worker_id: str, lease: timedelta
    ) -> tuple[str, bool, ClaimedRun | None]:
        def insert(conn: sqlite3.Connection, now: int) -> tuple[str, bool, ClaimedRun | None]:
            params = {
                **_new_run_params(run),
                "now": now,
                "worker_id": worker_id,
                "lease": duration_micros(lease),
                "lease_token": str(uuid.uuid4()),
            }
            placed = _first(conn, "queue_limited", params)
            assert placed is not None
            params["queue"] = placed["queue"]
            if placed["limited"]:  # only the claim may weigh it against the queue's limits
                row = _first(conn, "create_run", params)
                claimed = None
            else:
                row = _first(conn, "create_claimed_run", params)
                claimed = None if row is None else records.claimed_run(row, claimed_at=now, first_claim=True)
            if row is not None:
                return row["id"], True, claimed
            return (*_collided(run, _first(conn, "find_run_by_key", params)), None)

        return await self._db.write(insert)

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
        streams = pairs(workflows)
        held_tokens = _tokens(held)

        def claim(conn: sqlite3.Connection, now: int) -> list[ClaimedRun]:
            # One writer at a time: the counts below and the runs taken cannot interleave with another claim.
            claimed: list[ClaimedRun] = []
            for queue in queues:
                cap = limit - len(claimed)
                if cap <= 0:
                    break
                limits = _first(conn, "queue_limits", {"queue": queue})
                budget: int | None = None
                per_key: int | None = None
                if limits is not None:
                    if limits["concurrency"] is not None:
                        cap = min(cap, limits["concurrency"] - _count_executing(conn, queue, now, held_tokens))
                    if limits["worker_concurrency"] is not None:
                        cap = min(
                            cap,
                            limits["worker_concurrency"] - _count_executing(conn, queue, now, held_tokens, worker_id),
                        )
                    if limits["rate_limit"] is not None:
                        window = {"queue": queue, "now": now, "period": limits["rate_period"]}
                        conn.execute(QUERIES["forget_old_starts"], window)
                        budget = limits["rate_limit"] - conn.execute(QUERIES["count_starts"], window).fetchone()[0]
                    per_key = limits["per_key_concurrency"]
                    if per_key is not None and not now - KEY_SWEEP_EVERY_US < limits["swept_at"] <= now:
                        # The trigger brings a parked run back only when a run of its key leaves 'running': every
                        # few seconds, one claim also brings back the oldest parked run of each key with a free
                        # slot (freed by an expired lease, or handed to a parked run no live worker serves). A
                        # swept_at ahead of the clock (set back since) does not hold the sweep off either.
                        conn.execute(QUERIES["mark_queue_swept"], {"queue": queue, "now": now})
                        sweep = {"queue": queue, "now": now, "per_key": per_key, "held_tokens": held_tokens}
                        conn.execute(QUERIES["sweep_parked_keys"], sweep)
                level = -(2**31) - 1
                while cap > 0:
                    found = conn.execute(
                        QUERIES["next_level"], {"queue": queue, "after": level, "workflows": streams}
                    ).fetchone()
                    if found is None or found[0] is None:
                        break
                    level = found[0]
                    while cap > 0:
                        due = conn.execute(
                            QUERIES["due_runs"],
                            {
                                "queue": queue,
                                "level": level,
                                "now": now,
                                "workflows": streams,
                                "limit": cap,
                                "held_tokens": held_tokens,
                            },
                        ).fetchall()
                        parked = False
                        for run in due:
                            if cap <= 0:
                                break
                            if run["starting"] and budget is not None and budget <= 0:
                                continue
                            key = run["concurrency_key"]
                            key_full = (
                                per_key is not None
                                and key is not None
                                and _count_executing(conn, queue, now, held_tokens, key=key) >= per_key
                            )
                            if key_full:
                                conn.execute(QUERIES["park_on_key"], {"id": run["id"]})
                                parked = True
                                continue
                            params = {
                                "id": run["id"],
                                "lease_token": str(uuid.uuid4()),
                                "worker_id": worker_id,
                                "lease": duration_micros(lease),
                                "lease_expired": run["lease_expired"],
                                "now": now,
                            }
                            row = _first(conn, "claim_run", params)
                            if row is None:
                                continue
                            taken_over = bool(run["lease_expired"])
                            claimed.append(
                                records.claimed_run(
                                    row,
                                    claimed_at=now,
                                    first_claim=bool(run["first_claim"]),
                                    taken_from=run["worker_id"] if taken_over else None,
                                    lease_expired_at=run["available_at"] if taken_over else None,
                                )
                            )
                            cap -= 1
                            if run["starting"] and budget is not None:
                                budget -= 1
                                conn.execute(QUERIES["record_start"], {"queue": queue, "now": now})
                        if not parked:  # nothing left the level: another look would find the same runs
                            break
            return claimed

        return await self._db.write(claim)

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
            "id": run_id,
            "worker_id": worker_id,
            "workflows": pairs(workflows),
            "queues": json.dumps(list(queues)),
            "lease": duration_micros(lease),
            "lease_token": str(uuid.uuid4()),
            "lease_expired": 0,
        }

        def take(conn: sqlite3.Connection, now: int) -> ClaimedRun | None:
            # One writer at a time: the run cannot change between the look and the lease.
            takeable = _first(conn, "takeable_run", {**params, "now": now})
            if takeable is None:
                return None
            row = _first(conn, "claim_run", {**params, "now": now})
            assert row is not None  # just read, in this transaction
            return records.claimed_run(row, claimed_at=now, first_claim=bool(takeable["first_claim"]))

        return await self._db.write(take)

    async def seconds_until_due(
        self,
        workflows: Sequence[tuple[str, str]],
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        held: Sequence[tuple[str, str]] = (),
    ) -> float | None:
        if not workflows or not queues:
            return None
        streams = pairs(workflows)
        held_tokens = _tokens(held)

        def next_due(conn: sqlite3.Connection, now: int) -> float | None:
            earliest: int | None = None
            for queue in queues:
                params = {"queue": queue, "workflows": streams, "held_tokens": held_tokens}
                row = conn.execute(QUERIES["next_due_at"], params).fetchone()
                if row["available_at"] is None:
                    continue
                due = int(row["available_at"])
                limits = _first(conn, "queue_limits", {"queue": queue})
                if limits is not None and limits["rate_limit"] is not None:
                    window = {
                        "queue": queue,
                        "now": now,
                        "period": limits["rate_period"],
                        "rate_limit": limits["rate_limit"],
                    }
                    room = conn.execute(QUERIES["rate_window_room_at"], window).fetchone()
                    if room is not None:
                        due = max(due, int(room["room_at"]))
                earliest = due if earliest is None else min(earliest, due)
            return None if earliest is None else (earliest - now) / 1_000_000

        return await self._db.read(next_due)

    async def register_queues(self, queues: Sequence[Queue], workflow_queues: Sequence[tuple[str, str, str]]) -> None:
        def save(conn: sqlite3.Connection, now: int) -> None:
            for queue in queues:
                before = _first(conn, "queue_limits", {"queue": queue.name})
                conn.execute(QUERIES["save_queue"], {"name": queue.name, **_stored_limits(queue), "now": now})
                if before is not None and before["per_key_concurrency"] != queue.per_key_concurrency:
                    conn.execute(QUERIES["unpark_queue"], {"name": queue.name})
            for name, version, queue_name in workflow_queues:
                params = {"name": name, "version": version, "queue": queue_name}
                conn.execute(QUERIES["move_workflow_runs"], params)
                conn.execute(QUERIES["save_workflow_queue"], params)

        def unchanged(conn: sqlite3.Connection, now: int) -> bool:
            for queue in queues:
                row = _first(conn, "queue_limits", {"queue": queue.name})
                limits = _stored_limits(queue)
                if row is None or any(row[column] != value for column, value in limits.items()):
                    return False
            for name, version, queue_name in workflow_queues:
                row = _first(conn, "workflow_queue", {"name": name, "version": version})
                if row is None or row["queue"] != queue_name:
                    return False
            return True

        # Every process stores its queues as it starts: the write lock (and move_workflow_runs, which reads
        # every run of a workflow whose queue changed) only when something did change.
        if not await self._db.read(unchanged):
            await self._db.write(save)

    async def queue_stats(self) -> list[QueueStats]:
        def stats(conn: sqlite3.Connection, now: int) -> list[QueueStats]:
            rows = conn.execute(QUERIES["queue_stats"], {"now": now}).fetchall()
            return [
                QueueStats(
                    name=row["name"],
                    concurrency=row["concurrency"],
                    worker_concurrency=row["worker_concurrency"],
                    rate_limit_starts=row["rate_limit"],
                    rate_limit_window=None
                    if row["rate_period"] is None
                    else timedelta(microseconds=row["rate_period"]),
                    per_key_concurrency=row["per_key_concurrency"],
                    running=row["running"],
                    due=row["due"],
                    oldest_due_seconds=None if row["oldest"] is None else (now - row["oldest"]) / 1_000_000,
                    starts_in_window=row["starts"],
                    parked_on_key=row["parked"],
                )
                for row in rows
            ]

        return await self._db.read(stats)

    async def heartbeat(
        self, worker_id: str, held: Sequence[tuple[str, str]], lease: timedelta
    ) -> dict[str, str | None]:
        def extend(conn: sqlite3.Connection, now: int) -> dict[str, str | None]:
            conn.execute(QUERIES["touch_worker"], {"worker_id": worker_id, "now": now})
            if not held:
                return {}
            params = {"held": pairs(held), "lease": duration_micros(lease), "now": now}
            rows = conn.execute(QUERIES["heartbeat_runs"], params).fetchall()
            return {row["lease_token"]: row["requested_action"] for row in rows}

        return await self._db.write(extend)

    async def release_runs(self, held: Sequence[tuple[str, str]]) -> None:
        if not held:
            return
        params = {"held": pairs(held), "canceled_error": _CANCELED}
        await self._db.write(lambda conn, now: conn.execute(QUERIES["release_runs"], {**params, "now": now}))

    async def run_versions(self, run_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        def read(conn: sqlite3.Connection, now: int) -> dict[str, tuple[str, str]]:
            rows = conn.execute(QUERIES["run_versions"], {"ids": json.dumps(list(run_ids))}).fetchall()
            return {str(row["id"]): (row["workflow_name"], row["version"]) for row in rows}

        return await self._db.read(read)

    async def get_run(
        self, run_id: str, *, with_steps: bool = False, value_limit: int | None = None
    ) -> RunRecord | None:
        def read(conn: sqlite3.Connection, now: int) -> RunRecord | None:
            query = QUERIES["get_run" if value_limit is None else "get_run_capped"]
            row = conn.execute(query, {"run_id": run_id, "limit": value_limit}).fetchone()
            if row is None:
                return None
            steps = _load_steps(conn, run_id, value_limit) if with_steps else {}
            record = records.run_record(row, list(steps.values()))
            return records.with_cut_values(record, row, "input", "output")

        return await self._db.read(read)

    async def watch_run(self, run_id: str) -> bool:
        """Nothing to ask for: SQLite sends no notifications, waiters re-read."""
        return False

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        above_id = query.above_id()
        params = {
            "workflow": query.workflow,
            "statuses": None if query.statuses is None else json.dumps(list(query.statuses)),
            # Canonical text, as the ids are stored: then text order is the UUIDs' order.
            "above_id": None if above_id is None else str(uuid.UUID(above_id)),
            "created_after": micros(query.created_after),
            "created_before": micros(query.created_before),
            "limit": query.limit,
            "parent_id": None if query.parent_id is None else str(uuid.UUID(query.parent_id)),
            "version": query.version,
            "queue": query.queue,
            "value_limit": query.value_limit,
        }

        def read(conn: sqlite3.Connection, now: int) -> list[RunRecord]:
            return [
                records.with_cut_values(records.run_record(row, ()), row, "input", "output")
                for row in conn.execute(QUERIES["list_runs"], params)
            ]

        return await self._db.read(read)

    # fenced writes of a claimed run

    async def load_steps(self, run_id: str) -> dict[str, StepRecord]:
        return await self._db.read(lambda conn, now: _load_steps(conn, run_id))

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
        params = _checkpoint_params(run_id, lease_token, Checkpoint(name, output_json, started_at, finished_at, kind))
        if not await self._fenced_writes.submit([("save_step", params)]):
            raise LeaseLost(run_id)

    async def park_run(
        self, run_id: str, lease_token: str, waits: Sequence[TimedWait], children: Sequence[str]
    ) -> tuple[RunStatus, datetime]:
        def park(conn: sqlite3.Connection, now: int) -> tuple[RunStatus, int] | None:
            owned = _first(conn, "lock_parking_run", {"run_id": run_id, "lease_token": lease_token})
            if owned is None:
                return None
            wakes = {wait.name: _wake_micros(wait, now) for wait in waits}
            topics = [w.waits_for["topic"] for w in waits if w.kind == "receive" and w.waits_for]
            events = [w.waits_for for w in waits if w.kind == "event" and w.waits_for]
            ready = bool(topics) and bool(
                _first(conn, "messages_waiting", {"run_id": run_id, "topics": json.dumps(topics)})["waiting"]  # type: ignore[index]
            )
            for wanted in events:
                since = {"event": wanted["event"], "key": wanted["key"], "since": owned["created_at"]}
                ready = ready or _first(conn, "event_emitted", since) is not None
            if children:
                finished = conn.execute(QUERIES["children_finished"], {"children": json.dumps(list(children))})
                ready = ready or bool(finished.fetchall())
            if ready:
                status, due = "pending", now
            else:
                status = "waiting" if children or any(wait.kind != "sleep" for wait in waits) else "sleeping"
                due = min((wake for wake in wakes.values() if wake is not None), default=_FOREVER_US)
                if owned["deadline_at"] is not None:  # due by its deadline at the latest: claimed then, it fails
                    due = min(due, owned["deadline_at"])
            params = {
                "run_id": run_id,
                "lease_token": lease_token,
                "status": status,
                "available_at": due,
                "canceled_error": _CANCELED,
                "now": now,
            }
            parked = _first(conn, "park_run", params)
            if parked is None:
                return None
            status, due = parked["status"], parked["available_at"]
            for wait in waits:
                record = {
                    "run_id": run_id,
                    "name": wait.name,
                    "kind": wait.kind,
                    "status": "sleeping" if wait.kind == "sleep" else "waiting",
                    "wake_at": wakes[wait.name],
                    "started_at": micros(wait.started_at),
                    "waits_for": None if wait.waits_for is None else json.dumps(wait.waits_for),
                }
                conn.execute(QUERIES["record_wait"], record)
            if status == "waiting":  # not when ready, nor canceled or paused by a request met here
                for wanted in events:
                    subscription = {"run_id": run_id, "event": wanted["event"], "key": wanted["key"]}
                    conn.execute(QUERIES["subscribe_event"], subscription)
            return RunStatus(status), due

        parked = await self._db.write(park)
        if parked is None:
            raise LeaseLost(run_id)
        return parked[0], records.moment(parked[1])

    async def take_message(
        self, run_id: str, lease_token: str, name: str, topic: str, started_at: datetime
    ) -> tuple[bool, Any]:
        waits_for = json.dumps({"topic": topic})

        def take(conn: sqlite3.Connection, now: int) -> tuple[bool, Any] | None:
            if _first(conn, "lock_parking_run", {"run_id": run_id, "lease_token": lease_token}) is None:
                return None
            done = _first(conn, "completed_step", {"run_id": run_id, "name": name})
            if done is not None:  # made again after a lost answer: what the first one took
                return True, records.decoded(done["output"])
            message = _first(conn, "oldest_message", {"run_id": run_id, "topic": topic})
            if message is None:
                return False, None
            conn.execute(QUERIES["consume_message"], {"id": message["id"], "name": name, "now": now})
            step = {"run_id": run_id, "name": name, "kind": "receive", "output": message["payload"]}
            conn.execute(
                QUERIES["complete_wait_step"],
                {**step, "started_at": micros(started_at), "now": now, "waits_for": waits_for},
            )
            return True, records.decoded(message["payload"])

        return self._fenced_result(run_id, await self._db.write(take))

    async def take_event(
        self, run_id: str, lease_token: str, name: str, event: str, key: str, started_at: datetime
    ) -> tuple[bool, Any]:
        waits_for = json.dumps({"event": event, "key": key})

        def take(conn: sqlite3.Connection, now: int) -> tuple[bool, Any] | None:
            owned = _first(conn, "lock_parking_run", {"run_id": run_id, "lease_token": lease_token})
            if owned is None:
                return None
            found = _first(conn, "event_emitted", {"event": event, "key": key, "since": owned["created_at"]})
            if found is None:
                return False, None
            step = {"run_id": run_id, "name": name, "kind": "event", "output": found["payload"]}
            conn.execute(
                QUERIES["complete_wait_step"],
                {**step, "started_at": micros(started_at), "now": now, "waits_for": waits_for},
            )
            conn.execute(QUERIES["unsubscribe_event"], {"run_id": run_id, "event": event, "key": key})
            return True, records.decoded(found["payload"])

        return self._fenced_result(run_id, await self._db.write(take))

    async def complete_wait(
        self, run_id: str, lease_token: str, name: str, kind: str, started_at: datetime, waits_for: dict[str, Any]
    ) -> None:
        def complete(conn: sqlite3.Connection, now: int) -> bool:
            if _first(conn, "lock_parking_run", {"run_id": run_id, "lease_token": lease_token}) is None:
                return False
            step = {"run_id": run_id, "name": name, "kind": kind, "output": "null", "waits_for": json.dumps(waits_for)}
            conn.execute(QUERIES["complete_wait_step"], {**step, "started_at": micros(started_at), "now": now})
            if kind == "event":
                unsubscribe = {"run_id": run_id, "event": waits_for["event"], "key": waits_for["key"]}
                conn.execute(QUERIES["unsubscribe_event"], unsubscribe)
            return True

        if not await self._db.write(complete):
            raise LeaseLost(run_id)

    async def set_run_event(self, run_id: str, lease_token: str, name: str, key: str, value_json: str) -> None:
        def publish(conn: sqlite3.Connection, now: int) -> bool:
            if _first(conn, "lock_parking_run", {"run_id": run_id, "lease_token": lease_token}) is None:
                return False
            params = {"run_id": run_id, "name": name, "key": key, "value": value_json, "now": now}
            conn.execute(QUERIES["publish_run_event"], params)
            conn.execute(QUERIES["record_set_event"], params)
            return True

        if not await self._db.write(publish):
            raise LeaseLost(run_id)

    async def get_run_event(self, run_id: str, key: str) -> tuple[RunStatus | None, bool, Any]:
        def read(conn: sqlite3.Connection, now: int) -> tuple[RunStatus | None, bool, Any]:
            row = _first(conn, "get_run_event", {"run_id": run_id, "key": key})
            if row is None:
                return None, False, None
            return RunStatus(row["status"]), bool(row["found"]), records.decoded(row["value"])

        return await self._db.read(read)

    async def list_run_events(self, run_id: str) -> list[RunEventRecord]:
        def read(conn: sqlite3.Connection, now: int) -> list[RunEventRecord]:
            rows = conn.execute(QUERIES["list_run_events"], {"run_id": run_id}).fetchall()
            return [
                RunEventRecord(r["key"], records.decoded(r["value"]), records.moment(r["updated_at"])) for r in rows
            ]

        return await self._db.read(read)

    async def list_messages(self, run_id: str, limit: int) -> list[MessageRecord]:
        def read(conn: sqlite3.Connection, now: int) -> list[MessageRecord]:
            rows = conn.execute(QUERIES["list_messages"], {"run_id": run_id, "limit": limit}).fetchall()
            return [
                MessageRecord(
                    r["id"],
                    r["topic"],
                    records.decoded(r["payload"]),
                    r["idempotency_key"],
                    records.moment(r["created_at"]),
                )
                for r in rows
            ]

        return await self._db.read(read)

    async def send_message(
        self, run_id: str, topic: str, payload_json: str, idempotency_key: str | None
    ) -> MessageSent:
        def send(conn: sqlite3.Connection, now: int) -> MessageSent:
            params = {"run_id": run_id, "topic": topic, "payload": payload_json, "idempotency_key": idempotency_key}
            if _first(conn, "wake_for_message", {"run_id": run_id, "now": now}) is None:
                if _first(conn, "run_status", {"run_id": run_id}) is None:
                    return "no_run"
                return "repeated" if _first(conn, "stored_message", params) is not None else "completed"
            return "stored" if _first(conn, "store_message", {**params, "now": now}) is not None else "repeated"

        return await self._db.write(send)

    async def emit_event(self, name: str, key: str, payload_json: str) -> int:
        def emit(conn: sqlite3.Connection, now: int) -> int:
            params = {"event": name, "key": key, "payload": payload_json, "now": now}
            conn.execute(QUERIES["store_event"], params)
            woken = conn.execute(QUERIES["wake_subscribers"], params).fetchall()
            conn.execute(QUERIES["drop_subscribers"], params)
            return len(woken)

        return await self._db.write(emit)

    @staticmethod
    def _fenced_result(run_id: str, result: tuple[bool, Any] | None) -> tuple[bool, Any]:
        if result is None:
            raise LeaseLost(run_id)
        return result

    async def start_children(
        self,
        run_id: str,
        lease_token: str,
        step_name: str,
        started_at: datetime,
        output_json: str,
        children: Sequence[NewRun],
    ) -> None:
        def start(conn: sqlite3.Connection, now: int) -> bool:
            if _first(conn, "owns_run", {"run_id": run_id, "lease_token": lease_token}) is None:
                return False
            for child in children:
                conn.execute(QUERIES["create_run"], {**_new_run_params(child), "now": now}).fetchall()
            step = {"run_id": run_id, "name": step_name, "output": output_json, "started_at": micros(started_at)}
            conn.execute(QUERIES["record_child_step"], {**step, "now": now})
            return True

        if not await self._db.write(start):
            raise LeaseLost(run_id)

    async def fork_run(self, source_id: str, from_step: str, run: NewRun, step_names: Sequence[str]) -> None:
        def fork(conn: sqlite3.Connection, now: int) -> None:
            conn.execute(QUERIES["create_run"], {**_new_run_params(run), "now": now}).fetchall()
            params = {
                "new_id": run.id,
                "source_id": source_id,
                "names": json.dumps(list(step_names)),
                "from_step": from_step,
            }
            conn.execute(QUERIES["fork_steps"], params)
            conn.execute(QUERIES["mark_forked"], params)

        await self._db.write(fork)

    async def unfinished_by_version(self) -> list[tuple[str, str, RunStatus, int, datetime]]:
        def read(conn: sqlite3.Connection, now: int) -> list[tuple[str, str, RunStatus, int, datetime]]:
            rows = conn.execute(QUERIES["unfinished_by_version"]).fetchall()
            return [
                (r["workflow_name"], r["version"], RunStatus(r["status"]), int(r["n"]), records.moment(r["oldest"]))
                for r in rows
            ]

        return await self._db.read(read)

    async def due_backlog(self) -> list[tuple[str, str, str, int, float]]:
        def read(conn: sqlite3.Connection, now: int) -> list[tuple[str, str, str, int, float]]:
            rows = conn.execute(QUERIES["due_backlog"], {"now": now}).fetchall()
            return [(r["queue"], r["workflow_name"], r["version"], int(r["n"]), float(r["oldest"])) for r in rows]

        return await self._db.read(read)

    async def count_children(self, run_id: str) -> dict[RunStatus, int]:
        def read(conn: sqlite3.Connection, now: int) -> dict[RunStatus, int]:
            rows = conn.execute(QUERIES["count_children"], {"run_id": run_id}).fetchall()
            return {RunStatus(row["status"]): int(row["n"]) for row in rows}

        return await self._db.read(read)

    async def load_children(self, run_id: str) -> dict[str, ChildOutcome]:
        def read(conn: sqlite3.Connection, now: int) -> dict[str, ChildOutcome]:
            rows = conn.execute(QUERIES["load_children"], {"run_id": run_id}).fetchall()
            return {
                row["id"]: ChildOutcome(
                    row["id"], RunStatus(row["status"]), records.decoded(row["output"]), records.decoded(row["error"])
                )
                for row in rows
            }

        return await self._db.read(read)

    async def complete_sleep(self, run_id: str, lease_token: str, name: str) -> None:
        await self._fenced("complete_sleep", {"run_id": run_id, "lease_token": lease_token, "name": name})

    async def complete_run(
        self, run_id: str, lease_token: str, output_json: str, last_steps: Sequence[Checkpoint] = ()
    ) -> None:
        writes = [("save_step", _checkpoint_params(run_id, lease_token, step)) for step in last_steps]
        writes.append(("complete_run", {"run_id": run_id, "lease_token": lease_token, "output": output_json}))
        if not await self._fenced_writes.submit(writes):
            raise LeaseLost(run_id)

    async def fail_attempt(
        self,
        run_id: str,
        lease_token: str,
        error: dict[str, Any],
        step: tuple[str, datetime] | None,
        retry_delay: timedelta | None,
    ) -> RunStatus:
        error_json = json.dumps(error)
        delay = duration_micros(retry_delay)
        params = {
            "run_id": run_id,
            "lease_token": lease_token,
            "error": error_json,
            "delay": delay,
            "canceled_error": _CANCELED,
        }
        query = "fail_run" if retry_delay is None else "retry_run"

        def record(conn: sqlite3.Connection, now: int) -> RunStatus | None:
            row = _first(conn, query, {**params, "now": now})
            if row is None:
                return None
            if step is not None:
                step_params = {**params, "name": step[0], "started_at": micros(step[1]), "now": now}
                conn.execute(QUERIES["record_step_failure"], step_params)
            return RunStatus(row["status"])

        status = await self._db.write(record)
        if status is None:
            raise LeaseLost(run_id)
        return status

    async def fail_overdue_runs(self, limit: int) -> list[OverdueRun]:
        # A read first: the look runs every second in every worker, and finding nothing must not take the file's
        # write lock (which every claim and checkpoint of every process on this file waits for).
        if await self._db.read(lambda conn, now: _first(conn, "overdue_run", {"now": now})) is None:
            return []

        def fail(conn: sqlite3.Connection, now: int) -> list[OverdueRun]:
            rows = conn.execute(QUERIES["fail_overdue_runs"], {"now": now, "limit": limit}).fetchall()
            # A keyed run failed may have held its key's turn: the key's next run must not wait for the sweep.
            for queue in sorted({row["queue"] for row in rows if row["concurrency_key"] is not None}):
                conn.execute(QUERIES["unpark_queue"], {"name": queue})
            return [OverdueRun(row["id"], row["workflow_name"], row["version"], row["parent_id"]) for row in rows]

        return await self._db.write(fail)

    # workers

    async def register_worker(self, worker: WorkerRecord) -> None:
        params = {
            "id": worker.id,
            "host": worker.host,
            "pid": worker.pid,
            "workflows": pairs(worker.workflows),
            "concurrency": worker.concurrency,
            "queues": json.dumps(worker.queues),
        }
        await self._db.write(lambda conn, now: conn.execute(QUERIES["register_worker"], {**params, "now": now}))

    async def list_workers(self) -> list[WorkerRecord]:
        def read(conn: sqlite3.Connection, now: int) -> list[WorkerRecord]:
            return [records.worker_record(row) for row in conn.execute(QUERIES["list_workers"])]

        return await self._db.read(read)

    # steering runs from outside

    async def cancel_run(self, run_id: str, error: dict[str, Any]) -> RunStatus | None:
        return await self._steer("cancel_run", {"run_id": run_id, "error": json.dumps(error)})

    async def pause_run(self, run_id: str) -> RunStatus | None:
        return await self._steer("pause_run", {"run_id": run_id})

    async def resume_run(self, run_id: str) -> RunStatus | None:
        return await self._steer("resume_run", {"run_id": run_id})

    async def restart_run(self, run_id: str) -> RunStatus | None:
        params = {"run_id": run_id}

        def restart(conn: sqlite3.Connection, now: int) -> RunStatus | None:
            children = conn.execute(QUERIES["restart_children"], {**params, "now": now}).fetchall()
            row = _first(conn, "restart_run", {**params, "now": now})
            if row is None:
                row = _first(conn, "run_status", params)
            else:
                for restarted in [run_id, *(child["id"] for child in children if child["status"] == "pending")]:
                    conn.execute(QUERIES["restart_steps"], {"run_id": restarted})
            return None if row is None else RunStatus(row["status"])

        return await self._db.write(restart)

    async def settle_request(self, run_id: str, lease_token: str, error: dict[str, Any]) -> RunStatus:
        params = {"run_id": run_id, "lease_token": lease_token, "error": json.dumps(error)}
        row = await self._db.write(lambda conn, now: _first(conn, "settle_request", {**params, "now": now}))
        if row is None:
            raise LeaseLost(run_id)
        return RunStatus(row["status"])

    async def _steer(self, query: str, params: dict[str, Any]) -> RunStatus | None:
        """Apply a steering update; when it does not apply, report the status the run has."""

        def steer(conn: sqlite3.Connection, now: int) -> RunStatus | None:
            row = _first(conn, query, {**params, "now": now}) or _first(conn, "run_status", params)
            return None if row is None else RunStatus(row["status"])

        return await self._db.write(steer)

    async def remove_worker(self, worker_id: str) -> None:
        await self._db.write(lambda conn, now: conn.execute(QUERIES["remove_worker"], {"worker_id": worker_id}))

    # schedules

    async def sync_schedules(self, schedules: Sequence[ScheduleRecord], workflows: Sequence[str]) -> None:
        def sync(conn: sqlite3.Connection, now: int) -> None:
            for schedule in schedules:
                params = {
                    "name": schedule.name,
                    "workflow_name": schedule.workflow_name,
                    "version": schedule.version,
                    "expression": schedule.expression,
                    "timezone": schedule.timezone,
                    "input": json.dumps(schedule.input),
                    "next_fire_at": micros(schedule.next_fire_at),
                    "now": now,
                }
                conn.execute(QUERIES["upsert_schedule"], params)
            stale = {"workflows": json.dumps(list(workflows)), "keep": json.dumps([s.name for s in schedules])}
            conn.execute(QUERIES["delete_stale_schedules"], stale)

        await self._db.write(sync)

    async def list_schedules(self) -> list[ScheduleRecord]:
        def read(conn: sqlite3.Connection, now: int) -> list[ScheduleRecord]:
            return [records.schedule_record(row) for row in conn.execute(QUERIES["list_schedules"])]

        return await self._db.read(read)

    async def delete_schedule(self, name: str, workflow_name: str, stale_after: float) -> ScheduleDeletion:
        def delete(conn: sqlite3.Connection, now: int) -> ScheduleDeletion:
            params = {"name": name, "workflow_name": workflow_name, "now": now}
            live = conn.execute(
                QUERIES["live_worker_of"], {**params, "stale_after_us": round(stale_after * 1_000_000)}
            ).fetchone()[0]
            if live:
                return "in_use"
            return "deleted" if conn.execute(QUERIES["delete_schedule"], params).rowcount > 0 else "missing"

        return await self._db.write(delete)

    async def fire_schedule(
        self, name: str, expected: datetime, fire_at: datetime, next_fire_at: datetime, run: NewRun | None
    ) -> bool:
        params = {
            "name": name,
            "expected": micros(expected),
            "fire_at": micros(fire_at),
            "next_fire_at": micros(next_fire_at),
            "run_id": run.id if run else None,
            "version": run.version if run else None,
        }

        def fire(conn: sqlite3.Connection, now: int) -> bool:
            if _first(conn, "advance_schedule", {**params, "now": now}) is None:
                return False
            if run is not None:
                # The run's idempotency key (schedule and fire time) is the second, unique guard.
                conn.execute(QUERIES["create_run"], {**_new_run_params(run), "now": now}).fetchall()
            return True

        return await self._db.write(fire)

    # helpers

    async def _write_fenced(self, batch: list[list[tuple[str, dict[str, Any]]]]) -> list[bool]:
        """Several runs' fenced writes in one transaction; for each, whether its claim still held. The
        writes of one run go in order (a last checkpoint, then the completion) and stop at the first fenced."""

        def write(conn: sqlite3.Connection, now: int) -> list[bool]:
            return [
                all(_first(conn, query, {**params, "now": now}) is not None for query, params in writes)
                for writes in batch
            ]

        return await self._db.write(write)

    async def _fenced(self, query: str, params: dict[str, Any]) -> None:
        """One write that touches the run only while `params["lease_token"]` still owns it."""
        if await self._db.write(lambda conn, now: _first(conn, query, {**params, "now": now})) is None:
            raise LeaseLost(str(params["run_id"]))

    # retention

    async def save_retention(self, policies: Mapping[tuple[str, str], timedelta | None]) -> None:
        rows = [
            {"name": name, "version": version, "seconds": None if retention is None else retention.total_seconds()}
            for (name, version), retention in sorted(policies.items())
        ]
        params = {"policies": json.dumps(rows)}
        await self._db.write(lambda conn, now: conn.execute(QUERIES["save_retention"], {**params, "now": now}))

    async def list_retention(self) -> dict[str, list[timedelta | None]]:
        def read(conn: sqlite3.Connection, now: int) -> dict[str, list[timedelta | None]]:
            return retention_declarations(conn.execute(QUERIES["list_retention"]).fetchall())

        return await self._db.read(read)

    @contextlib.asynccontextmanager
    async def retention_lock(self) -> AsyncIterator[bool]:
        """Always granted: the file's single write lock already serializes the deleting batches."""
        yield True

    async def finished_workflows(self) -> list[str]:
        def read(conn: sqlite3.Connection, now: int) -> list[str]:
            return [row["name"] for row in conn.execute(QUERIES["finished_workflows"])]

        return await self._db.read(read)

    async def delete_finished_runs(self, selection: FinishedRuns, limit: int) -> int:
        params = {**_selection_params(selection), "limit": limit}

        def delete(conn: sqlite3.Connection, now: int) -> int:
            return len(conn.execute(QUERIES["delete_finished_runs"], {**params, "now": now}).fetchall())

        return await self._db.write(delete)

    async def count_finished_runs(self, selection: FinishedRuns) -> int:
        params = _selection_params(selection)

        def count(conn: sqlite3.Connection, now: int) -> int:
            return int(conn.execute(QUERIES["count_finished_runs"], {**params, "now": now}).fetchone()["n"])

        return await self._db.read(count)

    async def unreachable_events_horizon(self, margin: timedelta) -> datetime | None:
        params = {"margin": margin // timedelta(microseconds=1)}

        def read(conn: sqlite3.Connection, now: int) -> datetime | None:
            horizon = conn.execute(QUERIES["unreachable_events_horizon"], {**params, "now": now}).fetchone()["horizon"]
            return None if horizon is None else records.moment(horizon)

        return await self._db.read(read)

    async def delete_events_before(self, horizon: datetime, limit: int) -> int:
        params = {"horizon": records.micros(horizon), "limit": limit}
        return await self._db.write(lambda conn, now: conn.execute(QUERIES["delete_events_before"], params).rowcount)

    async def count_events_before(self, horizon: datetime) -> int:
        params = {"horizon": records.micros(horizon)}

        def count(conn: sqlite3.Connection, now: int) -> int:
            return int(conn.execute(QUERIES["count_events_before"], params).fetchone()["n"])

        return await self._db.read(count)


_FOREVER_US = (FOREVER - records.moment(0)) // timedelta(microseconds=1)


def _wake_micros(wait: TimedWait, now: int) -> int | None:
    """A timed wait's wake time: recorded before, or `now` plus its duration (None: no timeout)."""
    if wait.wake_at is not None:
        return (wait.wake_at - records.moment(0)) // timedelta(microseconds=1)
    if wait.duration is None:
        return None
    return now + wait.duration // timedelta(microseconds=1)


def _checkpoint_params(run_id: str, lease_token: str, step: Checkpoint) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "lease_token": lease_token,
        "name": step.name,
        "kind": step.kind,
        "output": step.output_json,
        "started_at": micros(step.started_at),
        "finished_at": micros(step.finished_at),
    }


def _stored_limits(queue: Queue) -> dict[str, int | None]:
    """A queue's limits as the `queues` table holds them (save_queue's parameters, queue_limits' columns)."""
    rate = queue.rate
    return {
        "concurrency": queue.concurrency,
        "worker_concurrency": queue.worker_concurrency,
        "rate_limit": rate[0] if rate else None,
        "rate_period": duration_micros(rate[1]) if rate else None,
        "per_key_concurrency": queue.per_key_concurrency,
    }


def _collided(run: NewRun, existing: sqlite3.Row | None) -> tuple[str, bool]:
    """(id, created) of a run whose insert collided with `existing`. Its own id means an earlier attempt of the
    same call committed it and lost the answer: still this call's creation, not a run found by its key."""
    if existing is None:
        return run.id, False
    return str(existing["id"]), existing["id"] == run.id


def _first(conn: sqlite3.Connection, query: str, params: dict[str, Any]) -> sqlite3.Row | None:
    # fetchall, not fetchone: a RETURNING statement is finished only once all its rows are read.
    rows = conn.execute(QUERIES[query], params).fetchall()
    return rows[0] if rows else None


def _load_steps(conn: sqlite3.Connection, run_id: str, value_limit: int | None = None) -> dict[str, StepRecord]:
    query = QUERIES["load_steps" if value_limit is None else "load_steps_capped"]
    rows = conn.execute(query, {"run_id": run_id, "limit": value_limit}).fetchall()
    return {row["name"]: records.with_cut_values(records.step_record(row), row, "output") for row in rows}


def _recorded_read_only(path: str) -> set[str] | None:
    """What `_recorded` reads, through a connection that can change nothing (no pragma, mode=ro)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{pathname2url(path)}?mode=ro", uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            return _recorded(conn, 0)
    except sqlite3.DatabaseError as error:  # "file is not a database", a file it may not read
        raise ConfigError(f"{path} is not a SQLite database this process can read ({error})") from error


def _recorded(conn: sqlite3.Connection, now: int) -> set[str] | None:
    """The migrations the file records; None for a file without a migrations table (a new one)."""
    if _first(conn, "migrations_table", {}) is None:
        return None
    return {row["name"] for row in conn.execute(QUERIES["applied_migrations"])}


def _statements(script: str) -> list[str]:
    """A migration script as single statements, so that they run inside the caller's transaction
    (sqlite3's executescript would commit it first)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if any(line.strip() and not line.lstrip().startswith("--") for line in pending.splitlines()):
        raise ValueError(f"a migration statement does not end with ';': {pending.strip()[:200]!r}")
    return statements


def _new_run_params(run: NewRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "workflow_name": run.workflow_name,
        "version": run.version,
        "input": run.input_json,
        "idempotency_key": run.idempotency_key,
        "start_at": micros(run.start_at),
        "start_delay": duration_micros(run.start_delay),
        "deadline_at": micros(run.deadline_at),
        "deadline_delay": duration_micros(run.deadline_delay),
        "parent_id": run.parent_id,
        "parent_step": run.parent_step,
        "detached": run.detached,
        "trace_context": run.trace_context,
        "queue": run.queue,
        "priority": run.priority,
        "concurrency_key": run.concurrency_key,
        "debounce_key": run.debounce_key,
        "debounce": duration_micros(run.debounce),
    }


def _selection_params(selection: FinishedRuns) -> dict[str, Any]:
    return {
        "older_than": duration_micros(selection.older_than),
        "statuses": json.dumps(list(selection.statuses)),
        "workflow": selection_workflow(selection),
    }


def _count_executing(
    conn: sqlite3.Connection,
    queue: str,
    now: int,
    held_tokens: str,
    worker_id: str | None = None,
    *,
    key: str | None = None,
) -> int:
    params = {"queue": queue, "now": now, "held_tokens": held_tokens, "worker_id": worker_id, "key": key}
    return int(conn.execute(QUERIES["count_executing"], params).fetchone()[0])


def _tokens(held: Sequence[tuple[str, str]]) -> str:
    """The lease tokens of (run id, lease token) pairs, as the JSON array the claim's queries read."""
    return json.dumps([token for _, token in held])
