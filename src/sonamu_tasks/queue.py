"""Queues: the limits a group of runs shares across every worker.

A `Queue` is declared in code (or the config) and stored by `synchronize()`; the claim reads the stored
limits each time, in the database, so they hold for the whole fleet and a change holds at once. Every run
is in one queue: its `run(queue=...)`, else its workflow's `queue=`, else "default" (no limits).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import limits
from .duration import parse_duration
from .errors import ConfigError, InvalidValue

if TYPE_CHECKING:
    from .definition import WorkflowDefinition

DEFAULT_QUEUE = "default"
MAX_PRIORITY = 2**31 - 1
"""Priorities are 32-bit integers (lower runs first)."""

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S.*)$", re.ASCII)


@dataclass(frozen=True)
class Queue:
    """A named queue and its limits, all optional.

    - `concurrency`: at most this many runs of the queue executing at once across all workers (sleeping and
      waiting runs hold no slot; a killed worker's slot comes back when its lease expires).
    - `worker_concurrency`: at most this many executing in one worker process.
    - `rate_limit`: `"100/1s"`, at most 100 starts in any sliding window of one second across all workers
      (a start: a run's first claim and each retry; resuming after a sleep or wait is not one).
    - `per_key_concurrency`: at most this many executing at once per `concurrency_key` of `run()`.
    """

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    rate_limit: str | None = None
    per_key_concurrency: int | None = None

    def __post_init__(self) -> None:
        limits.check_queue_name(self.name)
        for field in ("concurrency", "worker_concurrency", "per_key_concurrency"):
            _check_count(getattr(self, field), what=f"queue {self.name!r} {field}")
        if self.rate_limit is not None:
            parse_rate(self.rate_limit, what=f"queue {self.name!r} rate_limit")

    @property
    def rate(self) -> tuple[int, timedelta] | None:
        """`rate_limit` as (starts, window)."""
        return None if self.rate_limit is None else parse_rate(self.rate_limit)

    @property
    def limited(self) -> bool:
        return any(
            value is not None
            for value in (self.concurrency, self.worker_concurrency, self.rate_limit, self.per_key_concurrency)
        )


def parse_rate(value: object, *, what: str = "rate_limit") -> tuple[int, timedelta]:
    """`"100/1s"` (or `"100/s"`, `"5/2m"`) as (100, 1 second): at most N starts per window."""
    match = _RATE.match(value) if isinstance(value, str) and len(value) <= 64 else None
    if match is None:
        raise InvalidValue(
            f"{what}: {limits.shown(value)} is not a rate; write starts/window, e.g. '100/1s' or '10/1m'", field=what
        )
    count = int(match.group(1))
    window_text = match.group(2).strip()
    if window_text[:1].isalpha():
        window_text = "1" + window_text  # "100/s": per one second
    window = parse_duration(window_text, what=f"{what} window")
    if count < 1 or count > MAX_PRIORITY:
        raise InvalidValue(f"{what}: {limits.shown(value)} must allow from 1 to {MAX_PRIORITY} starts", field=what)
    if window < timedelta(milliseconds=1):
        raise InvalidValue(f"{what}: {limits.shown(value)} needs a window of at least 1ms", field=what)
    return count, window


def check_priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -MAX_PRIORITY - 1 <= value <= MAX_PRIORITY:
        raise InvalidValue(
            f"priority must be an integer from {-MAX_PRIORITY - 1} to {MAX_PRIORITY}, got {limits.shown(value)}",
            field="priority",
        )
    return value


def queue_name(value: Queue | str | None, *, what: str = "queue") -> str | None:
    """The name of a `queue=` argument (a Queue or its name)."""
    if value is None:
        return None
    if isinstance(value, Queue):
        return value.name
    if isinstance(value, str):
        return limits.check_queue_name(value)
    raise InvalidValue(f"{what}: expected a Queue or a queue name, got {type(value).__name__}", field=what)


def _check_count(value: object, *, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PRIORITY:
        raise InvalidValue(f"{what} must be a positive integer or None, got {limits.shown(value)}", field=what)


def collect_queues(
    declared: Iterable[Queue], definitions: Iterable[WorkflowDefinition[Any, Any]]
) -> tuple[list[Queue], list[tuple[str, str, str]]]:
    """The queues to store (from the config and the workflows) and each workflow's queue. Two different
    declarations of one queue name are refused, naming it: which limits hold would depend on who synced last."""
    found: dict[str, Queue] = {}
    workflow_queues = []
    definitions = list(definitions)
    candidates = [*declared, *(d.queue for d in definitions if isinstance(d.queue, Queue))]
    for queue in candidates:
        known = found.setdefault(queue.name, queue)
        if known != queue:
            raise ConfigError(f"queue {queue.name!r} is declared twice with different limits: {known} and {queue}")
    for definition in definitions:
        workflow_queues.append((definition.name, definition.version, definition.queue_name))
    return list(found.values()), workflow_queues


def served_queues(chosen: Sequence[str] | None, definitions: Iterable[WorkflowDefinition[Any, Any]]) -> list[str]:
    """The queues a worker claims from: those chosen, else every queue its workflows declare."""
    if chosen is not None:
        return list(dict.fromkeys(chosen))
    return sorted({definition.queue_name for definition in definitions})
