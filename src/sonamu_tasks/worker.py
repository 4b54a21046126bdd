"""The worker: claims due runs into `concurrency` slots, keeps their leases alive, shuts down gently.

Wake-ups come from three places: a notification (after `listen_delay` for new runs, at once for a waiting
run woken), a local timer for the runs this worker parked or scheduled for retry, and the time until the
next due run read from the database, capped by `poll_interval_ms` as the safety net.

Leases are extended from the heartbeat thread (`heartbeat.py`), so a workflow that blocks the event loop
does not lose them; only a worker whose backend was passed in as an object heartbeats from its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .attempt import Attempt
from .backends.base import Backend, ClaimedRun, OverdueRun, WorkerRecord
from .backends.factory import another_like
from .config import WorkerOptions
from .deadlines import DeadlineSweeper
from .definition import WorkflowDefinition
from .errors import BackendUnavailable
from .heartbeat import HeartbeatThread, Held, LeaseTimes, heartbeat_failures
from .log import FailureEpisodes
from .queue import served_queues
from .reconnect import until_available
from .registry import Registry
from .scheduler import system_clock
from .telemetry import DISABLED, Telemetry
from .threads import StepThreads
from .waiting import cancel_and_wait, stop_gently, wait_for_event

if TYPE_CHECKING:
    from .manager import WorkflowManager

logger = logging.getLogger("sonamu_tasks.worker")

PUSHED_POLL_MS = 5_000  # notifications wake the worker; polling is only the safety net
POLLED_POLL_MS = 250  # no notifications across processes (SQLite): polling is how runs are found
HEARTBEAT_AT_LEAST_EVERY_S = 20.0  # whatever the lease: the lists take a worker silent for a minute as gone
BACKLOG_EVERY_S = 5.0  # how often the backlog gauges are refreshed (only with the metrics extra)
CLAIM_STOP_S = 2.0  # how long stop() lets a claim in flight finish before cancelling it
STARVED_LOOK_MAX_S = 1.0  # the slowest look again at runs due but not claimable (a full queue)
TAKE_OVERS_LOGGED_PER_CLAIM = 10  # one line each; the rest of a claim's take-overs are summed up in one line


class Worker:
    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        options: WorkerOptions,
        manager: WorkflowManager,
        *,
        context_provider: Callable[[dict[str, Any]], Any] | None = None,
        on_finished: Callable[[str, str | None], None] | None = None,
        telemetry: Telemetry = DISABLED,
        clock: Callable[[], datetime] = system_clock,
    ) -> None:
        self.backend = backend
        self.manager = manager
        """The manager this worker runs in: a child's handle steers the child through it."""
        self.now = clock
        """The time the backend's transactions read (`testing.WorkflowTestEnv` passes its test clock)."""
        self.telemetry = telemetry
        self._metrics_task: asyncio.Task[None] | None = None
        self.deadlines = DeadlineSweeper(backend, self._failed_overdue, telemetry=telemetry)
        """Fails the pending runs of the database whose deadline passed, which no claim may come for."""
        self.registry = registry
        self.options = options
        self.context_provider = context_provider
        self.max_recoveries = options.max_recoveries
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.threads = StepThreads(options.concurrency)
        self.step_mocks: dict[str, Callable[..., Any]] = {}
        """Stand-ins by step name, called instead of the step's function (`testing.WorkflowTestEnv.mock_step`)."""
        self._lease = timedelta(milliseconds=options.lease_ms)
        self.leases = LeaseTimes(self._lease)
        """When each held lease was last extended: no step starts once one may have run out."""
        poll_ms = options.poll_interval_ms
        if poll_ms is None:
            poll_ms = PUSHED_POLL_MS if backend.pushes_notifications else POLLED_POLL_MS
        self._poll_s = poll_ms / 1000
        self._on_finished = on_finished
        self._active: dict[str, tuple[asyncio.Task[None], Attempt]] = {}  # by lease token
        self._wake = asyncio.Event()
        self._more_due = False
        self._starved = False  # runs were due that the last claim could not take (row locks, a full queue)
        self._look_again_s = 0.0  # when a starved claim loop looks again (see _claim_loop)
        self._claims = 0
        self._stopping = False
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reserved = 0  # slots promised to runs this process is inserting already claimed
        self._unreserved = asyncio.Event()  # set while no slot is promised (stop() waits for the inserts)
        self._unreserved.set()
        self._claiming = 0  # slots the claim in flight may fill
        self._takes: set[asyncio.Task[None]] = set()  # notified runs being taken by their ids (_take)
        self._publish_pending = False  # a snapshot of the runs held is due for the heartbeat thread (_publish_soon)
        self._timer: asyncio.TimerHandle | None = None  # only the earliest wake: the claim loop finds the rest
        # A third of the lease, and at least every 20 s: the lists take a worker silent for a minute as gone
        # (`runs --stranded`, the queues' worker counts), which a long lease would otherwise make it look.
        interval_s = min(options.lease_ms / 3000, HEARTBEAT_AT_LEAST_EVERY_S)
        if not backend.pushes_notifications:
            # No notification brings a cancel or pause here: the heartbeat does, so it comes at least every second.
            interval_s = min(interval_s, 1.0)
        self._heartbeat_interval_s = interval_s
        self._heartbeat = HeartbeatThread(
            worker_id=self.id,
            lease=self._lease,
            interval_s=interval_s,
            blocked_limit_s=options.blocked_loop_limit_ms / 1000,
            # None for a backend passed in as an object: the loop heartbeats, the thread only watches.
            open_backend=another_like(backend),
            on_answer=self._heard,
            leases=self.leases,
        )

    @property
    def idle(self) -> bool:
        """No run is executing here, and none is being started."""
        return not self._active and not self._reserved

    def holds(self, run_id: str) -> bool:
        """Whether run `run_id` executes here now (without building the list of the runs held)."""
        return any(attempt.claimed.id == run_id for _, attempt in self._active.values())

    async def start(self) -> None:
        await until_available(lambda: self.backend.register_worker(self._record()), what="register worker")
        self._heartbeat.start()
        if self.telemetry.metrics is not None:
            self._metrics_task = asyncio.create_task(self._backlog_loop(), name="sonamu-backlog")
        self._tasks = [asyncio.create_task(self._claim_loop(), name="sonamu-claim")]
        self.deadlines.start()
        if not self._heartbeat.keeps_leases:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="sonamu-heartbeat"))
        logger.info(
            "worker %s started: concurrency %d, workflows %s",
            self.id,
            self.options.concurrency,
            ", ".join(f"{n}@{v}" for n, v in self.registry.keys()) or "(none)",
        )

    async def registry_changed(self) -> None:
        """Publish the new set of workflows (after synchronize) and look for their runs."""
        await until_available(lambda: self.backend.register_worker(self._record()), what="register worker")
        self.wake()

    # wake-ups

    def wake(self) -> None:
        self._more_due = True
        self._wake.set()

    def notify_available(self, run_id: str | None = None, workflow_name: str | None = None) -> None:
        """A notification said a run became claimable; claim after `listen_delay`. The notification of one new
        run (`run_id`, of `workflow_name`) is taken by its id at once when this worker registers the workflow,
        a slot is free, and it has nothing else due."""
        if not self.options.use_pub_sub:
            return
        if self.options.listen_delay > 0:
            self.wake_in(self.options.listen_delay / 1000)
        elif (
            run_id is not None
            and self._caught_up()
            and any(definition.name == workflow_name for definition in self.registry)
            and self.reserve_slot()
        ):
            task = asyncio.create_task(self._take(run_id), name=f"take {run_id}")
            self._takes.add(task)
            task.add_done_callback(self._takes.discard)
        else:
            self.wake()

    def _caught_up(self) -> bool:
        """Nothing is due here that a claim would take before a new run: the last claim took every due run
        (it came back short), nothing woke the claim loop since, and no claim is in flight. A run taken by its
        id then passes no older run over (FIFO), and a claim would cost several statements to find it alone."""
        return not (self._more_due or self._starved or self._claiming or self._stopping)

    async def _take(self, run_id: str) -> None:
        """Take one newly notified run by its id (take_run); otherwise a claim looks, as for any notification
        (the run's queue has limits, it is not due yet, or another worker took it)."""
        claimed: ClaimedRun | None = None
        definitions, workflows, queues = self._served()
        try:
            began = time.perf_counter()
            claimed = await self.backend.take_run(self.id, run_id, workflows, self._lease, queues)
            if self.telemetry.enabled:
                taken = [] if claimed is None else [(claimed.workflow_name, False)]
                self.telemetry.claimed(time.perf_counter() - began, taken)
        except Exception:
            # The claim woken below fails the same way, and says so once per episode of failures.
            logger.debug("taking notified run %s failed; claiming instead", run_id, exc_info=True)
        finally:
            self._unreserve()
        if claimed is None:
            self.wake()
        else:
            self._start(claimed, definitions[(claimed.workflow_name, claimed.version)])

    def notify_woken(self) -> None:
        """A notification said a waiting run was woken (a message, an event, its child's end): claim at once.
        `listen_delay` batches the claims of new runs under load; a woken run is one run promised to resume
        within milliseconds."""
        if self.options.use_pub_sub:
            self.wake()

    def wake_in(self, seconds: float) -> None:
        """Look for due runs in `seconds` (a retry or wake-up this worker scheduled). One timer, for the
        earliest: after it fires, the claim loop asks the database when the next run is due, so 10,000
        sleeping runs cost no timers."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, seconds)
        if self._timer is not None and not self._timer.cancelled() and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self.wake()

    # runs started in this process, claimed as they are inserted

    def serves(self, queue: str | None) -> bool:
        """Whether this worker claims runs of `queue` (None: a queue not known here)."""
        return queue is not None and queue in served_queues(self.options.queues, self.registry)

    def reserve_slot(self) -> bool:
        """Promise a slot to a run this process is about to insert already claimed; False when full."""
        if self._stopping or len(self._active) + self._reserved + self._claiming >= self.options.concurrency:
            return False
        self._reserved += 1
        self._unreserved.clear()
        return True

    def release_slot(self, claimed: ClaimedRun | None, definition: WorkflowDefinition[Any, Any]) -> None:
        """Redeem a reserved slot: start the run claimed at insertion (None: it was not inserted)."""
        self._unreserve()
        if claimed is not None:
            self._start(claimed, definition)

    def _unreserve(self) -> None:
        self._reserved -= 1
        if not self._reserved:
            self._unreserved.set()

    def _served(self) -> tuple[dict[tuple[str, str], WorkflowDefinition[Any, Any]], list[tuple[str, str]], list[str]]:
        """A snapshot of what this worker serves, for one claim or take: its definitions by (name, version), those
        keys sorted, and its queues. A synchronize() while the statement is in flight must not orphan the runs
        it takes."""
        definitions = {definition.key: definition for definition in self.registry}
        return definitions, sorted(definitions), served_queues(self.options.queues, definitions.values())

    @property
    def lease(self) -> timedelta:
        return self._lease

    def run_requested(self, run_id: str) -> None:
        """A cancel or pause was asked for a run: the attempt holding it stops at its next step boundary."""
        for _, attempt in self._active.values():
            if attempt.claimed.id == run_id:
                attempt.request_stop()

    # AttemptHooks

    def draining(self) -> bool:
        return self._draining

    def lease_may_be_lost(self, lease_token: str) -> bool:
        return self.leases.may_be_lost(lease_token)

    def runs_created(self) -> None:
        self.wake()

    def run_changed(self, run_id: str) -> None:
        if self._on_finished is not None:
            self._on_finished(run_id, None)  # wakes this process's waiters on the run; they read again

    def finished(self, run_id: str, output_json: str | None) -> None:
        """A run left this worker (with its stored output if it completed): wake the waiters of this process."""
        if self._on_finished is not None:
            self._on_finished(run_id, output_json)

    def _failed_overdue(self, runs: Sequence[OverdueRun]) -> None:
        """Runs failed past their deadline: this process's result() waiters read them now, and a parent one of them
        woke is looked for at once (SQLite has no notification to say so)."""
        for run in runs:
            self.finished(run.id, None)
        if any(run.parent_id is not None for run in runs):
            self.wake()

    # loops

    async def _claim_loop(self) -> None:
        backoff = 0.05
        failures = FailureEpisodes(
            logger,
            "claim failed (%s); retrying with backoff up to 5s, said again only when claims go through",
            "claims go through again, after %.1fs of failures",
        )
        while not self._stopping:
            self._wake.clear()
            timeout = self._poll_s
            free = self.options.concurrency - len(self._active) - self._reserved
            if free > 0:
                definitions, workflows, queues = self._served()
                if len(queues) > 1:
                    # The first queue is served first: a different one each claim, so none starves another.
                    self._claims += 1
                    turn = self._claims % len(queues)
                    queues = queues[turn:] + queues[:turn]
                # At most half the slots per claim: runs claimed together move in lockstep (their steps and
                # checkpoints batch together), and two cohorts let PostgreSQL commit one while the event loop
                # runs the other, instead of each waiting for the other in turn.
                limit = min(free, max(1, self.options.concurrency // 2))
                try:
                    began = time.perf_counter()
                    # Hold the claim's slots while it is in flight: a run() of this process inserting its run
                    # already claimed meanwhile must not take them too (concurrency 2 ran 3 at once).
                    self._claiming = limit
                    try:
                        # Never a run this worker executes: its lease only looks expired when a heartbeat is late.
                        claimed = await self.backend.claim_runs(
                            self.id, workflows, limit, self._lease, queues, held=self._held()
                        )
                    finally:
                        self._claiming = 0
                    if self.telemetry.enabled:
                        taken = [(run.workflow_name, run.taken_over) for run in claimed]
                        self.telemetry.claimed(time.perf_counter() - began, taken)
                    # Start them before anything else: the next due time can be asked while they run.
                    for run in claimed:
                        self._start(run, definitions[(run.workflow_name, run.version)], publish=False)
                    self._more_due = len(claimed) == limit
                    if claimed:
                        self._heartbeat.publish(self._held())  # once for the cohort, before any of them runs
                        # Said before their attempts say anything (they start at the sleep below).
                        if taken_over := [run for run in claimed if run.taken_over]:
                            _log_take_overs(self.id, taken_over)
                        # Let them reach their first step before this loop asks the database anything more
                        # (the question below would otherwise go first, delaying every start by its send).
                        await asyncio.sleep(0)
                    if not self._more_due:
                        due = await self.backend.seconds_until_due(workflows, queues, held=self._held())
                        self._starved = due is not None and due <= 0 and not claimed
                        if self._starved:
                            # Due but not claimed: a row lock made the claim skip it (another worker's claim,
                            # a result() asking to be notified, a cancel), or the queue's limits are full. A
                            # lock lasts about one commit: look again at once (a result() watch just after the
                            # insert takes the row for microseconds, as the claim arrives), then after 1 ms, 2,
                            # 4 ... Past a few looks the queue is full: a slot frees when a run ends, which wakes
                            # this loop at once when the run was this worker's, or when a lease expires, so the
                            # looks slow down to one a second (they were 20 a second, each worker, for as long
                            # as the queue stayed full).
                            timeout = min(timeout, self._look_again_s)
                            self._look_again_s = min(max(self._look_again_s * 2, 0.001), STARVED_LOOK_MAX_S)
                        elif due is not None:
                            timeout = min(timeout, max(due, 0.001))
                        if not self._starved:
                            self._look_again_s = 0.0
                    backoff = 0.05
                    failures.succeeded()
                except Exception as error:
                    # Said once per episode (a database refusing writes fails every claim), with the traceback
                    # if it is not an outage.
                    failures.failed(str(error), exc_info=not isinstance(error, BackendUnavailable))
                    # Wait the backoff out whatever wakes the loop (a notification, a run ending): it spun 700-900
                    # times a second on a claim that failed at once, as a wake or a full earlier claim made it
                    # claim again without waiting.
                    self._more_due = False
                    resume_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, 5.0)
                    while not self._stopping and (left := resume_at - time.monotonic()) > 0:
                        self._wake.clear()
                        await wait_for_event(self._wake, left)
                    continue
                if self._more_due and len(self._active) < self.options.concurrency:
                    continue
            await wait_for_event(self._wake, timeout)

    def _start(self, claimed: ClaimedRun, definition: WorkflowDefinition[Any, Any], *, publish: bool = True) -> None:
        """Start an attempt. The heartbeat thread must see the run before its first step can block the loop:
        `publish` now, or the caller publishes once for the runs it started together."""
        self.leases.kept([claimed.lease_token], time.monotonic())  # just claimed: the lease starts about now
        attempt = Attempt(self.backend, definition, claimed, self)
        task = asyncio.create_task(self._run(attempt), name=claimed.id)
        self._active[claimed.lease_token] = (task, attempt)
        if publish:
            self._heartbeat.publish(self._held())

    async def _run(self, attempt: Attempt) -> None:
        try:
            await attempt.execute()
        finally:
            # The slot is free and the run has left this worker (finished, parked, handed back, or taken):
            # waiters in this process re-read it now.
            self._active.pop(attempt.claimed.lease_token, None)
            self.leases.forget(attempt.claimed.lease_token)
            self._publish_soon()
            if (self._more_due or self._starved) and not self._stopping:
                # A slot of this worker, and perhaps of a full queue, is free: look now, and should a row lock
                # (a result() watch on the next run, say) make that claim skip it, again within milliseconds.
                self._look_again_s = 0.0
                self._wake.set()
            self.finished(attempt.claimed.id, attempt.output_json)

    def _held(self) -> Held:
        return tuple((attempt.claimed.id, token) for token, (_, attempt) in self._active.items())

    def _publish_soon(self) -> None:
        """Runs left: one new snapshot for the heartbeat thread once this loop iteration is done, not one per run
        (a group commit ends a cohort at once; rebuilding the snapshot per run cost a tenth of the worker's CPU
        at concurrency 128). Until then the thread may extend a lease the worker let go: the database refuses
        it, as it refuses any write under a token that no longer holds the run."""
        if not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_soon(self._publish_now)

    def _publish_now(self) -> None:
        self._publish_pending = False
        self._heartbeat.publish(self._held())

    async def _heartbeat_loop(self) -> None:
        """Heartbeats from the event loop: only for a backend the heartbeat thread cannot build again."""
        failures = heartbeat_failures()
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            held = self._held()
            sent = time.monotonic()
            try:
                still_held = await self.backend.heartbeat(self.id, held, self._lease)
            except BackendUnavailable as error:
                failures.failed(str(error))
                continue
            except Exception:
                logger.exception("heartbeat failed unexpectedly")
                continue
            failures.succeeded()
            self.leases.kept(still_held, sent)
            self._heard(held, still_held)

    def _heard(self, held: Held, still_held: dict[str, str | None]) -> None:
        """Act on a heartbeat's answer (on the loop; from the heartbeat thread it may come late, after a block)."""
        for run_id, token in held:
            entry = self._active.get(token)
            if entry is not None and still_held.get(token):
                entry[1].request_stop()  # a cancel or pause whose notification did not reach us
            # An attempt that is ending (parking, completing, failing) left its lease by itself between the
            # heartbeat's snapshot and its write; its own writes are fenced, so only a live one is stopped.
            if token not in still_held and entry is not None and not entry[0].done() and not entry[1].ending:
                # Another worker took it over (we stalled past the lease): stop wasting work on it.
                logger.warning("lost the lease of run %s; stopping its attempt", run_id)
                entry[1].abandon("lease_lost")
                entry[0].cancel()

    async def _backlog_loop(self) -> None:
        """Keep the backlog gauges fresh (one grouped read of the claim index every BACKLOG_EVERY_S)."""
        while True:
            try:
                self.telemetry.backlog(await self.backend.due_backlog())
            except Exception as error:  # not a dead loop: the next read may go through
                # Left out rather than shown as they were: an outage's scrapes must not read a backlog that
                # stopped moving as if it were current (the dashboard's /metrics does the same).
                self.telemetry.backlog_unknown()
                logger.debug("backlog metrics not refreshed: %r", error)
            await asyncio.sleep(BACKLOG_EVERY_S)

    # shutdown

    async def stop(self) -> None:
        """Stop claiming, let running steps finish within the grace period, hand back what remains."""
        self._stopping = self._draining = True
        self._wake.set()
        if self._metrics_task is not None:
            await cancel_and_wait(self._metrics_task)
        await self.deadlines.stop()
        if self._timer is not None:
            self._timer.cancel()
        claim_loop, heartbeat_loop = self._tasks[:1], self._tasks[1:]  # the heartbeat loop: only without the thread
        for task in claim_loop:
            # A claim takes milliseconds; one still waiting after CLAIM_STOP_S waits for a connection the database
            # does not give (an outage: the pool waits 30 s) and must not hold the shutdown past its grace. Runs
            # a claim cut short may have taken are taken over when their leases expire.
            await stop_gently(task, timeout=CLAIM_STOP_S)
        # One statement each, bounded as the claim is, and together: a shutdown during an outage waits
        # CLAIM_STOP_S once, not once per take.
        await asyncio.gather(*(stop_gently(task, timeout=CLAIM_STOP_S) for task in list(self._takes)))
        grace = self.options.shutdown_grace_ms / 1000
        if not self._unreserved.is_set():
            # run() calls of this process inserting their runs already claimed: let them land (their attempts
            # then count among the running below) rather than close the connections under them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unreserved.wait(), grace)
        running = [task for task, _ in self._active.values()]
        if running:
            logger.info(
                "waiting up to %.1fs for %d running step(s)",
                self.options.shutdown_grace_ms / 1000,
                len(running),
            )
            await asyncio.wait(running, timeout=self.options.shutdown_grace_ms / 1000)
        leftover = [(attempt.claimed.id, token, task) for token, (task, attempt) in self._active.items()]
        for _, attempt in self._active.values():
            attempt.abandon("handed_back")
        for _, _, task in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*(task for _, _, task in leftover), return_exceptions=True)
            held = [(run_id, token) for run_id, token, _ in leftover]
            try:
                await until_available(lambda: self.backend.release_runs(held), what="release runs", give_up_after_s=5)
                logger.info("handed back %d run(s) still in a step after the grace period", len(held))
            except BackendUnavailable:
                logger.warning("could not hand back %d run(s); they are taken over when their leases expire", len(held))
        for task in heartbeat_loop:
            await cancel_and_wait(task)
        # After the hand-back: the leases of the runs still finishing their step are kept until then.
        await self._heartbeat.stop()
        with contextlib.suppress(BackendUnavailable):
            await until_available(
                lambda: self.backend.remove_worker(self.id), what="deregister worker", give_up_after_s=2
            )
        self.threads.shutdown(wait=False, cancel_futures=True)
        logger.info("worker %s stopped", self.id)

    def _record(self) -> WorkerRecord:
        now = datetime.now(UTC)
        return WorkerRecord(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            workflows=self.registry.keys(),
            concurrency=self.options.concurrency,
            started_at=now,
            heartbeat_at=now,
            queues=served_queues(self.options.queues, self.registry),
        )


def _log_take_overs(worker_id: str, runs: Sequence[ClaimedRun]) -> None:
    """Say which runs a claim took over and from whom, at WARNING as a lost lease is: their worker died, stalled
    or lost the database, or an earlier attempt of this worker left the run and its lease ran out. One line per
    run up to TAKE_OVERS_LOGGED_PER_CLAIM, then one line for the rest of the claim, counted by previous worker
    (each still logged at DEBUG): a worker that died holding 500 runs does not flood the log."""
    for index, run in enumerate(runs):
        assert run.lease_expired_at is not None  # a take-over, by the claim's own account
        attempt = run.attempts + 1
        what = f"run {run.id} ({run.workflow_name}@{run.version}, attempt {attempt}, take-over {run.recoveries})"
        ago = (run.claimed_at - run.lease_expired_at).total_seconds()
        expired = run.lease_expired_at.isoformat(timespec="milliseconds")
        if run.taken_from == worker_id:
            # Not "another worker died": no other worker was involved.
            message = (
                "worker %s took back %s, which it held itself: the lease ran out %.1fs ago (at %s) with no "
                "heartbeat getting through (a database outage or a blocked event loop outlasted it), and the "
                "attempt here stopped; no other worker was involved. The run replays from its checkpoints"
            )
            args: tuple[object, ...] = (worker_id, what, ago, expired)
        else:
            message = (
                "worker %s took over %s from worker %s, whose lease ran out %.1fs ago (at %s): that worker died, "
                "stalled or lost the database. The run replays from its checkpoints; a step it had started and not "
                "checkpointed runs again"
            )
            args = (worker_id, what, run.taken_from or "(unknown)", ago, expired)
        logger.log(
            logging.WARNING if index < TAKE_OVERS_LOGGED_PER_CLAIM else logging.DEBUG,
            message,
            *args,
            extra={
                "run_id": run.id,
                "workflow": run.workflow_name,
                "version": run.version,
                "attempt": attempt,
                "recoveries": run.recoveries,
                "taken_from": run.taken_from,
                "lease_expired_at": run.lease_expired_at.isoformat(),
            },
        )
    rest = runs[TAKE_OVERS_LOGGED_PER_CLAIM:]
    if rest:
        holders = Counter(run.taken_from or "(unknown)" for run in rest)
        logger.warning(
            "worker %s took over %d more run(s) in the same claim, from %s (each logged at DEBUG)",
            worker_id,
            len(rest),
            ", ".join(f"worker {holder} ({count})" for holder, count in holders.most_common()),
            extra={"taken_over": len(rest), "previous_holders": dict(holders)},
        )
