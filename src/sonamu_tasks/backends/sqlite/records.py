"""Between SQLite's columns and the backend's records: integer microseconds, JSON text, plain rows."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from ... import serde
from ...limits import READABLE_TIMES
from ...records import CutValue
from ...status import RunStatus, StepStatus
from ..base import ClaimedRun, RunRecord, ScheduleRecord, StepRecord, WorkerRecord

T = TypeVar("T", RunRecord, StepRecord)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_EARLIEST, _LATEST = READABLE_TIMES
_EARLIEST_MICROS = (_EARLIEST - _EPOCH) // _MICROSECOND
_LATEST_MICROS = (_LATEST - _EPOCH) // _MICROSECOND


def micros(moment: datetime | None) -> int | None:
    """A timezone-aware datetime as microseconds since the epoch (exact: no float in between)."""
    return None if moment is None else (moment - _EPOCH) // _MICROSECOND


def duration_micros(duration: timedelta | None) -> int | None:
    return None if duration is None else duration // _MICROSECOND


def moment(value: int) -> datetime:
    """A stored time as a datetime. One out of datetime's range (stored before run() refused such times)
    reads as the nearest end of `limits.READABLE_TIMES`: one bad row must not fail every listing."""
    if _EARLIEST_MICROS <= value <= _LATEST_MICROS:
        return _EPOCH + timedelta(microseconds=value)
    return _EARLIEST if value < _EARLIEST_MICROS else _LATEST


def optional_moment(value: int | None) -> datetime | None:
    return None if value is None else moment(value)


def decoded(text: str | None) -> Any:
    """A stored JSON column: NULL (never written) reads as None, as JSON null does; values as PostgreSQL's
    jsonb reads them back (serde.loads), so the two backends give the same dict for the same row."""
    return serde.loads(text)


def pairs(items: Iterable[tuple[str, str]]) -> str:
    """(a, b) pairs as the JSON array of arrays the queries unpack with json_each."""
    return json.dumps([list(item) for item in items])


def claimed_run(
    row: sqlite3.Row,
    *,
    claimed_at: int,
    first_claim: bool,
    taken_from: str | None = None,
    lease_expired_at: int | None = None,
) -> ClaimedRun:
    return ClaimedRun(
        id=row["id"],
        workflow_name=row["workflow_name"],
        version=row["version"],
        input=decoded(row["input"]),
        attempts=row["attempts"],
        recoveries=row["recoveries"],
        lease_token=row["lease_token"],
        claimed_at=moment(claimed_at),
        first_claim=first_claim,
        deadline_at=optional_moment(row["deadline_at"]),
        requested_action=row["requested_action"],
        trace_context=decoded(row["trace_context"]),
        taken_from=taken_from,
        lease_expired_at=optional_moment(lease_expired_at),
    )


def run_record(row: sqlite3.Row, steps: Sequence[StepRecord]) -> RunRecord:
    return RunRecord(
        id=row["id"],
        workflow_name=row["workflow_name"],
        version=row["version"],
        status=RunStatus(row["status"]),
        input=decoded(row["input"]),
        output=decoded(row["output"]),
        error=decoded(row["error"]),
        attempts=row["attempts"],
        recoveries=row["recoveries"],
        available_at=moment(row["available_at"]),
        worker_id=row["worker_id"],
        idempotency_key=row["idempotency_key"],
        deadline_at=optional_moment(row["deadline_at"]),
        created_at=moment(row["created_at"]),
        started_at=optional_moment(row["started_at"]),
        finished_at=optional_moment(row["finished_at"]),
        updated_at=moment(row["updated_at"]),
        steps=tuple(steps),
        requested_action=row["requested_action"],
        parent_id=row["parent_id"],
        parent_step=row["parent_step"],
        detached=bool(row["detached"]),
        forked_from=row["forked_from"],
        forked_step=row["forked_step"],
        queue=row["queue"],
        priority=row["priority"],
        concurrency_key=row["concurrency_key"],
    )


def step_record(row: sqlite3.Row) -> StepRecord:
    return StepRecord(
        name=row["name"],
        kind=row["kind"],
        status=StepStatus(row["status"]),
        output=decoded(row["output"]),
        error=decoded(row["error"]),
        attempts=row["attempts"],
        wake_at=optional_moment(row["wake_at"]),
        started_at=optional_moment(row["started_at"]),
        finished_at=optional_moment(row["finished_at"]),
        waits_for=decoded(row["waits_for"]),
    )


def schedule_record(row: sqlite3.Row) -> ScheduleRecord:
    return ScheduleRecord(
        name=row["name"],
        workflow_name=row["workflow_name"],
        version=row["version"],
        expression=row["expression"],
        timezone=row["timezone"],
        input=decoded(row["input"]),
        next_fire_at=moment(row["next_fire_at"]),
        last_fire_at=optional_moment(row["last_fire_at"]),
        last_run_id=row["last_run_id"],
    )


def worker_record(row: sqlite3.Row) -> WorkerRecord:
    return WorkerRecord(
        id=row["id"],
        host=row["host"],
        pid=row["pid"],
        workflows=[(name, version) for name, version in decoded(row["workflows"])],
        concurrency=row["concurrency"],
        started_at=moment(row["started_at"]),
        heartbeat_at=moment(row["heartbeat_at"]),
        queues=None if row["queues"] is None else decoded(row["queues"]),
        running=row["running"],
    )


def with_cut_values(record: T, row: sqlite3.Row, *names: str) -> T:
    """`record` with the values a capped read (get_run_capped, load_steps_capped, list_runs with a value limit)
    cut, as CutValues."""
    keys = row.keys()
    cuts: dict[str, Any] = {
        name: CutValue(row[f"{name}_excerpt"], None if row[f"{name}_length"] is None else int(row[f"{name}_length"]))
        for name in names
        if f"{name}_excerpt" in keys and row[f"{name}_excerpt"] is not None
    }
    return dataclasses.replace(record, **cuts) if cuts else record
