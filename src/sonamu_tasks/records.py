"""The records sonamu-tasks hands out: a run, its steps, a worker, a schedule. Plain, frozen data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .status import RunStatus, StepStatus


@dataclass(frozen=True)
class StepRecord:
    name: str
    kind: str
    status: StepStatus
    output: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    wake_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    waits_for: dict[str, Any] | None = None
    """What a receive or event wait waits for: {"topic": ...} or {"event": ..., "key": ...}."""


@dataclass(frozen=True)
class CutValue:
    """A stored JSON value longer than a capped read wanted (`manager.get_run(..., value_limit=N)`, what the
    dashboard's run page reads; `list_runs(value_limit=N)`): the first N characters of its JSON text, and the
    whole text's length. The value itself was left in the database."""

    excerpt: str
    length: int | None
    """None after a read with `value_limit=0` (a list that shows no value): the value was not even measured."""


@dataclass(frozen=True)
class RunRecord:
    id: str
    workflow_name: str
    version: str
    status: RunStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    attempts: int
    recoveries: int
    available_at: datetime
    worker_id: str | None
    idempotency_key: str | None
    deadline_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    steps: tuple[StepRecord, ...] = field(default=())
    requested_action: str | None = None
    parent_id: str | None = None
    """The run that started this one as a child (None for a top-level run)."""
    parent_step: str | None = None
    detached: bool = False
    forked_from: str | None = None
    """The run this one was forked from (`manager.fork`), and the step it was forked at."""
    forked_step: str | None = None
    queue: str = "default"
    priority: int = 0
    concurrency_key: str | None = None


STALE_AFTER = 60.0
"""Seconds since its last heartbeat after which a worker counts as gone: it no longer serves its versions
(`runs --stranded`) or its queues (their worker counts). Workers heartbeat at least every 20 s."""


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    host: str
    pid: int
    workflows: list[tuple[str, str]]
    concurrency: int
    started_at: datetime
    heartbeat_at: datetime
    queues: list[str] | None = None
    """The queues it claims from; None for a worker of an older release, which did not record them."""
    running: int = 0
    """Runs it executes now: its slots in use, of `concurrency`."""

    def live(self, now: datetime, stale_after: float = STALE_AFTER) -> bool:
        """Whether it heartbeat in the last `stale_after` seconds (else it counts as gone)."""
        return (now - self.heartbeat_at).total_seconds() <= stale_after


def served_workflows(workers: Sequence[WorkerRecord], now: datetime, stale_after: float = STALE_AFTER) -> set[str]:
    """The workflow names some live worker registers: a stored schedule of any other workflow is fired by no
    one (its workflow left the code, or its fleet is down)."""
    return {name for worker in workers if worker.live(now, stale_after) for name, _ in worker.workflows}


@dataclass(frozen=True)
class ScheduleRecord:
    """A stored schedule: what the last worker to synchronize declared. Any worker whose code declares a
    schedule of this name for this workflow fires it, with its own version of the workflow."""

    name: str
    workflow_name: str
    version: str
    """The version its last fire ran; before the first, the version of the worker that stored it."""
    expression: str
    timezone: str
    input: Any
    next_fire_at: datetime
    last_fire_at: datetime | None = None
    last_run_id: str | None = None


@dataclass(frozen=True)
class MessageRecord:
    """A message sent to a run and not consumed yet."""

    id: int
    topic: str
    payload: Any
    idempotency_key: str | None
    created_at: datetime


@dataclass(frozen=True)
class RunEventRecord:
    """A value a run published with `step.set_event` (the latest one for its key)."""

    key: str
    value: Any
    updated_at: datetime


@dataclass(frozen=True)
class QueueStats:
    """A queue as the claim sees it now (`manager.queue_stats()`, `sonamu-tasks queues`)."""

    name: str
    concurrency: int | None
    worker_concurrency: int | None
    rate_limit_starts: int | None
    rate_limit_window: timedelta | None
    """`rate_limit` as starts per window ("100/1s": 100 and one second)."""
    per_key_concurrency: int | None
    running: int
    """Runs of the queue executing now (live lease)."""
    due: int
    """Runs due and not claimed (including runs parked behind a full concurrency key)."""
    oldest_due_seconds: float | None
    """How long the oldest due run has waited."""
    starts_in_window: int | None
    """Starts in the last rate window (rate-limited queues only)."""
    parked_on_key: int
    """Due runs set aside until their concurrency key has a free slot."""
    workers: int | None = None
    """Live workers that claim from it (heartbeat in the last minute; `manager.queue_stats()` fills it in): 0
    with runs due means nothing will run them. None when unknown: a live worker of an older release did not
    record its queues."""
