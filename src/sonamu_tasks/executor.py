"""One attempt of one claimed run: replay checkpoints, execute new steps, record the outcome."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
import typing
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime, timedelta
from typing import Any

from . import serde
from .backends.base import Backend, Checkpoint, ClaimedRun, LeaseLost, StepRecord
from .definition import WorkflowDefinition
from .duration import Duration, parse_duration
from .errors import NonRetryableError, StepNameConflict
from .log import RunLogger
from .reconnect import until_available
from .retry import RetryDecision
from .status import StepStatus
from .step import StepWrapper

logger = logging.getLogger("sonamu_tasks.executor")


class Suspended(BaseException):
    """The run parked itself (durable sleep); unwinds the workflow function. Not an error."""


class Released(BaseException):
    """The worker is shutting down: the run is handed back at this step boundary. Not an error."""


class Stopped(BaseException):
    """A cancel or pause was honoured at this step boundary. Not an error."""


CANCELED_ERROR = {"type": "Canceled", "message": "canceled on request"}


class RecoveryLimitExceeded(NonRetryableError):
    pass


class DeadlineExceeded(NonRetryableError):
    pass


class AttemptHooks(typing.Protocol):
    """What the worker offers an attempt."""

    threads: Executor
    max_recoveries: int
    context_provider: Callable[[dict[str, Any]], Any] | None

    def draining(self) -> bool: ...
    def wake_in(self, seconds: float) -> None: ...


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
        self.logger = RunLogger(claimed.id, definition.name, definition.version)
        # Quiet while replaying. A flag, not a callback into the attempt: no reference cycle, so a finished
        # attempt is freed at once instead of by the cyclic garbage collector.
        self.workflow_logger = RunLogger(claimed.id, definition.name, definition.version)
        self._replays_left = 0
        self._stop_requested = claimed.requested_action is not None
        self.steps: dict[str, StepRecord] = {}
        self._seen: set[str] = set()
        self._failed_step: tuple[str, datetime, BaseException] | None = None
        self._claimed_monotonic = time.monotonic()
        self.output_json: str | None = None
        """The stored output, once this attempt completed the run."""
        # The last step's checkpoint, written before anything else durable happens (the next step, a sleep,
        # a failure, a stop) or together with the completion when the workflow returns right after it.
        self._unsent: Checkpoint | None = None
        self._sending: asyncio.Task[None] | None = None

    def request_stop(self) -> None:
        """A cancel or pause was asked for: honour it at the next step boundary."""
        self._stop_requested = True

    # the workflow, start to outcome

    async def execute(self) -> None:
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
            encoded = serde.dumps(output, what=f"the output of workflow {self.definition.name!r}")
            last, self._unsent = self._unsent, None
            await self._settle()
            await until_available(
                lambda: self.backend.complete_run(run.id, run.lease_token, encoded, last), what="complete run"
            )
            self.output_json = encoded
        except (Suspended, Stopped):
            pass
        except Released:
            held = [(run.id, run.lease_token)]
            await until_available(lambda: self.backend.release_runs(held), what="hand back run", give_up_after_s=5)
            self.logger.info("handed back at a step boundary: this worker is shutting down")
        except LeaseLost:
            self.logger.warning("lease lost: another worker owns this run now; this attempt stops")
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
        return await self.definition.fn(**arguments)

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
        await self._settle()  # the steps that completed before the error stay completed
        run = self.claimed
        step = None
        if self._failed_step is not None and self._failed_step[2] is error:
            step = (self._failed_step[0], self._failed_step[1])
        attempt = run.attempts + 1
        stored = serde.encode_error(error, step=step[0] if step else None)
        try:
            decision = self.definition.retry_policy.decide(error, attempt)
        except Exception as policy_error:
            stored["message"] += f" (and the retry policy itself raised {policy_error!r}, so no retry)"
            decision = RetryDecision(should_retry=False)
        delay = timedelta(milliseconds=decision.delay_ms)
        if decision.should_retry and run.deadline_at is not None and self._db_now() + delay >= run.deadline_at:
            stored["message"] = f"deadline exceeded before the next attempt; last error: {stored['message']}"
            decision = RetryDecision(should_retry=False)
        retry_delay = delay if decision.should_retry else None
        await until_available(
            lambda: self.backend.fail_attempt(run.id, run.lease_token, stored, step, retry_delay),
            what="record failure",
        )
        where = f" in step {step[0]!r}" if step else ""
        if retry_delay is not None:
            self.logger.warning(
                "attempt %d failed%s: %s; retrying in %.3fs",
                attempt,
                where,
                error,
                retry_delay.total_seconds(),
            )
            self.hooks.wake_in(retry_delay.total_seconds())
        else:
            self.logger.error("run failed after %d attempt(s)%s: %r", attempt, where, error)

    # what the StepWrapper calls

    async def run_step(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._claim_name(name)
        annotation = _return_annotation(fn)
        record = self.steps.get(name)
        if record is not None:
            self._replayed()
        if record is not None and record.status is StepStatus.COMPLETED:
            if record.kind != "call":
                raise StepNameConflict(f"step {name!r} of workflow {self.definition.name!r} was a sleep before")
            return serde.decode(record.output, annotation)
        await self._settle()  # the previous step's checkpoint is stored before this step starts
        await self._boundary()
        started = datetime.now(UTC)
        self.logger.step = self.workflow_logger.step = name
        try:
            result = await self._invoke(fn, args, kwargs)
            encoded = serde.dumps(result, what=f"the result of step {name!r} of workflow {self.definition.name!r}")
        except Exception as error:
            self._failed_step = (name, started, error)
            raise
        finally:
            self.logger.step = self.workflow_logger.step = None
        # The checkpoint is not awaited here: if the workflow returns right after this step, it is written
        # with the completion, in one commit. Otherwise it is sent at once, from the event loop's next turn,
        # and awaited before anything else durable happens (see _settle). Either way nothing after this
        # step starts before it is stored.
        self._unsent = Checkpoint(name, encoded, started, datetime.now(UTC))
        asyncio.get_running_loop().call_soon(self._send_unsent)
        # The workflow gets what a replay would read back: the value after a JSON round trip (a tuple comes
        # back a list). Scalars come back as they went.
        stored = result if type(result) in _JSON_SCALARS else serde.loads(encoded)
        return serde.decode(stored, annotation)

    async def sleep(self, name: str, duration: Duration) -> None:
        delta = parse_duration(duration, what=f"step.sleep({name!r}) in workflow {self.definition.name!r}")
        self._claim_name(name)
        run = self.claimed
        record = self.steps.get(name)
        wake_at = None
        await self._settle()
        if record is not None:
            self._replayed()
            if record.status is StepStatus.COMPLETED:
                return
            if record.wake_at is not None and record.wake_at <= self._db_now():
                await until_available(
                    lambda: self.backend.complete_sleep(run.id, run.lease_token, name), what="wake up"
                )
                return
            wake_at = record.wake_at  # woken early (resumed, say): sleep on until the original time
        if self._stop_requested:
            await self._honour_request()
        started = datetime.now(UTC)
        stored_wake = await until_available(
            lambda: self.backend.sleep_run(run.id, run.lease_token, name, started, delta, wake_at),
            what=f"sleep {name!r}",
        )
        self.logger.info("sleeping until %s", stored_wake.isoformat())
        self.hooks.wake_in(max(0.0, (stored_wake - self._db_now()).total_seconds()))
        raise Suspended

    # helpers

    def _send_unsent(self) -> None:
        """The workflow did not return right after its step: write the checkpoint now, in the background."""
        checkpoint, self._unsent = self._unsent, None
        if checkpoint is not None:
            self._sending = asyncio.create_task(self._write_checkpoint(checkpoint))
            self._sending.add_done_callback(_retrieve_error)

    async def _settle(self) -> None:
        """Wait until the last step's checkpoint is stored (LeaseLost if the claim was lost meanwhile)."""
        checkpoint, self._unsent = self._unsent, None
        if checkpoint is not None:
            await self._write_checkpoint(checkpoint)
        sending, self._sending = self._sending, None
        if sending is not None:
            await sending

    async def _write_checkpoint(self, checkpoint: Checkpoint) -> None:
        run = self.claimed
        await until_available(
            lambda: self.backend.save_step(
                run.id,
                run.lease_token,
                checkpoint.name,
                checkpoint.output_json,
                checkpoint.started_at,
                checkpoint.finished_at,
            ),
            what=f"checkpoint step {checkpoint.name!r}",
        )

    async def _boundary(self) -> None:
        """Between two steps: where a shutdown hands the run back and a cancel or pause takes effect."""
        if self._stop_requested:
            await self._honour_request()
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

    def _replayed(self) -> None:
        self._replays_left -= 1
        self.workflow_logger.quiet = self._replays_left > 0

    def _claim_name(self, name: str) -> None:
        if name in self._seen:
            raise StepNameConflict(
                f"workflow {self.definition.name!r} used the step name {name!r} twice in one run; "
                "step names must be unique within a run (add an index or id to the name in loops)"
            )
        self._seen.add(name)

    def _db_now(self) -> datetime:
        """The database's clock, read at claim time and advanced locally."""
        return self.claimed.claimed_at + timedelta(seconds=time.monotonic() - self._claimed_monotonic)

    async def _invoke(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _is_async(fn):
            return await fn(*args, **kwargs)
        # Sync steps run in the worker's thread pool so they never block the event loop.
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        result = await loop.run_in_executor(self.hooks.threads, context.run, functools.partial(fn, *args, **kwargs))
        return await result if inspect.isawaitable(result) else result


def _retrieve_error(task: asyncio.Task[None]) -> None:
    # A checkpoint task whose attempt ended before awaiting it (cancelled): its error was seen, not lost.
    if not task.cancelled():
        task.exception()


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _is_async(fn: Callable[..., Any]) -> bool:
    target = fn.func if isinstance(fn, functools.partial) else fn
    call = type(target).__call__ if not inspect.isroutine(target) else None  # a callable object
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)


def _return_annotation(fn: Callable[..., Any]) -> Any:
    # Bound methods are new objects at every access: cache on the function underneath.
    return _declared_return(getattr(fn, "__func__", fn))


@functools.lru_cache(maxsize=1024)
def _declared_return(fn: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable forward references, or not a function: hand back plain JSON
        return None
