"""The one seam between the engine and storage.

Every method is one transaction with one meaning. Writes made on behalf of a claimed run carry its
`lease_token` and touch nothing (raising LeaseLost) once another worker has taken the run over: that is
the fencing every backend must provide. Transient failures (connection lost, server restarting) raise
BackendUnavailable; every method is safe to call again after one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from ..ids import first_id_at
from ..queue import Queue
from ..records import CutValue as CutValue
from ..records import MessageRecord as MessageRecord
from ..records import QueueStats as QueueStats
from ..records import RunEventRecord as RunEventRecord

# The records are public types of their own module; re-exported here for the backends.
from ..records import RunRecord as RunRecord
from ..records import ScheduleRecord as ScheduleRecord
from ..records import StepRecord as StepRecord
from ..records import WorkerRecord as WorkerRecord
from ..status import RunStatus


class LeaseLost(BaseException):
    """The run was taken over by another worker (or canceled): this worker must stop touching it.

    A BaseException so that a workflow's `except Exception` cannot swallow it.
    """


@dataclass(frozen=True)
class ClaimedRun:
    id: str
    workflow_name: str
    version: str
    input: Any
    attempts: int
    recoveries: int
    lease_token: str
    claimed_at: datetime
    first_claim: bool
    deadline_at: datetime | None
    requested_action: str | None = None
    """"cancel" or "pause" asked for while it was running (its previous worker died before honouring it)."""
    trace_context: dict[str, str] | None = None
    """The trace context of the caller of run() (W3C traceparent), for the attempt's span."""
    taken_from: str | None = None
    """The worker id the run was leased to, when this claim took it over (its lease had expired): the claim's
    own worker id when an earlier attempt of this worker left it. None when the claim did not take it over."""
    lease_expired_at: datetime | None = None
    """When that lease ran out: set exactly when the claim took the run over (and counted a recovery)."""

    @property
    def taken_over(self) -> bool:
        return self.lease_expired_at is not None


@dataclass(frozen=True)
class Checkpoint:
    """A step's result, to be stored."""

    name: str
    output_json: str
    started_at: datetime
    finished_at: datetime
    kind: str = "call"
    """"call", or "child" for the outcome of a child run the parent saw."""


RunWrite = tuple[str, str, tuple[Checkpoint, ...], str | None]
"""A group-commit item: (run id, lease token, checkpoints, output JSON when the run completes with them)."""

FOREVER = datetime(2999, 12, 31, tzinfo=UTC)

MessageSent = Literal["stored", "repeated", "no_run", "completed"]
"""What became of a message sent (`Backend.send_message`)."""
"""available_at of a run that waits with no timeout: only the event it waits for makes it due."""

CANCELED_ERROR = {"type": "Canceled", "message": "canceled on request"}
"""The error of a run canceled on request: stored by a cancel, and by a worker's write that meets a stored
cancel request (a step boundary, a retry, a park, a hand-back)."""


@dataclass(frozen=True)
class TimedWait:
    """A durable wait a run parks on that has a time: a sleep (`kind` "sleep"), a receive ("receive") or an
    event wait ("event"), new (`duration`, None: no timeout) or recorded before (`wake_at`)."""

    name: str
    kind: str
    started_at: datetime
    duration: timedelta | None = None
    wake_at: datetime | None = None
    waits_for: dict[str, Any] | None = None
    """What a receive or event wait waits for: {"topic": ...} or {"event": ..., "key": ...}."""


@dataclass(frozen=True)
class ChildOutcome:
    """A child run as its parent's waits see it."""

    id: str
    status: RunStatus
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class OverdueRun:
    """A pending run failed because its deadline passed (`Backend.fail_overdue_runs`)."""

    id: str
    workflow_name: str
    version: str
    parent_id: str | None


@dataclass(slots=True)  # not frozen: a run_many makes thousands, and a frozen one takes 8x longer to make
class NewRun:
    id: str
    workflow_name: str
    version: str
    input_json: str
    idempotency_key: str | None = None
    start_at: datetime | None = None
    start_delay: timedelta | None = None
    deadline_at: datetime | None = None
    deadline_delay: timedelta | None = None
    parent_id: str | None = None
    parent_step: str | None = None
    """The parent's step that started this child (its id is derived from the two)."""
    detached: bool = False
    """A detached child is not canceled with its parent."""
    trace_context: str | None = None
    """The caller's trace context as JSON ({"traceparent": ...}), when tracing is on."""
    queue: str | None = None
    """The queue; None: the queue its workflow registered (`workflow_queues`), else "default"."""
    priority: int = 0
    """Lower runs first within the queue."""
    concurrency_key: str | None = None
    debounce_key: str | None = None
    """With `debounce`: a pending, unstarted run of the workflow with this key takes this input instead."""
    debounce: timedelta | None = None
    """How long after the first run() of the key the collapsed run starts."""


@dataclass(frozen=True)
class RunQuery:
    workflow: str | None = None
    statuses: tuple[str, ...] | None = None
    before_id: str | None = None
    """Keyset cursor: only runs older than this id."""
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int = 50
    parent_id: str | None = None
    """Only the children of this run."""
    version: str | None = None
    queue: str | None = None
    value_limit: int | None = None
    """Inputs and outputs whose JSON text is longer come as CutValues, as `get_run`'s `value_limit` cuts them."""

    def above_id(self) -> str | None:
        """An id every listed run's is below, from the cursor and `created_before`: a bound on the id lets the
        newest-first scan start where the times do, where a filter on created_at alone read every newer run
        first. A run's id carries the time its client made it (ids.py), its created_at the database's clock at
        the insert, so the bound is widened by ID_CLOCK_MARGIN and created_at stays the filter. A child's id is
        its parent's time (derived from the parent's id), earlier than its creation, so it is below the bound
        too. There is no such bound for `created_after`: a child created today may have an id of last year."""
        above = None
        if self.created_before is not None and self.created_before < datetime.max.replace(tzinfo=UTC) - ID_CLOCK_MARGIN:
            above = first_id_at(self.created_before + ID_CLOCK_MARGIN)  # (no bound near the end of time: "any")
        if self.before_id is not None:
            before = self.before_id.lower()
            above = before if above is None else min(above, before)
        return above


ID_CLOCK_MARGIN = timedelta(hours=1)
"""How far a run's id time may be after its created_at and the run still be listed by `created_before`: the
clock of the client that made the id against the database's."""


class Notifications(Protocol):
    """What a backend tells the engine as it happens (PostgreSQL LISTEN/NOTIFY)."""

    def run_available(self, workflow_name: str, run_id: str | None = None) -> None:
        """A run of this workflow became claimable (a new one, or one handed back, retried or resumed);
        `run_id` when the notification stands for that one new run alone."""
        ...

    def run_woken(self, workflow_name: str) -> None:
        """A waiting run of this workflow was made due now (by a message, an event, its child's end)."""
        ...

    def run_finished(self, run_id: str, output_json: str | None = None) -> None:
        """The run finished; `output_json` is its output when it completed and the notification carried it."""
        ...

    def run_requested(self, run_id: str) -> None:
        """A cancel or pause was asked for this running run."""
        ...

    def reconnected(self) -> None: ...


ScheduleDeletion = Literal["deleted", "in_use", "missing"]
"""What delete_schedule did: deleted it; kept it (a live worker registers its workflow); found no such schedule."""


class ScheduleStore(Protocol):
    """Storage of cron schedules: the part of Backend the scheduler needs."""

    async def sync_schedules(self, schedules: Sequence[ScheduleRecord], workflows: Sequence[str]) -> None:
        """Upsert `schedules`; delete the other schedules of `workflows` (removed from the code)."""
        ...

    async def list_schedules(self) -> list[ScheduleRecord]: ...

    async def delete_schedule(self, name: str, workflow_name: str, stale_after: float) -> ScheduleDeletion:
        """Delete stored schedule `name` if it is `workflow_name`'s and no worker that heartbeated within
        `stale_after` seconds (by the database's clock) registers that workflow."""
        ...

    async def fire_schedule(
        self, name: str, expected: datetime, fire_at: datetime, next_fire_at: datetime, run: NewRun | None
    ) -> bool:
        """Advance the schedule from `expected` and start `run`, in one transaction (the schedule's version
        becomes the run's); False if another worker fired it first, or holds it now (it is firing it: PostgreSQL
        skips a locked row rather than wait), and nothing is written then."""
        ...


class Backend(ScheduleStore, Protocol):
    pushes_notifications: bool
    """True when `listen` delivers events from other processes; otherwise waiters poll."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def migrate(self) -> list[str]:
        """Apply pending migrations (safe with many processes at once); return the names applied."""
        ...

    async def check_schema(self) -> None:
        """Check, creating and changing nothing, that the schema holds every migration of this release (the start
        of a read-only manager): ConfigError when it has none (never migrated) or lacks some, naming them; a
        schema with migrations this release does not know is logged as a warning, as `migrate` does."""
        ...

    async def listen(self, notifications: Notifications) -> None:
        """Deliver events until cancelled, reconnecting by itself."""
        ...

    # runs
    async def create_run(self, run: NewRun) -> tuple[str, bool]:
        """Insert a pending run; for a repeated idempotency key return the existing id and False."""
        ...

    async def create_runs(self, runs: Sequence[NewRun], *, alike: bool = False) -> list[tuple[str, bool]]:
        """Insert pending runs in one transaction; per run, in order: (its id, True), or for a repeated
        idempotency key (the existing run's id, False). `alike`: the caller vouches that every run is the
        first but for its id, input and concurrency key, and that none has an idempotency key or a debounce (a
        run_many without keys), so the backend need not read them all to know. Reading a run of `runs` may raise (a
        RunBatch prepares its runs as they are read): then nothing is stored."""
        ...

    async def create_debounced_run(self, run: NewRun) -> tuple[str, bool]:
        """Insert a pending run due after `run.debounce`, or give a pending, unstarted run of the workflow with
        the same `debounce_key` this input: (its id, True when inserted)."""
        ...

    async def create_claimed_run(
        self, run: NewRun, worker_id: str, lease: timedelta
    ) -> tuple[str, bool, ClaimedRun | None]:
        """Insert a run already claimed by `worker_id`, so the process that starts it runs it at once (no
        notification, no claim round trip): (id, True, the claim). A run of a queue with limits is inserted
        pending instead, for the claim to weigh: (id, True, None). For a repeated id or idempotency key:
        (existing id, False, None)."""
        ...

    async def claim_runs(
        self,
        worker_id: str,
        workflows: Sequence[tuple[str, str]],
        limit: int,
        lease: timedelta,
        queues: Sequence[str] = ("default",),
        held: Sequence[tuple[str, str]] = (),
    ) -> list[ClaimedRun]:
        """Take up to `limit` due runs of `workflows` from `queues` (served in that order), within every limit
        of those queues. `held`: the (run id, lease token) pairs of the attempts alive in the claiming worker;
        a running run under one of those tokens is never taken, even with its lease expired (a late heartbeat),
        while a run a dead attempt of the same worker left behind is."""
        ...

    async def take_run(
        self,
        worker_id: str,
        run_id: str,
        workflows: Sequence[tuple[str, str]],
        lease: timedelta,
        queues: Sequence[str] = ("default",),
    ) -> ClaimedRun | None:
        """Take run `run_id` if it is pending and due now, of one of `workflows` in one of `queues`, and its
        queue has no limits: what the notification of one new run lets a worker with a free slot do in one
        statement, instead of a claim. None otherwise (another worker took it, or only a claim may weigh it)."""
        ...

    async def seconds_until_due(
        self,
        workflows: Sequence[tuple[str, str]],
        queues: Sequence[str] = ("default",),
        held: Sequence[tuple[str, str]] = (),
    ) -> float | None:
        """Seconds until a claim of these workflows and queues could take a run (<= 0: now), None if none.
        A queue whose rate window is full counts from when the window has room. The runs `held` (as in
        `claim_runs`) are not due."""
        ...

    async def register_queues(self, queues: Sequence[Queue], workflow_queues: Sequence[tuple[str, str, str]]) -> None:
        """Store the queues' limits (a changed one holds at the next claim of every worker) and the queue of
        each (workflow, version)."""
        ...

    async def queue_stats(self) -> list[QueueStats]:
        """Every queue with runs or limits: its limits, runs executing, due backlog, age, recent starts."""
        ...

    async def heartbeat(
        self, worker_id: str, held: Sequence[tuple[str, str]], lease: timedelta
    ) -> dict[str, str | None]:
        """Extend the leases of (run id, lease token) pairs; return the tokens still held, each with the
        action ("cancel", "pause") requested for its run, if any."""
        ...

    async def release_runs(self, held: Sequence[tuple[str, str]]) -> None:
        """Give runs back as pending, claimable at once (graceful shutdown); a run with a cancel or pause
        request stored is canceled or paused instead."""
        ...

    async def run_versions(self, run_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """(workflow name, version) of each of `run_ids` that is stored, by id."""
        ...

    async def get_run(
        self, run_id: str, *, with_steps: bool = False, value_limit: int | None = None
    ) -> RunRecord | None:
        """The run (and its steps); with `value_limit`, inputs and outputs whose JSON text is longer come as
        CutValues (an excerpt of that many characters and the length), read without the value itself."""
        ...

    async def watch_run(self, run_id: str) -> bool:
        """Ask for a notification when this run finishes (for a result() waiter). True when this call set the
        watch on an unfinished run (its finish will be notified); False when the caller must read the run: it is
        finished, unknown or watched already, or the backend has no notifications."""
        ...

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        """Runs matching `query`, newest first (by id), at most `query.limit`."""
        ...

    # steering runs from outside (each returns the status after, None when the run does not exist)
    async def cancel_run(self, run_id: str, error: dict[str, Any]) -> RunStatus | None:
        """Cancel now if not running; ask the running worker to stop at its next step boundary otherwise."""
        ...

    async def pause_run(self, run_id: str) -> RunStatus | None: ...
    async def resume_run(self, run_id: str) -> RunStatus | None: ...
    async def restart_run(self, run_id: str) -> RunStatus | None:
        """Start a failed or canceled run again from its failed step, keeping its checkpoints."""
        ...

    async def settle_request(self, run_id: str, lease_token: str, error: dict[str, Any]) -> RunStatus:
        """Honour the requested cancel or pause of a claimed run (fenced): the status it ends in."""
        ...

    # what a claimed run writes (fenced by its lease token)
    async def load_steps(self, run_id: str) -> dict[str, StepRecord]: ...
    async def save_step(
        self,
        run_id: str,
        lease_token: str,
        name: str,
        output_json: str,
        started_at: datetime,
        finished_at: datetime,
        kind: str = "call",
    ) -> None: ...
    async def park_run(
        self, run_id: str, lease_token: str, waits: Sequence[TimedWait], children: Sequence[str]
    ) -> tuple[RunStatus, datetime]:
        """Park the run until the earliest wake time of `waits`, or ('waiting') until a message, event or
        child it waits for arrives; record the waits as steps. One that arrived already makes it due at
        once. A cancel or pause request stored meanwhile (the worker may not have heard of it yet) is applied
        by the same write: the run ends canceled, or paused keeping its wake time. Returns the status it
        parked in and when it is due (FOREVER when only an arrival can wake it)."""
        ...

    async def take_message(
        self, run_id: str, lease_token: str, name: str, topic: str, started_at: datetime
    ) -> tuple[bool, Any]:
        """Consume the oldest unconsumed message of `topic` and checkpoint it as step `name`, in one
        transaction: (True, payload), or (False, None) when there is none."""
        ...

    async def take_event(
        self, run_id: str, lease_token: str, name: str, event: str, key: str, started_at: datetime
    ) -> tuple[bool, Any]:
        """Checkpoint as step `name` the first `event` with `key` emitted since the run was created."""
        ...

    async def complete_wait(
        self, run_id: str, lease_token: str, name: str, kind: str, started_at: datetime, waits_for: dict[str, Any]
    ) -> None:
        """A receive or event wait timed out: checkpoint it with None."""
        ...

    async def set_run_event(self, run_id: str, lease_token: str, name: str, key: str, value_json: str) -> None:
        """Publish `key` = value for the run (latest wins) with its step record `name`, in one transaction."""
        ...

    async def get_run_event(self, run_id: str, key: str) -> tuple[RunStatus | None, bool, Any]:
        """(the run's status or None when there is no such run, whether `key` is set, its value)."""
        ...

    async def list_run_events(self, run_id: str) -> list[RunEventRecord]: ...
    async def list_messages(self, run_id: str, limit: int) -> list[MessageRecord]:
        """A run's unconsumed messages, oldest first."""
        ...

    async def send_message(
        self, run_id: str, topic: str, payload_json: str, idempotency_key: str | None
    ) -> MessageSent:
        """Store a message for a run and wake it if it waits: "stored"; "repeated" for an idempotency key
        used before; "no_run" when there is no such run; "completed" (nothing stored) for a completed run."""
        ...

    async def emit_event(self, name: str, key: str, payload_json: str) -> int:
        """Store a broadcast event and wake the runs parked on it; the number woken."""
        ...

    async def start_children(
        self,
        run_id: str,
        lease_token: str,
        step_name: str,
        started_at: datetime,
        output_json: str,
        children: Sequence[NewRun],
    ) -> None:
        """Insert the children of a claimed run and its step record `step_name` (output `output_json`), in one
        transaction; children that exist already are left as they are (a replay)."""
        ...

    async def fork_run(self, source_id: str, from_step: str, run: NewRun, step_names: Sequence[str]) -> None:
        """Insert `run` (pending, forked from `source_id` at `from_step`) with copies of the source run's steps
        `step_names`, in one transaction."""
        ...

    async def unfinished_by_version(self) -> list[tuple[str, str, RunStatus, int, datetime]]:
        """(workflow, version, status, how many, the oldest one's creation) over unfinished runs."""
        ...

    async def due_backlog(self) -> list[tuple[str, str, str, int, float]]:
        """(queue, workflow, version, runs due and not claimed, seconds the oldest has waited)."""
        ...

    async def count_children(self, run_id: str) -> dict[RunStatus, int]:
        """How many children a run has, per status."""
        ...

    async def load_children(self, run_id: str) -> dict[str, ChildOutcome]:
        """The children of a run, by id."""
        ...

    async def complete_sleep(self, run_id: str, lease_token: str, name: str) -> None: ...
    async def complete_run(
        self, run_id: str, lease_token: str, output_json: str, last_steps: Sequence[Checkpoint] = ()
    ) -> None:
        """Store the output; `last_steps`, checkpoints of steps the workflow returned right after, are
        written in the same transaction (one commit for all)."""
        ...

    async def fail_attempt(
        self,
        run_id: str,
        lease_token: str,
        error: dict[str, Any],
        step: tuple[str, datetime] | None,
        retry_delay: timedelta | None,
    ) -> RunStatus:
        """Record a failed attempt: back to pending after `retry_delay`, or `failed` when it is None. A run
        that will be retried and has a cancel or pause request stored is canceled, or paused keeping its retry
        time, instead. Returns the status the run is left in."""
        ...

    async def fail_overdue_runs(self, limit: int) -> list[OverdueRun]:
        """Fail up to `limit` pending runs whose deadline passed, of any workflow, version or queue, as a claim of
        them would (status failed, the "deadline exceeded" error of DeadlineExceeded, one attempt counted); a run
        parked behind its key leaves the parked set. Paused runs are left alone. Never waits on a run another
        transaction holds (a claim taking it fails it too). Returns the runs failed; with none overdue it is one
        probe of an index of pending runs with a deadline, and writes nothing."""
        ...

    # workers
    async def register_worker(self, worker: WorkerRecord) -> None: ...
    async def remove_worker(self, worker_id: str) -> None: ...
    async def list_workers(self) -> list[WorkerRecord]: ...

    # retention (finished runs deleted once expired)
    async def save_retention(self, policies: Mapping[tuple[str, str], timedelta | None]) -> None:
        """Store the retention each of these (workflow name, version) declares (None: the default applies),
        replacing only these versions' earlier declarations."""
        ...

    async def list_retention(self) -> dict[str, list[timedelta | None]]:
        """Per workflow name, the retention each of its versions declared, as the workers that registered them
        stored it (also versions no worker registers any more)."""
        ...

    def retention_lock(self) -> AbstractAsyncContextManager[bool]:
        """Held while one worker deletes expired runs; enters with False when another worker holds it."""
        ...

    async def finished_workflows(self) -> list[str]:
        """The names of the workflows that have finished runs, in order (retention deletes by workflow)."""
        ...

    async def delete_finished_runs(self, selection: FinishedRuns, limit: int) -> int:
        """Delete up to `limit` of the runs `selection` names (it names its workflow: `selection_workflow`), with
        their steps, messages and events, in one transaction that waits on no lock; the number deleted."""
        ...

    async def count_finished_runs(self, selection: FinishedRuns) -> int:
        """How many runs `selection` names (it names its workflow); what deleting them all would delete now."""
        ...

    # broadcast events no run can read any more (retention.py, "Broadcast events")
    async def unreachable_events_horizon(self, margin: timedelta) -> datetime | None:
        """The emission time before which no stored run can read a broadcast event: the creation of the oldest run
        that is not completed (or now, when there is none), less `margin`, by the database's clock. None when no
        event is that old (nothing to delete)."""
        ...

    async def delete_events_before(self, horizon: datetime, limit: int) -> int:
        """Delete up to `limit` of the broadcast events emitted before `horizon`, oldest first, in one transaction
        that waits on no lock; the number deleted."""
        ...

    async def count_events_before(self, horizon: datetime) -> int:
        """How many broadcast events were emitted before `horizon`."""
        ...


NotificationCallback = Callable[[str], None]


FINISHED_STATUSES = (RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.CANCELED.value)


@dataclass(frozen=True)
class FinishedRuns:
    """Finished runs to delete: those of `statuses` that finished more than `older_than` ago (by the database's
    clock), of `workflow` (any when None) except `excluded` workflows. A child whose parent is unfinished, or
    finished less than `older_than` ago, is never among them; an unfinished run never is."""

    older_than: timedelta
    statuses: tuple[str, ...] = FINISHED_STATUSES
    workflow: str | None = None
    excluded: tuple[str, ...] = ()


def selection_workflow(selection: FinishedRuns) -> str:
    """The one workflow whose runs a backend deletes or counts: it reads one workflow's finished runs at a time
    (retention.by_workflow makes a selection of every workflow into one per workflow)."""
    if selection.workflow is None:
        raise ValueError("a backend deletes and counts one workflow's finished runs at a time: name the workflow")
    return selection.workflow


def retention_declarations(rows: Iterable[Sequence[Any]]) -> dict[str, list[timedelta | None]]:
    """`list_retention`'s rows (workflow name, seconds or NULL), one per version declared, by workflow name."""
    declared: dict[str, list[timedelta | None]] = {}
    for name, seconds in rows:
        declared.setdefault(name, []).append(None if seconds is None else timedelta(seconds=seconds))
    return declared
