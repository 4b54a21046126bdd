"""The statuses of a run and the transitions between them.

    from        to          who
    ---------   ---------   -----------------------------------------------------------
    (new)       pending     run(): starts now or at `start_at`
    pending     running     a worker claims it (sets a lease)
    running     running     another worker claims it after the lease expired (a take-over)
    running     sleeping    step.sleep(): parked until its wake time, holds no slot
    sleeping    running     a worker claims it at its wake time
    running     waiting     every branch waits, for a child, a message or an event: parked, holds no slot
    waiting     pending     what it waits for arrived (that transaction makes it due now)
    waiting     running     a worker claims it at its earliest timeout
    running     pending     a failed attempt that will be retried, or a graceful shutdown release
    running     completed   the workflow function returned
    running     failed      the last attempt failed, or the error cannot be retried
    unfinished  canceled    cancel: at once, except a run running under a live lease, which is asked to stop
    unfinished  paused      pause (the same); `paused -> pending` on resume, at the time it was due
    running     canceled    a cancel asked of it, at whatever write of its worker comes first: a step boundary,
    running     paused      a failed attempt to retry, a park, a hand-back (a pause likewise); at its end (completed,
                            failed) the request is dropped
    failed      pending     retry; a canceled parent's retry also restarts the children canceled with it
    canceled    pending     retry

Every write by a worker is guarded by `status = 'running' AND lease_token = <its claim>`.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SLEEPING = "sleeping"
    WAITING = "waiting"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)


class StepStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    SLEEPING = "sleeping"
    WAITING = "waiting"
    """A receive or event wait not satisfied yet."""
