"""WorkflowManager: migrations, the registry, the worker, starting runs and waiting for them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from . import serde
from .backends.base import (
    CANCELED_ERROR,
    Backend,
    MessageRecord,
    QueueStats,
    RunEventRecord,
    RunQuery,
    RunRecord,
    ScheduleRecord,
    WorkerRecord,
)
from .backends.factory import backend_for
from .config import Config, define_config
from .definition import WorkflowDefinition
from .discovery import DiscoveryError, discover
from .duration import Duration
from .errors import (
    BackendUnavailable,
    InvalidValue,
    RunNotFound,
    ScheduleInUse,
    ScheduleNotFound,
    SonamuTasksError,
    WorkflowFailed,
)
from .handle import RunHandle
from .ids import canonical_run_id, stored_run_id
from .limits import (
    MAX_KEY_LENGTH,
    check_idempotency_key,
    check_name,
    check_topic,
    check_version,
    has_unstorable_text,
    shown,
)
from .queue import Queue, collect_queues
from .reconnect import until_available
from .records import STALE_AFTER, StepRecord
from .registry import Registry
from .result_waiters import ResultWaiters
from .retention import BATCH_SIZE, Progress, RetentionSweeper, purge_selection
from .retention import purge as purge_runs
from .retention import purge_events as purge_unreachable_events
from .run_creation import R, RunBatch, RunOptions, WorkflowSpec, prepare_run, resolve
from .scheduler import Scheduler, system_clock
from .status import RunStatus, StepStatus
from .step import DEFAULT_TOPIC
from .telemetry import Telemetry, metrics_text, serve_metrics
from .waiting import cancel_and_wait
from .worker import Worker

logger = logging.getLogger("sonamu_tasks.manager")

_active: list[WorkflowManager] = []


@dataclass(frozen=True)
class RunPage:
    items: list[RunRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class StrandedRuns:
    """Unfinished runs of a (workflow, version) that no live worker registers: nothing will execute them."""

    workflow: str
    version: str
    counts: dict[RunStatus, int]
    oldest_created_at: datetime

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# How long a scrape of a process without a worker (the dashboard) waits for the backlog read: well within
# Prometheus's default scrape timeout (10 s), so the other series still arrive while the database is down.
BACKLOG_READ_S = 2.0

# How long a read-only start waits for the database: a restart or failover of a few seconds is ridden out, and
# an operator whose read finds the database down learns so in 10 s, not the migrating start's 30.
READ_ONLY_START_S = 10.0

_OUR_KEY = "\x1fsend:"
"""The prefix of the idempotency key `send` gives a message sent without one."""

# A step kind whose completed record a fork keeps: its result is final. A set_event is not kept (the fork
# publishes its own), nor a child without a recorded outcome (the fork starts its own).
_FORK_KEEPS = frozenset({"call", "sleep", "receive", "event"})


def _kept_by_fork(steps: Sequence[StepRecord], pivot: StepRecord) -> list[str]:
    """The checkpoints a fork from `pivot` keeps: steps completed before it started, whose results the fork's
    replay reads back instead of executing them. A child step only with the outcome its parent saw; a fan-out
    only whole, with every child's outcome: else the fork starts the fan-out again, all of its children (it
    cannot wait on the source's children, nor start some of a fan-out's)."""

    def before(step: StepRecord | None) -> bool:
        return (
            step is not None
            and step.name != pivot.name
            and step.status is StepStatus.COMPLETED
            and step.started_at is not None
            and pivot.started_at is not None
            and step.started_at < pivot.started_at
        )

    def seen(step: StepRecord | None) -> bool:
        return step is not None and isinstance(step.output, dict) and "outcome" in step.output

    by_name = {step.name: step for step in steps}
    fan_outs = {
        step.name: [f"{step.name}[{index}]" for index in range(len(step.output["run_ids"]))]
        for step in steps
        if step.kind == "child" and isinstance(step.output, dict) and "run_ids" in step.output
    }
    # A fan-out's outcomes are kept with it or not at all (told by name: older releases stored them as "call").
    members = {name for names in fan_outs.values() for name in names}
    keep: list[str] = []
    for step in steps:
        if step.name in members or not before(step):
            continue
        if step.name in fan_outs:
            outcomes = [by_name.get(name) for name in fan_outs[step.name]]
            if all(before(outcome) and seen(outcome) for outcome in outcomes):
                keep += [step.name, *fan_outs[step.name]]
        elif step.kind in _FORK_KEEPS or (step.kind == "child" and seen(step)):
            keep.append(step.name)
    return keep


def active_manager() -> WorkflowManager:
    """The most recently started WorkflowManager of this process (for `definition.run(...)`)."""
    if not _active:
        raise SonamuTasksError("no WorkflowManager is running; use `async with WorkflowManager(config)` first")
    return _active[-1]


class StopSignals:
    """SIGTERM and SIGINT set `stopped`, from the moment it is entered: a signal that arrives while the
    manager is still starting stops it gracefully once it has started, instead of killing the process
    mid-start (which would leave its worker registered)."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopped.set)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


class WorkflowManager:
    """The engine in one object. Use it as an async context manager:

    async with WorkflowManager(config, workflows=[send_invoice]) as manager:
        handle = await manager.run(send_invoice, {"order_id": 7})
        print(await handle.result(timeout=60))
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any] | None = None,
        *,
        workflows: Iterable[WorkflowDefinition[Any, Any]] = (),
        backend: Backend | None = None,
        clock: Callable[[], datetime] | None = None,
        read_only: bool = False,
    ) -> None:
        """`backend`: a Backend object instead of the one `config.database_url` names. `clock`: the time the
        cron scheduler reads and workers' heartbeats are compared with (default: this machine's;
        `testing.WorkflowTestEnv` passes its test clock). `read_only`: a start that writes nothing, for reading
        with a role that may only read (see `start`)."""
        if config is None:
            config = define_config()
        elif isinstance(config, Mapping):
            config = define_config(**config)
        self.config = config
        self.registry = Registry()
        self._explicit = list(workflows)
        self._stored_queues: dict[str, Queue] = {}  # by name: what this process stored (declare_queue)
        for definition in self._explicit:
            self.registry.register(definition)
        self.backend = backend or backend_for(config)
        self.worker: Worker | None = None
        self.scheduler: Scheduler | None = None
        self.retention: RetentionSweeper | None = None
        self.discovery_errors: list[DiscoveryError] = []
        self.watched_paths: list[Path] = []
        self._clock = clock or system_clock
        self.telemetry = Telemetry()
        self._stop_metrics: Callable[[], None] | None = None
        self.waiters = ResultWaiters(self.backend, self.get_run, self._runs_here, watch=not read_only)
        self._listener: asyncio.Task[None] | None = None
        self._started = False
        self._pid = os.getpid()  # of the process that started it (see start)
        self.read_only = read_only

    # lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Migrate the database, collect the workflows of the configured packages, listen for events, and
        start the worker and the cron scheduler when `enable_worker` is on.

        A `read_only` manager writes nothing as it starts: it checks the schema instead of migrating it (a
        ConfigError names a schema that is not there, and the migrations it lacks: nothing is created), stores
        no queues or schedules, and starts no worker whatever `enable_worker` says; a database that does not
        answer within READ_ONLY_START_S is BackendUnavailable. Its methods that write (run, cancel ...) are not
        refused by it: the role's privileges decide."""
        if self._started:
            if self._pid != os.getpid():
                raise SonamuTasksError(
                    f"this WorkflowManager was started in process {self._pid}, before a fork; process "
                    f"{os.getpid()} cannot use it (its connections belong to the parent). Make or start the "
                    "manager after forking (in the lifespan, or the server's post-fork hook)"
                )
            return
        if self.config.workflows:
            self._collect(reload=False)
        self._pid = os.getpid()
        self.waiters.start()
        await self.backend.open()
        try:
            await self._start_parts()
        except BaseException:  # nothing half-started stays behind: no claiming worker, no open pool
            await self._stop_parts()
            raise
        self._started = True
        _active.append(self)

    async def _start_parts(self) -> None:
        if self.read_only:
            await self._check_schema()
        else:
            await until_available(self.backend.migrate, what="migrate", give_up_after_s=30)
            await until_available(self._register_queues, what="store queues", give_up_after_s=30)
        if self.backend.pushes_notifications:
            self._listener = asyncio.create_task(self.backend.listen(self), name="sonamu-listen")
            self.waiters.listening = True
        tasks = self.config.tasks
        if tasks.enable_worker and not self.read_only:
            if tasks.worker_options.metrics_port is not None:  # a busy port fails the start before any claim
                self._stop_metrics = serve_metrics(tasks.worker_options.metrics_port)
            self.worker = Worker(
                self.backend,
                self.registry,
                tasks.worker_options,
                self,
                context_provider=tasks.context_provider,
                on_finished=self.waiters.completed,
                telemetry=self.telemetry,
                clock=self._clock,
            )
            await self.worker.start()
            self.scheduler = Scheduler(self.backend, self.registry, self.config.timezone, clock=self._clock)
            await until_available(self.scheduler.synchronize, what="synchronize schedules")
            self.scheduler.start()
            self.retention = RetentionSweeper(
                self.backend, self.registry, tasks.retention, interval=tasks.retention_interval
            )
            await until_available(self.retention.publish, what="store retention")
            self.retention.start()

    async def _check_schema(self) -> None:
        """A read-only start: the schema must be there and current. An outage is said as one, and sooner than a
        migrating start says it: an operator reading is told the database is down, not kept waiting."""
        try:
            await until_available(self.backend.check_schema, what="check the schema", give_up_after_s=READ_ONLY_START_S)
        except BackendUnavailable as error:
            raise BackendUnavailable(
                f"the database is unavailable: no answer within {READ_ONLY_START_S:g}s ({error.__cause__ or error})"
            ) from error

    async def stop(self) -> None:
        """Graceful: the worker stops claiming, lets running steps finish, and hands back the rest."""
        if not self._started:
            return
        self._started = False
        if self in _active:
            _active.remove(self)
        await self._stop_parts()

    async def _stop_parts(self) -> None:
        """Stop what is started, in reverse order (also what a failed start had started)."""
        if self.retention is not None:
            await self.retention.stop()
            self.retention = None
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None
        if self._stop_metrics is not None:
            self._stop_metrics()
            self._stop_metrics = None
        # After the worker: a run it finished during the graceful stop still answers its waiters.
        self.waiters.stop()
        if self._listener is not None:
            self.waiters.listening = False
            await cancel_and_wait(self._listener)
            self._listener = None
        await self.backend.close()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully (what `sonamu-tasks worker` does)."""
        with StopSignals() as signals:
            async with self:
                await signals.stopped.wait()
                logger.info("signal received: shutting down")

    # registration

    def register(self, *definitions: WorkflowDefinition[Any, Any]) -> None:
        """Add workflows before `start`, which stores their queues and schedules. A started manager only adds
        them to its registry: `synchronize` stores the rest and tells the worker (they stay registered when it
        imports the configured packages afresh, as the workflows given to the constructor do)."""
        for definition in definitions:
            self.registry.register(definition)
            if definition not in self._explicit:
                self._explicit.append(definition)

    async def synchronize(self, definitions: Iterable[WorkflowDefinition[Any, Any]] | None = None) -> None:
        """Re-register after a code change (the seed's HMR) and keep schedules in step with the code.

        Without `definitions`, the configured packages are imported afresh (plus the workflows given to
        the constructor). Runs in flight keep the code they started with; new attempts use the new code.
        """
        if definitions is None:
            self._collect(reload=True)
        else:
            self.registry.replace_all(definitions)
        await until_available(self._register_queues, what="store queues")
        if self.worker is not None:
            await self.worker.registry_changed()
        if self.scheduler is not None:
            await until_available(self.scheduler.synchronize, what="synchronize schedules")

    async def _register_queues(self) -> None:
        """Store the queues of the config and the workflows, and each workflow's queue: the claims of every
        worker read the limits from there."""
        queues, workflow_queues = collect_queues(
            [q for q in self.config.tasks.queues if isinstance(q, Queue)],
            self.registry,  # dicts made Queues
        )
        if queues or workflow_queues:
            await self.backend.register_queues(queues, workflow_queues)
        self._stored_queues = {queue.name: queue for queue in queues}

    async def declare_queue(self, queue: Queue, *, give_up_after_s: float | None = 30) -> None:
        """Store `queue`'s limits, as those of the config's and the workflows' queues are at start: `run(...,
        queue=Queue(...))` (and a child's start) calls it for a Queue neither declares, whose limits would
        otherwise hold nowhere. Once per process and queue. InvalidValue when this process declares a queue of
        that name with other limits (which would hold would depend on who stored last). With the database
        down, BackendUnavailable after `give_up_after_s` (as run() gives up; None: wait for it)."""
        known = self._stored_queues.get(queue.name)
        if known == queue:
            return
        if known is not None:
            raise InvalidValue(
                f"queue {queue.name!r}: {queue} differs from the queue declared here, {known}; pass its name or "
                "the declared Queue",
                field="queue",
            )
        await until_available(
            lambda: self.backend.register_queues([queue], []), what="store queue", give_up_after_s=give_up_after_s
        )
        self._stored_queues[queue.name] = queue

    async def metrics_text(self) -> tuple[bytes, str]:
        """This process's Prometheus metrics (the `metrics` extra) and their content type, with the due backlog
        per queue read now: a process without a worker (the dashboard) has no loop refreshing those gauges.

        With the database down the backlog read gives up after BACKLOG_READ_S and the other series are served
        without the backlog gauges (a stale count would look current), a comment line saying why: a scrape
        that waited for the database would time out, taking this process's own series with it."""
        if self.worker is None and self.telemetry.metrics is not None:
            try:
                rows = await until_available(
                    self.backend.due_backlog, what="read the backlog", give_up_after_s=BACKLOG_READ_S
                )
            except BackendUnavailable as error:
                self.telemetry.backlog_unknown()
                body, content_type = metrics_text()
                why = " ".join(str(error).split())  # one comment line
                return f"# backlog gauges left out: {why}\n".encode() + body, content_type
            self.telemetry.backlog(rows)
        return metrics_text()

    async def queue_stats(self, *, stale_after: float = STALE_AFTER) -> list[QueueStats]:
        """Every queue with limits or unfinished runs: its limits, runs executing, due backlog and its age,
        starts in the current rate window, and how many live workers (heartbeat in the last `stale_after`
        seconds) claim from it (`sonamu-tasks queues`, the dashboard's queues page)."""
        stats = await until_available(self.backend.queue_stats, what="read queues", give_up_after_s=30)
        now = self._clock()
        served = [w.queues for w in await self.list_workers() if w.live(now, stale_after)]
        known = [queues for queues in served if queues is not None]
        if len(known) < len(served):  # a worker of an older release did not record its queues
            return stats  # workers unknown (None), rather than a 0 that says nothing serves a queue
        return [dataclasses.replace(queue, workers=sum(queue.name in queues for queues in known)) for queue in stats]

    def _collect(self, *, reload: bool) -> None:
        found = discover(self.config.workflows, reload=reload)
        self.discovery_errors = found.errors
        self.watched_paths = found.watched_paths
        self.registry.replace_all([*self._explicit, *found.definitions])

    # runs

    async def run(
        self,
        workflow: WorkflowSpec[R],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        start_at: datetime | Duration | None = None,
        deadline: datetime | Duration | None = None,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        debounce: Duration | None = None,
        debounce_key: str | None = None,
    ) -> RunHandle[R]:
        """Start a run. The input is validated here when the workflow is known to this process.

        `idempotency_key`: a repeated key returns the existing run. `start_at`: a datetime or a duration
        (a delayed start). `deadline`: a datetime or duration after which the run fails with
        "deadline exceeded" instead of being claimed or retried.
        `queue`: another queue than the workflow's. `priority`: lower runs first within the queue (FIFO
        within a priority). `concurrency_key`: the key the queue's `per_key_concurrency` counts.
        `debounce` with `debounce_key`: run() calls with the same key within `debounce` of the first one
        make one run, started when the window ends with the latest input (the same handle comes back).
        """
        name, version, definition = resolve(workflow, self.registry)
        options = RunOptions(
            idempotency_key, start_at, deadline, queue, priority, concurrency_key, debounce, debounce_key
        )
        new_run = prepare_run(name, version, definition, input, options, trace_context=self.telemetry.caller_context())
        if isinstance(queue, Queue):  # after the checks: a refused run() stores nothing, this declaration neither
            await self.declare_queue(queue)
        worker = self.worker
        local = self.registry.find(name, version)
        if new_run.debounce is not None:
            run_id, created = await until_available(
                lambda: self.backend.create_debounced_run(new_run), what="start run", give_up_after_s=30
            )
            return await self._handle(run_id, name, created, definition)
        if (
            worker is not None
            and local is not None
            and start_at is None
            and worker.serves(new_run.queue)
            and worker.reserve_slot()
        ):
            # This process runs it: insert it already claimed, and start it now (unless its queue has limits:
            # then it is inserted pending, for the claim to weigh).
            claimed = None
            try:
                run_id, created, claimed = await until_available(
                    lambda: self.backend.create_claimed_run(new_run, worker.id, worker.lease),
                    what="start run",
                    give_up_after_s=30,
                )
            finally:
                worker.release_slot(claimed, local)
            if created and claimed is None:
                worker.wake()
            return await self._handle(run_id, name, created, definition)
        run_id, created = await until_available(
            lambda: self.backend.create_run(new_run), what="start run", give_up_after_s=30
        )
        if created and worker is not None and local is not None:
            worker.wake()  # all slots busy (or a delayed start): look again when one frees up
        return await self._handle(run_id, name, created, definition)

    async def run_many(
        self,
        workflow: WorkflowSpec[R],
        inputs: Iterable[Any],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        start_at: datetime | Duration | None = None,
        deadline: datetime | Duration | None = None,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        concurrency_keys: Sequence[str | None] | None = None,
    ) -> list[RunHandle[R]]:
        """Start one run per input in one statement; the handles come back in input order. Every input is
        validated before the runs commit: a bad one refuses the whole call, naming its index, and nothing is
        stored.
        `idempotency_keys`: one per input (None for none); a repeated key gives the existing run. `queue`,
        `priority` as for `run()`; `concurrency_key` for every run, or `concurrency_keys`, one per input."""
        name, version, definition = resolve(workflow, self.registry)
        items = list(inputs)
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(items)
        if len(keys) != len(items):
            raise ValueError(f"run_many: {len(items)} inputs but {len(keys)} idempotency_keys")
        if concurrency_key is not None and concurrency_keys is not None:
            raise ValueError("run_many: concurrency_key (one for every run) or concurrency_keys (one per input)")
        concurrency = list(concurrency_keys) if concurrency_keys is not None else [concurrency_key] * len(items)
        if len(concurrency) != len(items):
            raise ValueError(f"run_many: {len(items)} inputs but {len(concurrency)} concurrency_keys")
        batch = RunBatch(
            name,
            version,
            definition,
            items,
            RunOptions(start_at=start_at, deadline=deadline, queue=queue, priority=priority),
            keys,
            concurrency,
            what=lambda index: f"inputs[{index}] of run_many({name!r})",
            trace_context=self.telemetry.caller_context(),
        )  # the options checked now, with the first input; each other input as the backend reads it
        if not batch:
            return []
        if isinstance(queue, Queue):
            batch.prepare_all()  # a bad input stores nothing, this declaration neither
            await self.declare_queue(queue)
        try:
            created = await until_available(
                lambda: self.backend.create_runs(batch, alike=not batch.keyed), what="start runs", give_up_after_s=30
            )
        except BackendUnavailable:
            batch.prepare_all()  # a bad input is the caller's to mend, outage or not: said first (nothing was stored)
            raise
        if self.worker is not None and self.registry.find(name, version) is not None:
            self.worker.wake()
        output_type = definition.output_type if definition is not None else None
        handles = [RunHandle(self, run_id, name, created=fresh, output_type=output_type) for run_id, fresh in created]
        found = [handle for handle in handles if not handle.created and handle.output_type is not None]
        if found:
            await self._retype(found, definition)
        return handles

    async def _handle(
        self, run_id: str, name: str, created: bool, definition: WorkflowDefinition[Any, Any] | None
    ) -> RunHandle[Any]:
        """The handle `run()` returns, typed with what the run's workflow returns."""
        output_type = definition.output_type if definition is not None else None
        handle: RunHandle[Any] = RunHandle(self, run_id, name, created=created, output_type=output_type)
        if not created and output_type is not None:
            await self._retype([handle], definition)
        return handle

    async def _retype(self, handles: list[RunHandle[Any]], definition: WorkflowDefinition[Any, Any] | None) -> None:
        """Runs found by their keys (not created by this call) may be another version's, even another workflow's
        (keys are global): each one's output is rebuilt as the type of the definition it was made with when this
        process knows it, and comes as JSON otherwise. One read for all of them (a run_many sent again finds
        thousands)."""
        ids = list({handle.id for handle in handles})
        versions = await until_available(lambda: self.backend.run_versions(ids), what="read runs", give_up_after_s=30)
        for handle in handles:
            found = versions.get(handle.id)
            if found is None:  # deleted since (a purge): its output cannot come either
                continue
            handle.workflow_name = found[0]
            if definition is None or definition.key != found:
                known = self.registry.find(*found)
                handle.output_type = known.output_type if known is not None else None

    def handle(self, run_id: str, workflow_name: str = "") -> RunHandle:
        """A handle for a run started elsewhere."""
        return RunHandle(self, run_id, workflow_name)

    async def get_run(self, run_id: str, *, with_steps: bool = False, value_limit: int | None = None) -> RunRecord:
        """A run (and its steps). `value_limit`: inputs and outputs whose JSON text is longer than that many
        characters come as `CutValue`s (excerpt and length), without reading the values (what a page needs)."""
        run_id = stored_run_id(run_id)
        record = await until_available(
            lambda: self.backend.get_run(run_id, with_steps=with_steps, value_limit=value_limit),
            what="read run",
            give_up_after_s=30,
        )
        if record is None:
            raise RunNotFound(f"no run with id {run_id}")
        return record

    # steering

    async def cancel(self, run_id: str) -> RunStatus:
        """Cancel a run: at once if it is pending, sleeping or paused; at its next step boundary if running
        (its worker hears of it by notification). Returns the status after (a finished run is left as is)."""
        return await self._steer(run_id, lambda run: self.backend.cancel_run(run, dict(CANCELED_ERROR)))

    async def pause(self, run_id: str) -> RunStatus:
        """Pause a run: it keeps its checkpoints and is not claimed until resumed."""
        return await self._steer(run_id, self.backend.pause_run)

    async def resume(self, run_id: str) -> RunStatus:
        return await self._steer(run_id, self.backend.resume_run)

    async def retry(self, run_id: str) -> RunStatus:
        """Start a failed or canceled run again from its failed step, keeping its checkpoints, with a fresh
        retry budget (and no deadline)."""
        return await self._steer(run_id, self.backend.restart_run)

    async def _steer(self, run_id: str, call: Callable[[str], Awaitable[RunStatus | None]]) -> RunStatus:
        run_id = stored_run_id(run_id)
        status = await until_available(lambda: call(run_id), what="steer run", give_up_after_s=30)
        if status is None:
            raise RunNotFound(f"no run with id {run_id}")
        if self.worker is not None:
            self.worker.run_requested(run_id)  # held here: no need to wait for the notification
            if status is RunStatus.PENDING:
                self.worker.wake()
        return status

    async def migrate(self) -> list[str]:
        """Apply pending migrations without starting anything else; return the names applied."""
        await self.backend.open()
        try:
            return await until_available(self.backend.migrate, what="migrate", give_up_after_s=30)
        finally:
            if not self._started:
                await self.backend.close()

    async def list_schedules(self) -> list[ScheduleRecord]:
        """The stored cron schedules, with their next and last fire times."""
        return await until_available(self.backend.list_schedules, what="list schedules", give_up_after_s=30)

    async def delete_schedule(self, name: str) -> ScheduleRecord:
        """Delete stored schedule `name`, which no live worker fires: its workflow left the code (a schedule
        removed from a workflow that stays is deleted by the workers themselves). Returns what was stored.
        Raises ScheduleNotFound for a name not stored, and ScheduleInUse while a live worker registers the
        schedule's workflow: the code declares it, and a deleted schedule would stop firing until a worker
        started again and stored it back."""
        schedules = {record.name: record for record in await self.list_schedules()}
        record = schedules.get(name)
        if record is None:
            known = ", ".join(map(repr, sorted(schedules))) or "none"
            raise ScheduleNotFound(f"no schedule named {name!r} is stored (stored: {known})")
        # Whether a live worker registers the workflow is asked in the delete itself, by the database's clock: a
        # worker starting meanwhile, or this machine's clock, cannot let a declared schedule go.
        outcome = await until_available(
            lambda: self.backend.delete_schedule(name, record.workflow_name, STALE_AFTER),
            what="delete schedule",
            give_up_after_s=30,
        )
        if outcome == "in_use":
            raise ScheduleInUse(
                f"schedule {name!r} belongs to workflow {record.workflow_name!r}, which live workers register: "
                "remove the schedule from that workflow's code instead (its workers then delete it)"
            )
        if outcome == "missing":  # deleted, or stored for another workflow, since it was read
            raise ScheduleNotFound(f"schedule {name!r} of workflow {record.workflow_name!r} is no longer stored")
        logger.info("deleted schedule %r of workflow %r (%s)", name, record.workflow_name, record.expression)
        return record

    async def list_workers(self) -> list[WorkerRecord]:
        """Workers that registered, with their workflows and last heartbeat (a stale one is likely dead)."""
        return await until_available(self.backend.list_workers, what="list workers", give_up_after_s=30)

    async def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        parent_id: str | None = None,
        version: str | None = None,
        queue: str | None = None,
        value_limit: int | None = None,
    ) -> RunPage:
        """Runs, newest first. Pass `page.next_cursor` as `cursor` for the next page (None: last page).
        `parent_id`: only the children of that run. `queue`: only the runs of that queue. `value_limit`: as
        `get_run`'s, inputs and outputs longer than that come as `CutValue`s (0: a list that shows none)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidValue(
                f"list_runs limit must be a whole number from 1 to 1000, got {shown(limit)}", field="limit"
            )
        if value_limit is not None and (
            isinstance(value_limit, bool) or not isinstance(value_limit, int) or value_limit < 0
        ):
            raise InvalidValue(
                f"list_runs value_limit must be a whole number, 0 or more, got {shown(value_limit)}",
                field="value_limit",
            )
        query = RunQuery(
            _text_filter(workflow, "workflow"),
            _status_filter(status),
            _run_id_filter(cursor, "cursor"),
            _time_filter(created_after, "created_after"),
            _time_filter(created_before, "created_before"),
            limit + 1,
            _run_id_filter(parent_id, "parent_id"),
            _text_filter(version, "version"),
            _text_filter(queue, "queue"),
            value_limit,
        )
        records = await until_available(lambda: self.backend.list_runs(query), what="list runs", give_up_after_s=30)
        items = records[:limit]
        return RunPage(items, items[-1].id if len(records) > limit else None)

    async def fork(self, run_id: str, from_step: str, version: str | None = None) -> RunHandle:
        """A new run of the same workflow and input that keeps the source's checkpoints of the steps that
        started before `from_step` and executes from it, on the same version or on `version` (a bug fix). The
        source is left as it is."""
        source = await self.get_run(run_id, with_steps=True)
        run_id = source.id  # as stored (get_run checked it)
        pivot = next((s for s in source.steps if s.name == from_step), None)
        if pivot is None:
            known = ", ".join(repr(s.name) for s in source.steps) or "none"
            raise InvalidValue(
                f"run {run_id} has no step {from_step!r} to fork from; its steps: {known}", field="from_step"
            )
        keep = _kept_by_fork(source.steps, pivot)
        target = source.version if version is None else check_version(version)
        definition = self.registry.find(source.workflow_name, target)
        new_run = prepare_run(
            source.workflow_name,
            target,
            definition,
            source.input,
            # The same run again: its priority and concurrency key; its queue unless the target version
            # declares one here.
            RunOptions(
                queue=None if definition is not None else source.queue,
                priority=source.priority,
                concurrency_key=source.concurrency_key,
            ),
            what=f"the input of run {run_id} forked to version {target!r}",
        )
        await until_available(
            lambda: self.backend.fork_run(run_id, from_step, new_run, keep), what="fork run", give_up_after_s=30
        )
        logger.info(
            "forked run %s from step %r into %s (version %s, %d checkpoints kept)",
            run_id,
            from_step,
            new_run.id,
            target,
            len(keep),
        )
        if self.worker is not None:
            self.worker.wake()
        output_type = definition.output_type if definition is not None else None
        return RunHandle(self, new_run.id, source.workflow_name, output_type=output_type)

    async def stranded_runs(self, *, stale_after: float = STALE_AFTER) -> list[StrandedRuns]:
        """Unfinished runs whose (workflow, version) no live worker registers (a worker is live when it
        heartbeat in the last `stale_after` seconds), per version: they wait for a worker that will not come.
        Cancel them, or fork them onto a version that is served."""
        workers = await self.list_workers()
        now = self._clock()
        served = {key for worker in workers if worker.live(now, stale_after) for key in worker.workflows}
        rows = await until_available(self.backend.unfinished_by_version, what="count runs", give_up_after_s=30)
        groups: dict[tuple[str, str], tuple[dict[RunStatus, int], datetime]] = {}
        for name, version, status, count, oldest in rows:
            if (name, version) in served:
                continue
            counts, first = groups.get((name, version), ({}, oldest))
            counts[status] = count
            groups[(name, version)] = (counts, min(first, oldest))
        return [
            StrandedRuns(name, version, counts, oldest) for (name, version), (counts, oldest) in sorted(groups.items())
        ]

    async def count_children(self, run_id: str) -> dict[RunStatus, int]:
        """How many children run `run_id` started, per status (without reading them)."""
        run_id = stored_run_id(run_id)
        return await until_available(
            lambda: self.backend.count_children(run_id), what="count children", give_up_after_s=30
        )

    async def purge(
        self,
        older_than: Duration,
        statuses: str | Iterable[str] | None = None,
        workflow: str | None = None,
        dry_run: bool = False,
        batch_size: int = BATCH_SIZE,
        progress: Progress | None = None,
    ) -> int:
        """Delete the finished runs (of `statuses`, default all three; of `workflow`, default any) that finished
        more than `older_than` ago, with their steps, messages and events, whatever their retention; never an
        unfinished run, nor a child whose parent is unfinished. Batches of `batch_size`, each one short
        transaction, a pause after each. `dry_run`: only count them. `progress(deleted, total)` is called
        after each batch. Returns how many were deleted (counted)."""
        selection = purge_selection(older_than, statuses, workflow)
        return await purge_runs(self.backend, selection, dry_run=dry_run, batch_size=batch_size, progress=progress)

    async def purge_events(self, *, dry_run: bool = False, progress: Progress | None = None) -> int:
        """Delete the broadcast events (`emit`) no stored run can read any more, as each retention pass does:
        those emitted over an hour before the creation of the oldest run that is not completed. `dry_run`: only
        count them. Returns how many were deleted (counted)."""
        return await purge_unreachable_events(self.backend, dry_run=dry_run, progress=progress)

    # messages and events

    async def send(
        self, run_id: str, message: Any, *, topic: str | None = None, idempotency_key: str | None = None
    ) -> bool:
        """Send `message` to run `run_id` on `topic` (its `step.receive` takes it, once). Stored durably
        whatever the run is doing; a waiting run is woken. Returns False when `idempotency_key` was used for
        this run before (the message is stored once). RunNotFound for an unknown run; InvalidValue for a
        completed run (nothing stored) and for a None message (receive's timeout gives None)."""
        run_id = stored_run_id(run_id)
        topic = DEFAULT_TOPIC if topic is None else check_topic(topic)
        # Without a key of the caller's, one of ours: a send made again after a lost answer (a reconnect) then
        # finds the message it stored instead of storing it twice.
        # It starts with a control character, which no caller's key may hold, and is not shown (list_messages).
        key = f"{_OUR_KEY}{uuid.uuid4()}" if idempotency_key is None else check_idempotency_key(idempotency_key)
        what = f"the message to run {run_id} on topic {topic!r}"
        _refuse_none(message, what, "step.receive", field="message")
        payload = serde.dumps(message, what=what)
        sent = await until_available(
            lambda: self.backend.send_message(run_id, topic, payload, key), what="send message", give_up_after_s=30
        )
        if sent == "no_run":
            raise RunNotFound(f"no run with id {run_id}")
        if sent == "completed":
            raise InvalidValue(
                f"run {run_id} is completed: no step.receive would ever take {what}, so it was not stored"
                " (a failed or canceled run keeps its messages for a retry)",
                field="run_id",
            )
        if self.worker is not None:
            self.worker.wake()  # the run may be due now, and may be this worker's to claim
        return sent == "stored" or idempotency_key is None

    async def emit(self, event: str, payload: Any, *, key: str | None = None) -> int:
        """Broadcast `event` (with `key`): every run waiting for it in `step.wait_for_event` gets `payload`,
        and so does every run created before now that reaches such a wait later. Returns the runs woken."""
        name = check_name(event, field="event name")
        event_key = "" if key is None else check_name(key, field="event key", limit=MAX_KEY_LENGTH)
        what = f"the payload of event {name!r}"
        _refuse_none(payload, what, "step.wait_for_event", field="payload")
        encoded = serde.dumps(payload, what=what)
        woken = await until_available(
            lambda: self.backend.emit_event(name, event_key, encoded), what="emit event", give_up_after_s=30
        )
        if woken and self.worker is not None:
            self.worker.wake()
        return woken

    async def get_event(self, run_id: str, key: str, *, timeout: float | None = None) -> Any:
        """The value run `run_id` published under `key` (`step.set_event`); waits until it is set (woken by
        a notification, not by polling). None when the run finished without setting it, or after `timeout` (also
        when the database did not answer by then: an outage ends the wait at the timeout too)."""
        return await self.waiters.wait_for_event(stored_run_id(run_id), check_name(key, field="event key"), timeout)

    async def list_messages(self, run_id: str, *, limit: int = 100) -> list[MessageRecord]:
        """A run's messages not consumed yet, oldest first."""
        run_id = stored_run_id(run_id)
        messages = await until_available(
            lambda: self.backend.list_messages(run_id, limit), what="list messages", give_up_after_s=30
        )
        return [
            dataclasses.replace(m, idempotency_key=None) if (m.idempotency_key or "").startswith(_OUR_KEY) else m
            for m in messages
        ]

    async def list_events(self, run_id: str) -> list[RunEventRecord]:
        """What a run published with `step.set_event`, the latest value per key."""
        run_id = stored_run_id(run_id)
        return await until_available(
            lambda: self.backend.list_run_events(run_id), what="list events", give_up_after_s=30
        )

    async def wait_for_result(self, run_id: str, *, timeout: float | None = None) -> Any:
        outcome = await self.waiters.wait(stored_run_id(run_id), timeout)
        if isinstance(outcome, str):  # completed by this process's worker: its output, without a read
            return serde.loads(outcome)
        if outcome.status is RunStatus.COMPLETED:
            return outcome.output
        raise WorkflowFailed(outcome.id, outcome.workflow_name, outcome.status.value, outcome.error)

    async def wait_until_finished(self, run_id: str, *, timeout: float | None = None) -> RunRecord:
        run_id = stored_run_id(run_id)
        outcome = await self.waiters.wait(run_id, timeout)
        return await self.get_run(run_id) if isinstance(outcome, str) else outcome

    def _runs_here(self, run_id: str) -> bool:
        """True when this process's worker is executing the run: it wakes the waiter itself."""
        return self.worker is not None and self.worker.holds(run_id)

    # Notifications (from the backend's listener, or this process's worker)

    def run_available(self, workflow_name: str, run_id: str | None = None) -> None:
        if self.worker is not None:
            self.worker.notify_available(run_id, workflow_name)

    def run_woken(self, workflow_name: str) -> None:
        if self.worker is not None:
            self.worker.notify_woken()

    def run_finished(self, run_id: str, output_json: str | None = None) -> None:
        self.waiters.completed(run_id, output_json)

    def run_requested(self, run_id: str) -> None:
        if self.worker is not None:
            self.worker.run_requested(run_id)

    def reconnected(self) -> None:
        if self.worker is not None:
            self.worker.wake()
        self.waiters.wake_all()


# list_runs' filters, each refused naming its argument: the backends would otherwise fail on a wrong one each
# in its own way (an AttributeError, a cast PostgreSQL refuses), or SQLite would match nothing.


def _text_filter(value: str | None, field: str) -> str | None:
    if value is not None and (not isinstance(value, str) or has_unstorable_text(value)):
        raise InvalidValue(
            f"list_runs {field} must be a string with no NUL or lone surrogate, got {shown(value)}", field=field
        )
    return value


def _run_id_filter(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    canonical = canonical_run_id(value)
    if canonical is None:
        raise InvalidValue(f"list_runs {field} must be a run id (a UUID), got {shown(value)}", field=field)
    return canonical


def _time_filter(value: datetime | None, field: str) -> datetime | None:
    if value is not None and not (isinstance(value, datetime) and value.utcoffset() is not None):
        raise InvalidValue(f"list_runs {field} must be a timezone-aware datetime, got {shown(value)}", field=field)
    return value


def _status_filter(status: RunStatus | str | Iterable[RunStatus | str] | None) -> tuple[str, ...] | None:
    if status is None:
        return None
    if isinstance(status, str) or not isinstance(status, Iterable):
        status = [status]
    statuses = []
    for item in status:
        try:
            statuses.append(RunStatus(item).value)
        except ValueError:
            known = ", ".join(s.value for s in RunStatus)
            raise InvalidValue(
                f"list_runs status {shown(item)} is not a run status; one of {known}", field="status"
            ) from None
    return tuple(statuses)


def _refuse_none(value: Any, what: str, waiter: str, *, field: str) -> None:
    """None is what `waiter` returns at its timeout: a None sent would read as "nothing came" (a refusal, a
    cancellation), at once and silently."""
    if value is None:
        raise InvalidValue(
            f"{what} is None, which {waiter} also returns at its timeout: send a value that says something"
            " (True, a dict ...)",
            field=field,
        )
