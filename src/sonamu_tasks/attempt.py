"""One attempt of one claimed run: replay checkpoints, execute new steps, record the outcome.

Steps may run concurrently (`asyncio.gather`, `step.map`): each completed step gets its own checkpoint, sent
at once and stored before anything durable that follows (the next step to start, a park, a failure, a stop),
or written with the completion when the workflow returns right after it. A durable wait (a sleep, a child's
result) blocks its branch; once no step is executing and every branch has ended or is waiting, the run parks
with all its waits and the workflow function unwinds. It wakes when the earliest wait is satisfied and replays.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from . import serde
from .backends.base import (
    CANCELED_ERROR,
    FOREVER,
    Backend,
    Checkpoint,
    ChildOutcome,
    ClaimedRun,
    LeaseLost,
    StepRecord,
    TimedWait,
)
from .definition import WorkflowDefinition
from .duration import Duration, parse_duration
from .errors import (
    ChildWorkflowFailed,
    InvalidInput,
    NonRetryableError,
    SerializationError,
    StepNameConflict,
    StepTimeout,
    StorageError,
)
from .limits import MAX_ERROR_MESSAGE_LENGTH, storable_text
from .log import ATTEMPT_LOGGER, RunLogger, current_step
from .reconnect import until_available
from .registry import Registry
from .retry import RetryDecision, RetryPolicy
from .run_creation import RunOptions, child_run_id, prepare_run
from .status import RunStatus, StepStatus
from .step import NO_OPTIONS, StepOptions, StepWrapper
from .telemetry import AttemptOutcome, Telemetry
from .threads import StepThreads

if typing.TYPE_CHECKING:
    from .manager import WorkflowManager

logger = logging.getLogger("sonamu_tasks.attempt")


class Suspended(BaseException):
    """The run parked itself (durable sleep); unwinds the workflow function. Not an error."""


class Released(BaseException):
    """The worker is shutting down: the run is handed back at this step boundary. Not an error."""


class Stopped(BaseException):
    """A cancel or pause was honoured at this step boundary. Not an error."""


class StopRequested(BaseException):
    """A cancel or pause reached a step boundary: unwinds the workflow so the attempt can honour it."""


@dataclasses.dataclass
class _Wait:
    """A durable wait a branch of the workflow is blocked on; the future only ever ends it with an exception
    (Suspended once the run parked, or what stopped the attempt)."""

    future: asyncio.Future[None]
    timed: TimedWait | None = None
    child: str | None = None
    since: datetime | None = None
    """When the workflow called a timed wait (hooks.now()): a new wait's duration counts from then."""


class RecoveryLimitExceeded(NonRetryableError):
    pass


class DeadlineExceeded(NonRetryableError):
    pass


class AttemptHooks(typing.Protocol):
    """What the worker offers an attempt."""

    threads: StepThreads
    registry: Registry
    manager: WorkflowManager
    telemetry: Telemetry
    max_recoveries: int
    context_provider: Callable[[dict[str, Any]], Any] | None

    @property
    def step_mocks(self) -> Mapping[str, Callable[..., Any]]:
        """Stand-ins by step name (`testing.WorkflowTestEnv.mock_step`)."""
        ...

    def draining(self) -> bool: ...
    def lease_may_be_lost(self, lease_token: str) -> bool:
        """No heartbeat extended the lease for about as long as it lasts: another worker may own the run."""
        ...

    def wake_in(self, seconds: float) -> None: ...
    def now(self) -> datetime:
        """The time the backend's transactions read."""
        ...

    def runs_created(self) -> None:
        """Runs were inserted (children): look for claimable ones now, not at the next notification."""
        ...

    def run_changed(self, run_id: str) -> None:
        """The run published an event: readers waiting in this process look again."""
        ...


class Attempt:
    def __init__(
        self,
        backend: Backend,
        definition: WorkflowDefinition[Any, Any],
        claimed: ClaimedRun,
        hooks: AttemptHooks,
    ) -> None:
        self.backend = backend
        self.definition = definition
        self.claimed = claimed
        self.hooks = hooks
        self.logger = RunLogger(claimed.id, definition.name, definition.version, ATTEMPT_LOGGER)
        # Quiet while replaying. A flag, not a callback into the attempt: no reference cycle, so a finished
        # attempt is freed at once instead of by the cyclic garbage collector.
        self.workflow_logger = RunLogger(claimed.id, definition.name, definition.version)
        self._replays_left = 0
        self._stop_requested = claimed.requested_action is not None
        self.steps: dict[str, StepRecord] = {}
        self._seen: set[str] = set()
        # The steps that raised in this attempt: name, start, the error, its own retry policy if any. Several
        # when gathered steps fail together; the one whose error ends the workflow decides the retry.
        self._failed_steps: list[tuple[str, datetime, BaseException, RetryPolicy | None]] = []
        self._noted_at_steps: list[tuple[str, BaseException]] = []  # see _step_failed
        self._claimed_monotonic = time.monotonic()
        self.output_json: str | None = None
        """The stored output, once this attempt completed the run."""
        # Checkpoints of completed steps not yet handed to the backend: sent from the event loop's next turn,
        # or with the completion when the workflow returns first.
        self._unsent: list[Checkpoint] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._executing = 0  # steps between their start and their checkpoint being queued
        self._idle = asyncio.Event()  # set while no step is executing
        self._idle.set()
        self._waits: list[_Wait] = []
        self._park_check: asyncio.Task[None] | None = None
        self._workflow_task: asyncio.Task[Any] | None = None
        self._closed = False  # the attempt is ending (parked, failing, stopping): no new step starts
        self._lease_lost = False  # a write was refused: another worker owns the run now
        self._own_policy_steps: set[str] = set()  # steps met with a retry policy of their own
        # The sync steps handed to the thread pool and not finished: those not started yet are cancelled when
        # the attempt ends, so that no step starts after it (a branch left running, a queue behind other steps).
        self._submitted: set[concurrent.futures.Future[Any]] = set()
        self._parked = False
        self._children: dict[str, ChildOutcome] | None = None
        self._children_read: asyncio.Future[dict[str, ChildOutcome]] | None = None
        self._seen_outcomes: set[str] = set()  # fan-out children whose recorded outcome this replay read
        self._published: dict[str, int] = {}  # set_event calls per key, which name their step records
        self._outcome: AttemptOutcome | None = None

    @property
    def ending(self) -> bool:
        """The attempt is winding down (parked, completing, failing, stopping): it starts no new step."""
        return self._closed

    def request_stop(self) -> None:
        """A cancel or pause was asked for: honour it at the next step boundary."""
        self._stop_requested = True

    # the workflow, start to outcome

    async def execute(self) -> None:
        run = self.claimed
        telemetry = self.hooks.telemetry
        if not telemetry.enabled:
            await self._execute()
            return
        first = run.first_claim
        with telemetry.attempt(
            run.id, run.workflow_name, run.version, run.attempts + 1, run.trace_context, first
        ) as self._outcome:
            await self._execute()

    def abandon(self, how: str) -> None:
        """The worker is about to cancel this attempt's task: `how` is what its span and metrics say
        ("lease_lost": another worker took the run; "handed_back": still in a step after the shutdown grace)."""
        if how == "lease_lost":
            self._lost()
        self._ended(how)

    def _ended(self, how: str, error: BaseException | None = None) -> None:
        """How the attempt ended (and what failed it), for its span and metrics."""
        if self._outcome is not None:
            self._outcome.value = how
            self._outcome.error = error

    async def _execute(self) -> None:
        run = self.claimed
        try:
            if run.recoveries > self.hooks.max_recoveries:
                raise RecoveryLimitExceeded(
                    f"run {run.id} was taken over {run.recoveries} times after its worker stopped "
                    f"heartbeating (limit {self.hooks.max_recoveries}); it probably kills its workers "
                    "(out of memory, a crash in native code); fix the cause, then retry it"
                )
            if run.deadline_at is not None and run.deadline_at <= run.claimed_at:
                raise DeadlineExceeded(f"deadline exceeded: run {run.id} was due by {run.deadline_at.isoformat()}")
            if self._stop_requested:  # asked while its previous worker held it
                await self._honour_request()
            if not run.first_claim:
                self.steps = await until_available(lambda: self.backend.load_steps(run.id), what="load checkpoints")
                # The code up to every recorded step (a failed one included) ran before: replay it quietly.
                self._replays_left = len(self.steps)
                self.workflow_logger.quiet = self._replays_left > 0
            output = await self._call_workflow()
            if self._parked:  # the workflow swallowed its Suspended (return_exceptions=True, say): still parked
                return
            encoded = serde.dumps(output, what=f"the output of workflow {self.definition.name!r}")
            await self._wind_down(send=False)
            last, self._unsent = self._unsent, []
            await self._settle()
            await until_available(
                lambda: self.backend.complete_run(run.id, run.lease_token, encoded, last), what="complete run"
            )
            self.output_json = encoded
            self._ended("completed")
        except (Suspended, Stopped) as ended:
            self._ended("parked" if self._parked else "stopped" if isinstance(ended, Stopped) else "suspended")
            if not self._parked:
                await self._wind_down(send=False)
        except Released:
            self._ended("handed_back")
            await self._wind_down(send=True)
            held = [(run.id, run.lease_token)]
            await until_available(lambda: self.backend.release_runs(held), what="hand back run", give_up_after_s=5)
            self.logger.info("handed back at a step boundary: this worker is shutting down")
        except StopRequested:
            self._ended("stopped")
            try:
                await self._wind_down(send=True)
                await self._honour_request()
            except Stopped:
                pass
            except LeaseLost:
                self.logger.warning("lease lost while stopping: its lease ran out or another worker took the run")
            else:  # the request was withdrawn meanwhile (resumed): hand the run back to be replayed
                held = [(run.id, run.lease_token)]
                await until_available(lambda: self.backend.release_runs(held), what="hand back run")
        except LeaseLost:
            self._lost()
            self._ended("lease_lost")
            # Not "another worker took it": a lease that ran out during an outage may have been claimed again by
            # this very worker (a new claim, a new attempt).
            self.logger.warning("lease lost: its lease ran out or another worker took the run; this attempt stops")
        except Exception as error:
            try:
                await self._record_failure(error)
            except LeaseLost:
                self.logger.warning("lease lost before the failure could be recorded; the new owner decides")

    async def _call_workflow(self) -> Any:
        arguments: dict[str, Any] = {}
        for parameter in self.definition.parameters:
            if parameter == "input":
                arguments["input"] = self.definition.validate_input(self.claimed.input)
            elif parameter == "step":
                arguments["step"] = StepWrapper(self)
            elif parameter == "logger":
                arguments["logger"] = self.workflow_logger
            elif parameter == "version":
                arguments["version"] = self.definition.version
            elif parameter == "context":
                arguments["context"] = await self._context()
        self._workflow_task = asyncio.current_task()
        try:
            return await self.definition.fn(**arguments)
        except asyncio.CancelledError as error:
            raise _own_cancellation(error, f"workflow {self.definition.name!r}") from error

    async def _context(self) -> Any:
        default = {
            "run_id": self.claimed.id,
            "workflow": self.definition.name,
            "version": self.definition.version,
            "attempt": self.claimed.attempts + 1,
        }
        provider = self.hooks.context_provider
        if provider is None:
            return default
        context = provider(default)
        return await context if inspect.isawaitable(context) else context

    async def _record_failure(self, error: Exception) -> None:
        # Steps still executing in other branches finish and are stored first: they completed, they stay so.
        await self._wind_down(send=True)
        run = self.claimed
        step = None
        # The workflow's budget: the run's failed attempts, less those a step's own policy counted.
        policy, attempt = self.definition.retry_policy, max(1, run.attempts - self._counted_by_step_policies() + 1)
        failed = self._failed_step(error)
        if failed is not None:
            name, started, _, step_policy = failed
            step = (name, started)
            if step_policy is not None:  # the step's own policy counts the step's own failures
                previous = self.steps.get(name)
                failures = previous.attempts if previous is not None and previous.status is StepStatus.FAILED else 0
                policy, attempt = step_policy, failures + 1
        named = step[0] if step else self._step_noted(error)
        stored = serde.encode_error(error, step=named)
        try:
            decision = policy.decide(error, attempt)
        except Exception as policy_error:
            stored["message"] += f" (and the retry policy itself raised {policy_error!r}, so no retry)"
            decision = RetryDecision(should_retry=False)
        delay = timedelta(milliseconds=decision.delay_ms)
        if decision.should_retry and run.deadline_at is not None and self._db_now() + delay >= run.deadline_at:
            # A DeadlineExceeded, as a run failed by the claim or the sweeper at its deadline is (what lists
            # and alerts group by); the error that ended the last attempt is in the message.
            last = f"{stored['type']}: {stored['message']}"
            stored["type"] = "DeadlineExceeded"
            stored["message"] = f"deadline exceeded before the next attempt; last error: {last}"
            decision = RetryDecision(should_retry=False)
        retry_delay = delay if decision.should_retry else None
        stored["message"] = storable_text(stored["message"], MAX_ERROR_MESSAGE_LENGTH)  # the notes above may add to it
        try:
            status = await until_available(
                lambda: self.backend.fail_attempt(run.id, run.lease_token, stored, step, retry_delay),
                what="record failure",
            )
        except StorageError as storage_error:
            # The failure itself could not be stored (a step name the database refuses, say). It must still be
            # recorded, or the run would sit 'running' until its lease expires and loop through take-overs:
            # store a plain account of it, without the step record, under the same retry decision.
            self.logger.error("recording the failure was refused (%s); recording a plain account of it", storage_error)
            plain = {
                "type": storable_text(str(stored["type"]), 200),
                "message": storable_text(
                    f"{stored['message']} (the full error could not be stored: {storage_error})",
                    MAX_ERROR_MESSAGE_LENGTH,
                ),
            }
            step = None
            status = await until_available(
                lambda: self.backend.fail_attempt(run.id, run.lease_token, plain, None, retry_delay),
                what="record failure",
            )
        if status in (RunStatus.CANCELED, RunStatus.PAUSED):  # asked for during the attempt: no retry is due
            self._ended("stopped", error)
            self.logger.info(
                "attempt %d failed: %s; %s on request instead of retried",
                attempt,
                error,
                status,
                extra={"step": named},
            )
            return
        self._ended("retrying" if retry_delay is not None else "failed", error)
        if retry_delay is not None:
            self.logger.warning(
                "attempt %d failed: %s; retrying in %.3fs",
                attempt,
                error,
                retry_delay.total_seconds(),
                extra={"step": named},
            )
            self.hooks.wake_in(retry_delay.total_seconds())
        else:
            # With its traceback: the last word on a failed run is the line an operator searches the logs for.
            self.logger.error(
                "run failed after %d attempt(s): %r", attempt, error, exc_info=error, extra={"step": named}
            )

    def _counted_by_step_policies(self) -> int:
        """The failed attempts the steps with a retry policy of their own counted (their stored failures): the
        workflow's policy does not count them. Steps are met in order, so every such step that failed before is
        known by the time a later failure is recorded."""
        total = 0
        for name in self._own_policy_steps:
            record = self.steps.get(name)
            if record is not None and record.kind == "call":
                total += record.attempts - (1 if record.status is StepStatus.COMPLETED else 0)
        return total

    # what the StepWrapper calls

    async def run_step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: StepOptions = NO_OPTIONS,
    ) -> Any:
        self._claim_name(name)
        if options.retry_policy is not None:
            self._own_policy_steps.add(name)
        annotation = serde.declared_return(fn)
        record = self.steps.get(name)
        # A step that failed before runs again: the code is past what it ran before from here on.
        self._reached(record if record is not None and record.status is StepStatus.COMPLETED else None)
        if record is not None and record.status is StepStatus.COMPLETED:
            if record.kind != "call":
                raise self._kind_changed(name, record.kind)
            try:
                return serde.decode_output(record.output, annotation, f"the stored result of step {name!r}")
            except SerializationError as error:
                # The code changed since the step ran (its declared type): no retry can help, a fork from the
                # step runs it again.
                raise self._step_failed(
                    name,
                    SerializationError(
                        f"{error} (run {self.claimed.id}, workflow {self.definition.name!r}): the step's declared "
                        f"return type changed since it ran; fork the run from step {name!r} to run it again"
                    ),
                ) from error
        self._enter()
        try:
            await self._settle()  # the steps completed before this one are stored before it starts
            await self._boundary()
            started = datetime.now(UTC)
            token = current_step.set(name)
            telemetry = self.hooks.telemetry
            scope = (
                telemetry.step(
                    self.definition.name, self.definition.version, self.claimed.id, self.claimed.attempts + 1, name
                )
                if telemetry.enabled
                else _NO_SCOPE
            )
            try:
                with scope:
                    result = await self._invoke(
                        name, self.hooks.step_mocks.get(name, fn), args, kwargs, options.timeout
                    )
                what = f"the result of step {name!r} of workflow {self.definition.name!r}"
                encoded = serde.dumps(result, what=what)
                # The workflow gets what a replay would read back: the value after a JSON round trip (a tuple
                # comes back a list, a dict's keys in jsonb's order, 1e16 an int). Other scalars come back as
                # they went. Decoded before the checkpoint is queued: a value that does not fit the declared
                # type fails the step, never stored to fail every replay (and a retry) after it.
                stored = result if type(result) in _JSON_SCALARS else serde.loads(encoded)
                value = serde.decode_output(stored, annotation, what)
            except Exception as error:
                self._failed_steps.append((name, started, error, options.retry_policy))
                raise
            finally:
                current_step.reset(token)
            # Not awaited here: if the workflow returns right after this step, the checkpoint is written with
            # the completion, in one commit. Otherwise it is sent from the event loop's next turn and awaited
            # before anything else durable happens (see _settle). Either way nothing after this step starts
            # before it is stored.
            self._unsent.append(Checkpoint(name, encoded, started, datetime.now(UTC)))
            asyncio.get_running_loop().call_soon(self._send_unsent)
        finally:
            self._leave()
        return value

    async def sleep(self, name: str, duration: Duration) -> None:
        delta = parse_duration(duration, what=f"step.sleep({name!r}) in workflow {self.definition.name!r}")
        self._claim_name(name)
        run = self.claimed
        record = self.steps.get(name)
        wake_at = None
        self._reached(record)
        if record is not None:
            if record.kind != "sleep":
                raise self._kind_changed(name, record.kind)
            if record.status is StepStatus.COMPLETED:
                return
            if record.wake_at is not None and record.wake_at <= self._db_now():
                self._enter()
                try:
                    await self._settle()
                    await until_available(
                        lambda: self.backend.complete_sleep(run.id, run.lease_token, name), what="wake up"
                    )
                finally:
                    self._leave()
                return
            wake_at = record.wake_at  # woken early (resumed, or by another wait): sleep on until the original time
        sleep = TimedWait(name, "sleep", datetime.now(UTC), None if wake_at is not None else delta, wake_at)
        await self._block(_Wait(asyncio.get_running_loop().create_future(), timed=sleep, since=self.hooks.now()))

    async def receive(self, name: str, topic: str, timeout: Duration | None) -> Any:
        """The oldest unconsumed message of `topic`, consumed and checkpointed in one transaction; a durable
        wait until one arrives; None after `timeout`."""
        delta = None if timeout is None else parse_duration(timeout, what=f"step.receive({name!r}) timeout")
        run = self.claimed

        def take(started: datetime) -> Awaitable[tuple[bool, Any]]:
            return self.backend.take_message(run.id, run.lease_token, name, topic, started)

        return await self._wait_for_arrival(name, "receive", {"topic": topic}, delta, take)

    async def wait_for_event(self, name: str, event: str, key: str, timeout: Duration | None) -> Any:
        """The first `event` with `key` emitted since the run was created; a durable wait until one is;
        None after `timeout`."""
        delta = None if timeout is None else parse_duration(timeout, what=f"step.wait_for_event({name!r}) timeout")
        run = self.claimed

        def take(started: datetime) -> Awaitable[tuple[bool, Any]]:
            return self.backend.take_event(run.id, run.lease_token, name, event, key, started)

        return await self._wait_for_arrival(name, "event", {"event": event, "key": key}, delta, take)

    async def _wait_for_arrival(
        self,
        name: str,
        kind: str,
        waits_for: dict[str, Any],
        timeout: timedelta | None,
        take: Callable[[datetime], Awaitable[tuple[bool, Any]]],
    ) -> Any:
        called = self.hooks.now()
        self._claim_name(name)
        run = self.claimed
        record = self.steps.get(name)
        self._reached(record)
        if record is not None:
            if record.kind != kind:
                raise self._kind_changed(name, record.kind)
            if record.status is StepStatus.COMPLETED:
                return record.output
        started = record.started_at if record is not None and record.started_at is not None else datetime.now(UTC)
        wake_at = record.wake_at if record is not None else None
        self._enter()
        try:
            await self._settle()
            await self._boundary()
            taken, value = await until_available(lambda: take(started), what=f"{kind} {name!r}")
            if not taken and wake_at is not None and wake_at <= self._db_now():  # timed out: None, recorded
                await until_available(
                    lambda: self.backend.complete_wait(run.id, run.lease_token, name, kind, started, waits_for),
                    what=f"time out {kind} {name!r}",
                )
                taken, value = True, None
        finally:
            self._leave()
        if taken:
            return value
        wait = TimedWait(name, kind, started, timeout if record is None else None, wake_at, waits_for)
        # Parks the run (raises Suspended) once every branch is blocked; the arrival or the timeout wakes it.
        await self._block(_Wait(asyncio.get_running_loop().create_future(), timed=wait, since=called))

    async def set_event(self, key: str, value: Any) -> None:
        """Publish `key` = `value` for readers outside (latest wins), once per call site and run: a replay
        does not write an older value again."""
        count = self._published[key] = self._published.get(key, 0) + 1
        name = f"set_event:{key}:{count}"
        self._claim_name(name)
        self._reached(self.steps.get(name))
        if name in self.steps:
            return
        encoded = serde.dumps(value, what=f"the value of event {key!r} of workflow {self.definition.name!r}")
        run = self.claimed
        self._enter()
        try:
            await self._settle()
            await until_available(
                lambda: self.backend.set_run_event(run.id, run.lease_token, name, key, encoded),
                what=f"set event {key!r}",
            )
        finally:
            self._leave()
        self.hooks.run_changed(run.id)

    async def start_children(
        self,
        name: str,
        children: list[tuple[str, str, WorkflowDefinition[Any, Any] | None, Any]],
        *,
        fan_out: bool,
        detached: bool,
        options: RunOptions | None = None,
    ) -> list[str]:
        """Start child runs in step `name` (one statement); return their ids, the same on every replay.
        `options`: the children's queue, priority and concurrency key."""
        self._claim_name(name)
        child_steps = [f"{name}[{index}]" for index in range(len(children))] if fan_out else [name]
        if fan_out:
            for child_step in child_steps:
                self._claim_name(child_step)
        run = self.claimed
        record = self.steps.get(name)
        self._reached(record)
        if record is not None:
            if record.kind != "child":
                raise self._kind_changed(name, record.kind)
            stored = record.output or {}
            return list(stored["run_ids"]) if fan_out else [stored["run_id"]]
        ids = [child_run_id(run.id, child_step) for child_step in child_steps]
        trace_context = self.hooks.telemetry.caller_context()  # the children join this attempt's trace
        new_runs = []
        for child_id, child_step, (child_name, child_version, definition, child_input) in zip(
            ids, child_steps, children, strict=True
        ):
            where = f"child {child_step!r} of workflow {self.definition.name!r}"
            try:
                new_runs.append(
                    prepare_run(
                        child_name,
                        child_version,
                        definition,
                        child_input,
                        options or RunOptions(),
                        run_id=child_id,
                        parent_id=run.id,
                        parent_step=child_step,
                        detached=detached,
                        what=f"the input of {where}",
                        trace_context=trace_context,
                    )
                )
            except InvalidInput as error:  # which of the children: the schema's problems do not say
                raise InvalidInput(error.workflow, [f"{where}: {problem}" for problem in error.problems]) from error
        output = {"run_ids": ids} if fan_out else {"run_id": ids[0]}
        self._enter()
        try:
            await self._settle()
            await self._boundary()
            started = datetime.now(UTC)
            encoded = serde.dumps(output, what=f"step {name!r}")
            await until_available(
                lambda: self.backend.start_children(run.id, run.lease_token, name, started, encoded, new_runs),
                what=f"start children in step {name!r}",
            )
        finally:
            self._leave()
        if self._children is not None:
            for child_id in ids:
                self._children.setdefault(child_id, ChildOutcome(child_id, RunStatus.PENDING))
        self.hooks.runs_created()
        return ids

    async def child_result(self, child_step: str, child_id: str, workflow_name: str, *, fan_out: bool) -> Any:
        """The outcome of a child: its output, ChildWorkflowFailed, or a durable wait until it finishes. The
        first outcome seen is checkpointed in the parent (step `child_step`), so every replay sees the same."""
        record = self.steps.get(child_step)
        outcome = record.output.get("outcome") if record is not None and isinstance(record.output, dict) else None
        if outcome is None:
            self._enter()  # a read in flight: the run must not park under it
            try:
                children = await self._load_children(child_id)
            finally:
                self._leave()
            child = children.get(child_id)
            if child is None:
                gone = {"message": "the child run is gone"}
                raise self._step_failed(
                    child_step, ChildWorkflowFailed(child_id, workflow_name, "missing", gone, child_step)
                )
            if not child.status.finished:
                # Parks the run (raises Suspended) once every branch is blocked; the child's end wakes it.
                await self._block(_Wait(asyncio.get_running_loop().create_future(), child=child_id))
            outcome = {"status": child.status.value, "output": child.output, "error": child.error}
            stored = {"run_id": child_id, "outcome": outcome}
            now = datetime.now(UTC)
            encoded = serde.dumps(stored, what=f"the outcome of child {child_step!r}")
            self.steps[child_step] = StepRecord(child_step, "child", StepStatus.COMPLETED, stored)
            self._unsent.append(Checkpoint(child_step, encoded, now, now, kind="child"))
            asyncio.get_running_loop().call_soon(self._send_unsent)
        elif fan_out and child_step not in self._seen_outcomes:
            self._seen_outcomes.add(child_step)
            self._replayed()
        if outcome["status"] == RunStatus.COMPLETED.value:
            return outcome["output"]
        failure = ChildWorkflowFailed(child_id, workflow_name, outcome["status"], outcome.get("error"), child_step)
        raise self._step_failed(child_step, failure)  # the parent's error names the step that started the child

    # waits and parking

    async def _block(self, wait: _Wait) -> None:
        """Block this branch on a durable wait until the run parks (then Suspended unwinds it)."""
        if self._closed:
            raise Suspended
        self._waits.append(wait)
        self._check_park()
        try:
            await wait.future
        finally:
            if wait in self._waits:
                self._waits.remove(wait)

    def _enter(self) -> None:
        if not self._closed and self.hooks.lease_may_be_lost(self.claimed.lease_token):
            self.logger.warning("no heartbeat kept the lease for as long as it lasts; this attempt starts no step")
            self._lost()
        if self._closed:
            raise self._unwinding()  # the attempt is ending: this branch unwinds instead of starting a step
        self._executing += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._executing -= 1
        if self._executing == 0:
            self._idle.set()
            self._check_park()

    def _check_park(self) -> None:
        if self._waits and not self._executing and not self._closed and self._park_check is None:
            self._park_check = asyncio.create_task(self._park_when_idle())

    async def _park_when_idle(self) -> None:
        try:
            # A branch whose step just ended resumes on the loop's next turns: let it start its next step or
            # reach its own wait before deciding that every branch is blocked.
            for _ in range(3):
                await asyncio.sleep(0)
            # A gathered branch inside an await that is neither a step nor a durable wait (a call outside a
            # step, an asyncio.sleep) is going on: parking now would hold its next step until a sibling's
            # wait ends (days, for a long receive). Wait for it to reach a step or a wait, within a bound: a
            # branch that waits on something only the durable wait brings would otherwise never let it end.
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + BUSY_BRANCH_GRACE_S
            pause = 0.001
            while True:
                if self._executing or not self._waits or self._closed:
                    return
                if loop.time() >= give_up_at or not self._branch_busy():
                    break
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)
            self._closed = True
            waits = list(self._waits)
            try:
                if self._stop_requested or self.hooks.draining():
                    raise StopRequested if self._stop_requested else Released
                await self._settle()
                await self._park(waits)
            except BaseException as error:
                for wait in waits:
                    if not wait.future.done():
                        wait.future.set_exception(error)
                return
            self._parked = True
            for wait in waits:
                if not wait.future.done():
                    wait.future.set_exception(Suspended())
        finally:
            self._park_check = None

    def _branch_busy(self) -> bool:
        """Whether a branch of asyncio.gather is inside an await the attempt does not see: not a step (none
        is executing when this is asked), not one of its durable waits, not done. Seen through gather's
        futures from the workflow's own task; branches of a TaskGroup or create_task are not seen (the park
        goes ahead, as it always did)."""
        if self._workflow_task is None:
            return False
        waits = {id(wait.future) for wait in self._waits}
        tasks: list[tuple[asyncio.Future[Any], bool]] = [(self._workflow_task, False)]
        while tasks:
            task, gathered = tasks.pop()
            if task.done():
                continue
            waiter = getattr(task, "_fut_waiter", None)  # what the task awaits (None: about to run)
            if waiter is None or waiter.done():
                return gathered
            if id(waiter) in waits:
                continue
            children = getattr(waiter, "_children", None)  # asyncio.gather's own future
            if children is not None:
                tasks.extend((child, True) for child in children)
            elif gathered and isinstance(task, asyncio.Task) and not _awaits_other_tasks(task):
                return True
        return False

    async def _park(self, waits: list[_Wait]) -> None:
        run = self.claimed
        now = self.hooks.now()
        timed = [_counted_from_call(wait.timed, wait.since, now) for wait in waits if wait.timed is not None]
        children = [wait.child for wait in waits if wait.child is not None]
        status, due = await until_available(
            lambda: self.backend.park_run(run.id, run.lease_token, timed, children), what="park run"
        )
        what = ", ".join([*(f"{t.kind} {t.name!r}" for t in timed), *(f"child {c}" for c in children)])
        if status in (RunStatus.CANCELED, RunStatus.PAUSED):  # asked for before the park, not heard of yet
            self.logger.info("%s on request as it parked (%s)", status, what)
        elif due >= FOREVER:
            self.logger.info("waiting for %s", what)
        else:
            self.logger.info("parked until %s (%s)", due.isoformat(), what)
            self.hooks.wake_in(max(0.0, (due - self._db_now()).total_seconds()))

    async def _wind_down(self, *, send: bool) -> None:
        """The attempt ends: no new step starts, executing ones finish, blocked branches unwind, and (`send`)
        every completed step's checkpoint is stored."""
        self._close()
        await self._idle.wait()
        for wait in self._waits:
            if not wait.future.done():
                wait.future.set_exception(Suspended())
        if send:
            await self._settle()

    # helpers

    async def _load_children(self, child_id: str) -> dict[str, ChildOutcome]:
        """The run's children, read once for all the branches asking at the same time (a gather over a
        thousand results is one read, not a thousand); again only for a child started since."""
        if self._children is not None and child_id in self._children:
            return self._children
        if self._children_read is None:
            run_id = self.claimed.id
            self._children_read = asyncio.ensure_future(
                until_available(lambda: self.backend.load_children(run_id), what="read child runs")
            )
        read = self._children_read
        try:
            self._children = await asyncio.shield(read)
        finally:
            if self._children_read is read and read.done():
                self._children_read = None
        return self._children

    def _send_unsent(self) -> None:
        """The workflow did not return right after its step: write the checkpoints now, in the background."""
        checkpoints, self._unsent = self._unsent, []
        for checkpoint in checkpoints:
            task = asyncio.create_task(self._write_checkpoint(checkpoint))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        _retrieve_error(task)

    async def _settle(self) -> None:
        """Wait until every completed step's checkpoint is stored (LeaseLost if the claim was lost meanwhile)."""
        self._send_unsent()
        while self._sending:
            await asyncio.gather(*list(self._sending))

    async def _write_checkpoint(self, checkpoint: Checkpoint) -> None:
        try:
            await self._save(checkpoint)
        except LeaseLost:
            # Written in the background: the other branches must not start a step before the error reaches
            # the workflow (a step.map's next item would, in the same turn of the loop).
            self._lost()
            raise
        except StorageError as error:
            refused = StorageError(
                f"the result of step {checkpoint.name!r} of workflow {self.definition.name!r} could not be stored: "
                f"{error}"
            )
            self._failed_steps.append((checkpoint.name, checkpoint.started_at, refused, None))
            raise refused from error

    async def _save(self, checkpoint: Checkpoint) -> None:
        run = self.claimed
        await until_available(
            lambda: self.backend.save_step(
                run.id,
                run.lease_token,
                checkpoint.name,
                checkpoint.output_json,
                checkpoint.started_at,
                checkpoint.finished_at,
                checkpoint.kind,
            ),
            what=f"checkpoint step {checkpoint.name!r}",
        )

    async def _boundary(self) -> None:
        """Between two steps: where a shutdown hands the run back and a cancel or pause takes effect."""
        if self._stop_requested:
            raise StopRequested
        if self.hooks.draining():
            raise Released

    async def _honour_request(self) -> None:
        run = self.claimed
        self._stop_requested = False
        try:
            status = await until_available(
                lambda: self.backend.settle_request(run.id, run.lease_token, dict(CANCELED_ERROR)), what="stop run"
            )
        except LeaseLost:
            # The request was withdrawn (resumed) before we got here. Had the lease gone instead, the next
            # write would say so.
            return
        self.logger.info("%s on request", status)
        raise Stopped

    def _close(self) -> None:
        """No new step starts: branches unwind at their next step, and the sync steps still queued for a
        thread never run."""
        self._closed = True
        for future in list(self._submitted):
            future.cancel()  # only one not started yet: a running step finishes

    def _unwinding(self) -> BaseException:
        """What a branch of an ending attempt raises as it unwinds: LeaseLost when another worker owns the run."""
        return LeaseLost(self.claimed.id) if self._lease_lost else Suspended()

    def _lost(self) -> None:
        """Another worker owns the run: this attempt starts nothing more (its writes are refused anyway)."""
        self._lease_lost = True
        self._close()

    def _failed_step(self, error: BaseException) -> tuple[str, datetime, BaseException, RetryPolicy | None] | None:
        """The step that raised `error`, the error the workflow ended with: not the last step to fail, which
        may be a gathered sibling that failed while the attempt wound down. For an exception group (a
        TaskGroup), the step of its first error that a step raised."""
        return _first_raised(error, lambda raised: next((f for f in self._failed_steps if f[2] is raised), None))

    def _replayed(self) -> None:
        self._replays_left -= 1
        self.workflow_logger.quiet = self._replays_left > 0

    def _reached(self, record: StepRecord | None) -> None:
        """The code reached a step: one it recorded before (replayed quietly), or one it never had, which ends
        the replay. The workflow's log speaks again there, even when recorded steps were never reached (the
        code changed since they ran: renamed, removed); it stayed silent for the rest of the run before."""
        if record is not None:
            self._replayed()
        elif self._replays_left > 0:
            self._replays_left = 0
            self.workflow_logger.quiet = False

    def _step_failed(self, name: str, error: BaseException) -> BaseException:
        """`error`, noted as raised at step `name`, so the run's stored error names the step. Not a failed
        step: the step's record, if it has one (a checkpoint, a child's outcome), stays as it is."""
        self._noted_at_steps.append((name, error))
        return error

    def _step_noted(self, error: BaseException) -> str | None:
        """The step `_step_failed` noted `error` at; for an exception group (a TaskGroup), its first error's."""
        return _first_raised(error, lambda raised: next((n for n, e in self._noted_at_steps if e is raised), None))

    def _kind_changed(self, name: str, kind: str) -> BaseException:
        return self._step_failed(
            name,
            StepNameConflict(
                f"step {name!r} of workflow {self.definition.name!r} (run {self.claimed.id}) was a {kind} before: "
                "the code changed since it ran, or two kinds of step share the name"
            ),
        )

    def _claim_name(self, name: str) -> None:
        if name in self._seen:
            raise self._step_failed(
                name,
                StepNameConflict(
                    f"workflow {self.definition.name!r} used the step name {name!r} twice in one run; "
                    "step names must be unique within a run (add an index or id to the name in loops)"
                ),
            )
        self._seen.add(name)

    def _db_now(self) -> datetime:
        """The database's clock, read at claim time and advanced locally."""
        return self.claimed.claimed_at + timedelta(seconds=time.monotonic() - self._claimed_monotonic)

    async def _invoke(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: timedelta | None,
    ) -> Any:
        seconds = None if timeout is None else timeout.total_seconds()
        if _is_async(fn):
            return await self._awaited_within(name, lambda: fn(*args, **kwargs), seconds, seconds)
        # Sync steps run in the worker's thread pool so they never block the event loop.
        began = asyncio.get_running_loop().time()
        context = contextvars.copy_context()
        try:
            call = self._unless_lease_lost(context, functools.partial(fn, *args, **kwargs))
            if seconds is None:
                # Cancelled while queued, the wrapped future cancels the work: it never runs.
                result = await asyncio.wrap_future(self._submit(call))
            else:
                result = await self._in_thread_within(name, seconds, call)
        except LeaseLost:  # refused to start in its thread (see _unless_lease_lost): no other step starts either
            self._lost()
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                # Never started: the attempt ended while the step queued for a thread (see _close). The branch
                # unwinds as any branch of an ending attempt does, not as a cancelled task.
                raise self._unwinding() from None
            raise
        if not inspect.isawaitable(result):
            return result
        # A sync function that returned an awaitable (a lambda around an async call, a sync decorator on an
        # async function): awaited here, within what is left of the step's timeout, as an async step is.
        left = None if seconds is None else max(0.0, seconds - (asyncio.get_running_loop().time() - began))
        return await self._awaited_within(name, lambda: result, left, seconds)

    async def _awaited_within(
        self, name: str, awaitable: Callable[[], Any], seconds: float | None, timeout: float | None
    ) -> Any:
        """Await what `awaitable()` gives within `seconds` (StepTimeout naming the step's `timeout`)."""
        try:
            async with asyncio.timeout(seconds) as limit:
                return await awaitable()
        except TimeoutError as error:
            if limit.expired():
                raise self._timed_out(name, timeout) from error
            raise
        except asyncio.CancelledError as error:
            raise _own_cancellation(error, f"step {name!r}") from error

    def _unless_lease_lost(self, context: contextvars.Context, call: Callable[[], Any]) -> Callable[[], Any]:
        """`call` in `context`, for a pool thread: not started when the lease may have run out meanwhile (the
        thread may take it from the queue before the loop, stopped with the thread, hears the lease was lost)."""
        token, leases = self.claimed.lease_token, self.hooks

        def guarded() -> Any:
            if leases.lease_may_be_lost(token):
                raise LeaseLost(self.claimed.id)
            try:
                return context.run(call)
            except StopIteration as error:  # asyncio cannot put it in a future: the step would never end
                raise RuntimeError(f"the step raised StopIteration{f' ({error})' if str(error) else ''}") from error

        return guarded

    async def _in_thread_within(self, name: str, seconds: float, call: Callable[[], Any]) -> Any:
        """A sync step with a timeout. The timeout bounds one execution: it opens when a thread takes the
        step, not while the step queues behind other sync steps for one of the pool's threads."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def execute() -> Any:
            loop.call_soon_threadsafe(started.set_result, None)
            return call()

        future = self._submit(execute)
        done = asyncio.wrap_future(future)
        try:
            await asyncio.wait((started, done), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Given up while queued (its branch was cancelled): cancelled now, the work never runs. Had a
            # thread just taken it, it runs on and its result is discarded.
            future.cancel()
            done.cancel()
            raise
        try:
            async with asyncio.timeout(seconds) as limit:
                return await done
        except TimeoutError as error:
            if not limit.expired():
                raise
            self.hooks.threads.abandon(future, f"step {name!r} of run {self.claimed.id}")
            raise self._timed_out(name, seconds) from error

    def _submit(self, call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future = self.hooks.threads.submit(call)
        self._submitted.add(future)
        future.add_done_callback(self._submitted.discard)  # from the thread: a set's discard is atomic
        if self._closed:  # the attempt ended while this branch was on its way here
            future.cancel()
        return future

    def _timed_out(self, name: str, seconds: float | None) -> StepTimeout:
        return StepTimeout(
            f"step {name!r} of workflow {self.definition.name!r} took longer than its timeout of {seconds:g}s"
        )


def _counted_from_call(timed: TimedWait, since: datetime | None, now: datetime) -> TimedWait:
    """A new timed wait as the run parks: its duration less the time since the workflow called it, as other
    branches may run for a while before every branch is blocked (gather(sleep 1s, a 2s step) takes 2s)."""
    if timed.duration is None or since is None:
        return timed
    elapsed = max(now - since, timedelta(0))  # a clock set back counts as no time
    return dataclasses.replace(timed, duration=max(timed.duration - elapsed, timedelta(0)))


def _retrieve_error(task: asyncio.Task[None]) -> None:
    # A checkpoint task whose attempt ended before awaiting it (cancelled): its error was seen, not lost.
    if not task.cancelled():
        task.exception()


_NO_SCOPE = contextlib.nullcontext()

Found = typing.TypeVar("Found")


def _first_raised(error: BaseException, match: Callable[[BaseException], Found | None]) -> Found | None:
    """`match(error)`, or for an exception group (a TaskGroup) what matches its first error that matches."""
    if (found := match(error)) is not None:
        return found
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _first_raised(inner, match)) is not None:
                return found
    return None


def _awaits_other_tasks(task: asyncio.Task[Any]) -> bool:
    """Whether `task` is inside an asyncio combinator or synchronization primitive (a TaskGroup, wait_for,
    wait, a lock, an event, a queue): it waits for other tasks, whose own state says whether the attempt is
    busy, not for outside work. The tasks it waits for may not be visible from here (a TaskGroup's): the park
    goes ahead then, as it always did, rather than wait for the grace to run out."""
    coroutine: Any = task.get_coro()
    innermost = None
    while coroutine is not None and hasattr(coroutine, "cr_code"):
        innermost = coroutine
        coroutine = coroutine.cr_await
    return innermost is not None and innermost.cr_code in _OTHER_TASKS_CODE


_OTHER_TASKS_CODE = frozenset(
    function.__code__
    for function in (
        getattr(asyncio.tasks, "wait_for", None),
        getattr(asyncio.tasks, "wait", None),
        getattr(asyncio.tasks, "_wait", None),
        asyncio.TaskGroup.__aexit__,
        asyncio.Lock.acquire,
        asyncio.Event.wait,
        asyncio.Condition.wait,
        asyncio.Semaphore.acquire,
        getattr(asyncio, "Barrier", None) and asyncio.Barrier.wait,
        asyncio.Queue.get,
        asyncio.Queue.put,
        asyncio.Queue.join,
    )
    if function is not None and hasattr(function, "__code__")
)
# How long a run with a durable wait waits for a gathered branch busy outside a step before parking anyway.
BUSY_BRANCH_GRACE_S = 30.0

_JSON_SCALARS = frozenset({str, int, bool, type(None)})


def _own_cancellation(error: asyncio.CancelledError, what: str) -> BaseException:
    """A CancelledError out of user code: re-raised as it is when this task is being cancelled (the attempt is
    ending, a timeout or `wait_for` gave up on the branch), otherwise the user's code raised it itself (it
    awaited a task it had cancelled) and it is an ordinary failure, retried by the retry policy. Left as a
    CancelledError it would end the attempt as if the worker had stopped it: no failure recorded, the run
    left 'running' until its lease ran out, taken over and its step run again, up to max_recoveries times."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return error
    return RuntimeError(
        f"{what} raised CancelledError, but nothing cancelled the run (a task it awaited was cancelled?)"
    )


def _is_async(fn: Callable[..., Any]) -> bool:
    target = fn.func if isinstance(fn, functools.partial) else fn
    call = type(target).__call__ if not inspect.isroutine(target) else None  # a callable object
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)
