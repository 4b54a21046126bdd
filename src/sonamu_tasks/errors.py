"""Every error sonamu-tasks raises, in one place.

Each message says what failed, for which workflow, run or step, and what to do about it.
"""

from __future__ import annotations

from typing import Any


class SonamuTasksError(Exception):
    """Base class of every error raised by sonamu-tasks."""


class WorkflowDefinitionError(SonamuTasksError, TypeError):
    """A `workflow()` declaration is wrong (missing version, unknown parameter, not async ...)."""


class InvalidDuration(SonamuTasksError, ValueError):
    """A duration is not a DurationString, timedelta or number of seconds."""


class ConfigError(SonamuTasksError, ValueError):
    """The configuration is incomplete or contradicts itself."""


class NonRetryableError(SonamuTasksError):
    """Raise it (or a subclass) from a step to fail the run at once, whatever the retry policy says."""


class InvalidInput(NonRetryableError, ValueError):
    """A workflow's input failed its schema. Raised by `run()`; nothing was stored."""

    def __init__(self, workflow: str, problems: list[str]) -> None:
        self.workflow = workflow
        self.problems = problems
        super().__init__(f"invalid input for workflow {workflow!r}: " + "; ".join(problems))


class SerializationError(NonRetryableError, TypeError):
    """A value crossing a checkpoint (input, step result, output) cannot be stored as JSON."""


class StepNameConflict(NonRetryableError, ValueError):
    """Two steps of one run used the same name."""


class WorkflowNotRegistered(SonamuTasksError, LookupError):
    """No workflow with this name (and version) is known to this process."""


class RunNotFound(SonamuTasksError, LookupError):
    """No run has this id."""


class ScheduleNotFound(SonamuTasksError, LookupError):
    """No schedule of this name is stored."""


class ScheduleInUse(SonamuTasksError, ValueError):
    """A live worker registers the schedule's workflow: its code decides the schedule, not a delete."""


class BackendUnavailable(SonamuTasksError):
    """The database could not be reached or the transaction was interrupted; safe to retry."""


class BackendClosed(SonamuTasksError):
    """The manager was stopped (its connections closed) while, or before, this call used them: not retried."""


class StorageError(NonRetryableError):
    """The database refused a write for what it holds (a value or name it cannot store, a constraint), not
    because it is unreachable: making the same call again would fail the same way, so it is not retried."""


class ChildWorkflowFailed(NonRetryableError):
    """Raised in a parent workflow by `child.result()` when the child run failed or was canceled.

    `error` is the child's stored error (type, message, traceback, step); `status` is "failed" or "canceled";
    `step` is the parent's step that started the child (`kids[412]` in a fan-out). A parent may catch it and
    go on; uncaught, it fails the parent at once (it is not retried: the child already used its own retries),
    and the parent's error names that step, and the child's own failed step.
    """

    def __init__(
        self, run_id: str, workflow: str, status: str, error: dict[str, Any] | None, step: str | None = None
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.status = status
        self.error = error or {}
        self.step = step
        what = f"{self.error.get('type', 'Error')}: {self.error.get('message', '')}" if error else status
        started_by = f" (step {step!r})" if step else ""
        in_step = f" in its step {self.error['step']!r}" if self.error.get("step") else ""
        super().__init__(f"child run {run_id} of workflow {workflow!r}{started_by} {status}{in_step}: {what}")


class WorkflowFailed(SonamuTasksError):
    """Raised by `RunHandle.result()` when the run ended `failed` (or `canceled`).

    `error` is the stored error: a dict with `type`, `message`, `traceback` and, when a step raised, `step`.
    """

    def __init__(self, run_id: str, workflow: str, status: str, error: dict[str, Any] | None) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.status = status
        self.error = error or {}
        where = f" in step {self.error['step']!r}" if self.error.get("step") else ""
        what = f"{self.error.get('type', 'Error')}: {self.error.get('message', '')}" if error else status
        super().__init__(f"run {run_id} of workflow {workflow!r} {status}{where}: {what}")


class ResultTimeout(SonamuTasksError, TimeoutError):
    """`RunHandle.result(timeout=...)` ran out of time; the run goes on. `status` is the run's status then, or
    "unknown" when the database did not answer in time (an outage: the wait still ends at the timeout)."""

    UNKNOWN = "unknown"

    def __init__(self, run_id: str, status: str, timeout: float) -> None:
        self.run_id = run_id
        self.status = status
        said = "status unknown: the database did not answer" if status == self.UNKNOWN else f"it is {status}"
        super().__init__(f"run {run_id} did not finish within {timeout:g}s ({said}; it goes on)")


class InvalidValue(NonRetryableError, ValueError):
    """A name, key, time or duration outside the documented limits (see `sonamu_tasks.limits`).

    Raised before anything is stored. Inside a workflow it fails the run at once: the same code would give
    the same value again, so a retry cannot help. `field` names what was refused ("step name", "start_at").
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        self.field = field
        super().__init__(message)


class InvalidName(InvalidValue):
    """A workflow, step, schedule or queue name, a version, an idempotency key or a topic that is blank,
    too long, or holds characters that cannot be stored (control characters, NUL, lone surrogates)."""


class UnusableDuration(InvalidDuration, InvalidValue):
    """What `parse_duration` raises: an InvalidDuration that is also an InvalidValue, so a workflow that
    sleeps for an impossible duration fails at once instead of being retried."""


class StepTimeout(SonamuTasksError, TimeoutError):
    """A step ran longer than its `timeout`. It counts as a failure of that step and is retried by its policy.

    An async step is cancelled; a sync step's thread cannot be stopped, so it runs on and its late result is
    discarded (see `threads.StepThreads.abandon`)."""
