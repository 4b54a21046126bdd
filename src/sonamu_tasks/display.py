"""What a person sees of runs, shared by the CLI and the dashboard: short forms of durations and values, a
run's wake time, its children (counts per status, a few listed), what a waiting run waits for (children, a
sleep, messages, events), its unconsumed messages and the events it published; stranded runs per version;
queues (their limits, what runs and waits in them) and a run's place in its queue."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .backends.base import FOREVER
from .display_text import escaped_json, readable_json, whole_escapes
from .errors import RunNotFound
from .queue import DEFAULT_QUEUE
from .records import CutValue, MessageRecord, QueueStats, RunEventRecord, RunRecord, StepRecord, WorkerRecord
from .status import RunStatus, StepStatus

if TYPE_CHECKING:
    from .manager import StrandedRuns, WorkflowManager

LISTED_CHILDREN = 20
"""Children named one by one (`show`, a run's page); the rest are counted, and listed by `runs --parent`."""
SEARCHED_CHILDREN = 200
"""Children read past the listed ones to find the first unfinished ones, at most (the rest are linked)."""
LISTED_MESSAGES = 20
"""Unconsumed messages shown one by one (the oldest); the rest are counted."""
COUNTED_MESSAGES = 100
"""Unconsumed messages read to count them: past this, `show` and the dashboard say "more than 100"."""
LISTED_EVENTS = 20
"""Published events shown one by one on a page (`show --json` and /api/runs/{id} have all of them)."""
WAIT_KINDS = ("receive", "event")
"""Step kinds of a wait for something from outside: `step.receive` and `step.wait_for_event`."""
NO_VALUES = 0
"""The `value_limit` of a read that shows none of a run's values (a runs list, a parent's or a child's status):
the database neither sends nor measures them (each comes as an empty CutValue), so a 50 MB input costs nothing."""


# A steering action (the manager returns the status after it) did something when it leaves one of these; any
# other status is a run it does not apply to (`not_steered`). Cancel and pause leave a running run running,
# asked to stop or pause at its next step boundary; resume makes a paused run pending, or withdraws a pause
# a running one has not reached. A status that is both (a canceled run canceled again) reads as done: what
# was asked for holds.
_STEERED = {
    "cancel": ((RunStatus.CANCELED, RunStatus.RUNNING), "canceled", "a finished run is left as it is"),
    "pause": ((RunStatus.PAUSED, RunStatus.RUNNING), "paused", "only an unfinished run not being canceled is paused"),
    "resume": (
        (RunStatus.PENDING, RunStatus.RUNNING),
        "resumed",
        "only a paused run, or one asked to pause, is resumed",
    ),
    "retry": ((RunStatus.PENDING,), "retried", "only a failed or canceled run is retried"),
}
STEERING_ACTIONS = tuple(_STEERED)


def not_steered(action: str, run_id: str, status: RunStatus) -> str | None:
    """Why `action` (cancel, pause, resume, retry) did nothing to a run it left in `status` (`run ... is
    completed: not retried (...)`), or None when it did something."""
    done, past, why = _STEERED[action]
    if status in done:
        return None
    return f"run {run_id} is {status.value}: not {past} ({why})"


def duration_text(start: datetime | None, end: datetime | None) -> str:
    """`850ms`, `3.2s`, or `-` when either end is unknown."""
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def preview(value: Any, width: int) -> str:
    """A value as JSON, cut to `width` characters with an ellipsis."""
    text, cut = json_excerpt(value, width)
    return text[: width - 1] + "…" if cut else text


def json_excerpt(value: Any, limit: int, *, indent: int | None = None) -> tuple[str, bool]:
    """The first `limit` characters of `value` as JSON, and whether there was more. Characters are shown as
    they are (`"김철수"`), but those that would act on a terminal or reorder a line stay escaped
    (`display_text`); a cut never ends inside an escape sequence.

    Encoded piece by piece and stopped at the limit, so a 50 MB list of values is not serialized whole to
    show a line of it (one huge string is still encoded in one piece, at C speed).
    """
    if isinstance(value, CutValue):  # cut by the database already (a capped read), maybe with ASCII escapes
        return whole_escapes(readable_json(value.excerpt)[:limit]), True
    pieces: list[str] = []
    size = 0
    for piece in json.JSONEncoder(ensure_ascii=False, indent=indent, default=str).iterencode(value):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            # Cut before escaping (a 50 MB string is not scanned whole), and again after: escapes only lengthen.
            return whole_escapes(escaped_json("".join(pieces)[:limit])[:limit]), True
    text = escaped_json("".join(pieces))
    return (whole_escapes(text[:limit]), True) if len(text) > limit else (text, False)


def short_id(run_id: str) -> str:
    """The last 8 hex digits of a run id, after an ellipsis. Ids are time-ordered, so their beginnings are
    shared by every run started in the same minute (and by a parent and its children); their ends are not."""
    return "…" + run_id[-8:]


def wake_time(moment: datetime | None) -> datetime | None:
    """When a parked run is due, or None when no timer will wake it (a run waiting only for children is parked
    at a far-future time that is not a wake time)."""
    return None if moment is None or moment >= FOREVER else moment


def child_run_ids(step: StepRecord) -> list[str]:
    """The runs a step of kind "child" started: one for `start_workflow`, each of a `start_workflows` fan-out."""
    output = step.output if step.kind == "child" and isinstance(step.output, dict) else {}
    if isinstance(output.get("run_ids"), list):
        return [str(run_id) for run_id in output["run_ids"]]
    return [str(output["run_id"])] if output.get("run_id") else []


def child_step_text(step: StepRecord) -> str:
    """A child step in a step list: `child -> ID`, with the child's outcome once the parent has seen it, or
    `children -> N runs` for a fan-out."""
    ids = child_run_ids(step)
    output = step.output if isinstance(step.output, dict) else {}
    if "run_ids" in output:
        return f"children -> {len(ids)} runs"
    if not ids:
        return "child"
    outcome = output.get("outcome")
    seen = f" ({outcome.get('status')})" if isinstance(outcome, dict) else ""
    return f"child -> {ids[0]}{seen}"


def pending_sleep(run: RunRecord) -> StepRecord | None:
    """The sleep of `run` that wakes first among those not yet over."""
    sleeps = [s for s in run.steps if s.kind == "sleep" and s.status is StepStatus.SLEEPING and s.wake_at]
    return min(sleeps, key=lambda s: s.wake_at or FOREVER, default=None)


def other_waits(run: RunRecord) -> list[str]:
    """Steps of `run` in status `waiting` that are neither a receive nor an event wait (see `outside_waits`),
    as `kind 'name' {what}`: none today, but a kind of wait added later still shows."""
    lines = []
    for step in run.steps:
        if step.status is StepStatus.WAITING and step.kind not in WAIT_KINDS:
            what = step.waits_for
            lines.append(f"{step.kind} {step.name!r}" + (f" {preview(what, 80)}" if what else ""))
    return lines


@dataclass(frozen=True)
class OutsideWait:
    """A step waiting for something from outside the run: a message on a topic (`receive`) or a broadcast
    event (`event`), until its timeout (None: no timeout)."""

    step: str
    kind: str
    topic: str | None = None
    event: str | None = None
    key: str | None = None
    """The event's key; "" for an event emitted without one."""
    timeout_at: datetime | None = None

    def text(self, time: Callable[[datetime], str], *, step: bool = True) -> str:
        """`message on topic 'approval' (step 'wait'), times out 2026-12-01 11:10:44`: `time` formats the
        timeout; `step=False` leaves out the step (for the step's own row)."""
        if self.kind == "receive":
            what = f"message on topic {self.topic!r}"
        else:
            what = f"event {self.event!r}" + (f" with key {self.key!r}" if self.key else " (no key)")
        until = f"times out {time(self.timeout_at)}" if self.timeout_at else "no timeout"
        return f"{what} (step {self.step!r}), {until}" if step else f"{what}, {until}"

    def summary(self) -> dict[str, Any]:
        found: dict[str, Any] = {"step": self.step}
        if self.kind == "receive":
            found["topic"] = self.topic
        else:
            found.update(event=self.event, key=self.key)
        found["timeout_at"] = None if self.timeout_at is None else self.timeout_at.isoformat()
        return found


def outside_waits(run: RunRecord) -> list[OutsideWait]:
    """The receives and event waits of `run` not satisfied yet, in step order."""
    return [wait for wait in map(outside_wait, run.steps) if wait is not None]


def outside_wait(step: StepRecord) -> OutsideWait | None:
    """What `step` waits for, if it is a receive or an event wait not satisfied yet."""
    if step.status is not StepStatus.WAITING or step.kind not in WAIT_KINDS:
        return None
    what = step.waits_for or {}
    topic, event, key = what.get("topic"), what.get("event"), what.get("key")
    return OutsideWait(
        step.name,
        step.kind,
        topic=None if topic is None else str(topic),
        event=None if event is None else str(event),
        key=None if key is None else str(key),
        timeout_at=step.wake_at,
    )


def slots_text(worker: WorkerRecord) -> str:
    """A worker's slots in use of its slots: `2/16`."""
    return f"{worker.running}/{worker.concurrency}"


def worker_queues_text(worker: WorkerRecord) -> str:
    """The queues a worker claims from; `?` for a worker of an older release, which did not record them."""
    return "?" if worker.queues is None else ", ".join(worker.queues) or "-"


def heartbeat_text(worker: WorkerRecord, now: datetime) -> str:
    """A worker's heartbeat age, `3.2s`, and `75.0s (stale)` once it no longer counts as live."""
    return f"{(now - worker.heartbeat_at).total_seconds():.1f}s" + ("" if worker.live(now) else " (stale)")


def age_text(moment: datetime, now: datetime | None = None) -> str:
    """How long ago: `850ms`, `42s`, `5m`, `3h`, `2d`."""
    return seconds_text(((now or datetime.now(UTC)) - moment).total_seconds())


def seconds_text(seconds: float) -> str:
    """A length of time, short: `850ms`, `42s`, `5m`, `3h`, `2d` (whole units, rounded down)."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def stranded_counts(group: StrandedRuns) -> dict[str, int]:
    """A stranded group's runs per status, in lifecycle order, only the statuses that have some."""
    return {status.value: group.counts[status] for status in RunStatus if group.counts.get(status)}


def stranded_summary(group: StrandedRuns, now: datetime | None = None) -> dict[str, Any]:
    """A (workflow, version) whose unfinished runs no live worker registers, as `runs --stranded --json` and
    the dashboard's /api/stranded give it."""
    now = now or datetime.now(UTC)
    return {
        "workflow": group.workflow,
        "version": group.version,
        "counts": stranded_counts(group),
        "total": group.total,
        "oldest_created_at": group.oldest_created_at.isoformat(),
        "oldest_age_s": round(max(0.0, (now - group.oldest_created_at).total_seconds()), 3),
    }


@dataclass(frozen=True)
class Messages:
    """A run's unconsumed messages: how many (exactly up to COUNTED_MESSAGES), and the oldest few."""

    total: int
    exact: bool
    """False when there were more than COUNTED_MESSAGES: `total` is then a lower bound."""
    listed: list[MessageRecord] = field(default_factory=list)

    @property
    def more(self) -> int:
        return self.total - len(self.listed)

    def count_text(self) -> str:
        """`3 unconsumed`, or `more than 100 unconsumed`."""
        return f"{self.total} unconsumed" if self.exact else f"more than {self.total} unconsumed"

    def summary(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        return {
            "total": self.total,
            "exact": self.exact,
            "listed": [
                {
                    "id": message.id,
                    "topic": message.topic,
                    "payload": message.payload,
                    "idempotency_key": message.idempotency_key,
                    "created_at": message.created_at.isoformat(),
                    "age_s": round(max(0.0, (now - message.created_at).total_seconds()), 3),
                }
                for message in self.listed
            ],
            "more": self.more,
        }


async def messages_of(manager: WorkflowManager, run_id: str, *, listed: int = LISTED_MESSAGES) -> Messages:
    """The unconsumed messages of a run, oldest first: the first `listed`, counted up to COUNTED_MESSAGES."""
    found = await manager.list_messages(run_id, limit=COUNTED_MESSAGES + 1)
    exact = len(found) <= COUNTED_MESSAGES
    return Messages(total=min(len(found), COUNTED_MESSAGES), exact=exact, listed=found[:listed])


def events_summary(events: Sequence[RunEventRecord]) -> list[dict[str, Any]]:
    return [{"key": e.key, "value": e.value, "updated_at": e.updated_at.isoformat()} for e in events]


@dataclass(frozen=True)
class ChildRow:
    """One child run, as a list shows it."""

    id: str
    step: str
    workflow_name: str
    version: str
    status: RunStatus
    detached: bool
    parent_id: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "workflow": self.workflow_name,
            "version": self.version,
            "status": self.status.value,
            "detached": self.detached,
        }


@dataclass(frozen=True)
class Children:
    """A run's children: how many per status, and the first few in step order."""

    total: int
    """Children of the run, counted per status (`manager.count_children`: none of them is read)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Children per status, in lifecycle order, only the statuses that have some."""
    listed: list[ChildRow] = field(default_factory=list)
    """The first LISTED_CHILDREN children, in step order (`kids[2]` before `kids[10]`)."""
    unfinished: list[ChildRow] = field(default_factory=list)
    """The first unfinished children in step order: up to LISTED_CHILDREN, among the first children read."""
    unfinished_count: int = 0
    kept_from: str | None = None
    """A fork's: the run it was forked from, when children listed were started by that run (the fork keeps
    them with the steps that started them) and so are not counted as its own."""

    @property
    def more(self) -> int:
        """Children not listed."""
        return max(0, self.total - len(self.listed))

    def counts_text(self) -> str:
        """`1000: 998 pending, 2 completed` (statuses in their lifecycle order)."""
        parts = [f"{count} {status}" for status, count in self.counts.items()]
        return f"{self.total}: {', '.join(parts) or 'none found'}{self.kept_text()}"

    def kept_text(self) -> str:
        """What a fork's list shows besides its own children: `; listed with them, children kept from run X`."""
        if self.kept_from is None:
            return ""
        return f"; {'listed with them' if self.total else 'listed'}: children kept from run {self.kept_from}"

    def summary(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "counted": self.total,  # every child is counted (kept for readers of the earlier form)
            "counts": self.counts,
            "listed": [row.summary() for row in self.listed],
            "more": self.more,
            "kept_from": self.kept_from,
        }


NO_CHILDREN = Children(total=0)


async def children_of(manager: WorkflowManager, run: RunRecord, *, listed: int = LISTED_CHILDREN) -> Children:
    """The children of `run` (read with its steps). A run without a child step has none, and costs no read.

    They are counted per status by the database (`count_children`), without reading them. The children
    listed are found in the run's own child steps, in step order, and only those are read (a few dozen reads
    for a fan-out of any size): the first `listed`, and, for a waiting parent, further ones until the first
    `listed` unfinished are found (at most SEARCHED_CHILDREN more)."""
    started = sorted(_started_children(run), key=lambda pair: _step_order(pair[0]))
    if not started and not any(step.kind == "child" for step in run.steps):
        return NO_CHILDREN
    by_status = await manager.count_children(run.id)
    counts = {s.value: by_status[s] for s in RunStatus if by_status.get(s)}
    unfinished_count = sum(count for status, count in by_status.items() if not status.finished)
    rows = await _read_children(manager, started[:listed])
    unfinished = [row for row in rows if not row.status.finished]
    wanted = min(listed, unfinished_count)
    if len(unfinished) < wanted and unfinished_count <= listed:
        # Few unfinished children: one read of all of them, by status.
        statuses = [s for s in RunStatus if not s.finished]
        page = await manager.list_runs(parent_id=run.id, status=statuses, limit=listed, value_limit=NO_VALUES)
        unfinished = sorted((_row(child) for child in page.items), key=lambda row: _step_order(row.step))
    else:
        position = listed
        while len(unfinished) < wanted and position < min(len(started), listed + SEARCHED_CHILDREN):
            batch = started[position : position + max(wanted - len(unfinished), 5)]
            unfinished.extend(row for row in await _read_children(manager, batch) if not row.status.finished)
            position += len(batch)
    kept = run.forked_from is not None and any(row.parent_id != run.id for row in rows)
    return Children(
        total=sum(by_status.values()),
        counts=counts,
        listed=rows,
        unfinished=unfinished[:listed],
        unfinished_count=unfinished_count,
        kept_from=run.forked_from if kept else None,
    )


def child_links(steps: Iterable[StepRecord]) -> dict[str, str]:
    """Step name -> the child run it started, for steps that started exactly one."""
    links = {}
    for step in steps:
        ids = child_run_ids(step)
        if len(ids) == 1 and not (isinstance(step.output, dict) and "run_ids" in step.output):
            links[step.name] = ids[0]
    return links


def _started_children(run: RunRecord) -> list[tuple[str, str]]:
    """(step name, child id) for every child the run's steps started, each once; a fan-out's are `name[index]`.

    A fan-out's child appears twice among the steps: in the fan-out step's `run_ids`, and as the step
    `name[index]` holding its outcome once the parent has read it (`Attempt.child_result`), so the first
    mention of each child id is kept."""
    found: dict[str, str] = {}
    for step in run.steps:
        ids = child_run_ids(step)
        if isinstance(step.output, dict) and "run_ids" in step.output:
            for index, run_id in enumerate(ids):
                found.setdefault(run_id, f"{step.name}[{index}]")
        else:
            for run_id in ids:
                found.setdefault(run_id, step.name)
    return [(name, run_id) for run_id, name in found.items()]


async def _read_children(manager: WorkflowManager, started: Sequence[tuple[str, str]]) -> list[ChildRow]:
    """The records of these children, in the order given; one deleted since (retention) is left out. One
    after the other: a few dozen short reads, without taking a pool's every connection at once."""
    rows = []
    for step, run_id in started:
        try:
            rows.append(_row(await manager.get_run(run_id, value_limit=NO_VALUES), step))
        except RunNotFound:
            continue
    return rows


def _row(run: RunRecord, step: str = "") -> ChildRow:
    return ChildRow(
        run.id, run.parent_step or step, run.workflow_name, run.version, run.status, run.detached, run.parent_id
    )


def _step_order(step: str) -> list[tuple[int, int | str]]:
    """Natural order of step names: `kids[2]` before `kids[10]`."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", step)]


# Queues


QUEUE_COLUMNS = (
    "queue",
    "concurrency",
    "per worker",
    "rate limit",
    "per key",
    "running",
    "due",
    "oldest due",
    "rate window",
    "parked on key",
    "workers",
)
"""The columns of `sonamu-tasks queues` and the dashboard's Queues page, in order (`queue_row`)."""
_PERIOD_UNITS = (("w", 604_800_000_000), ("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000))


def period_text(period: timedelta) -> str:
    """A rate limit's window as `rate_limit` spells it: `1s`, `500ms`, `5m`, `1d` (`1.5s` when no unit fits)."""
    micros = period // timedelta(microseconds=1)
    for unit, size in (*_PERIOD_UNITS, ("s", 1_000_000), ("ms", 1_000)):
        if micros >= size and micros % size == 0:
            return f"{micros // size}{unit}"
    return f"{micros / 1_000_000:g}s"


def rate_text(stats: QueueStats) -> str | None:
    """The queue's rate limit as it was declared (`100/1s`), or None when it has none."""
    if stats.rate_limit_starts is None or stats.rate_limit_window is None:
        return None
    return f"{stats.rate_limit_starts}/{period_text(stats.rate_limit_window)}"


def queue_row(stats: QueueStats) -> list[str]:
    """A queue as the cells of QUEUE_COLUMNS: a limit it does not have is `-`, the rate window is `12/100`
    (starts in the current window / the limit), the oldest due run's age is short (`42s`)."""

    def limit(value: int | None) -> str:
        return "-" if value is None else str(value)

    window = "-"
    if stats.rate_limit_starts is not None:
        window = f"{stats.starts_in_window or 0}/{stats.rate_limit_starts}"
    oldest = "-" if stats.oldest_due_seconds is None or not stats.due else seconds_text(stats.oldest_due_seconds)
    return [
        stats.name,
        limit(stats.concurrency),
        limit(stats.worker_concurrency),
        rate_text(stats) or "-",
        limit(stats.per_key_concurrency),
        str(stats.running),
        str(stats.due),
        oldest,
        window,
        str(stats.parked_on_key),
        "?" if stats.workers is None else str(stats.workers),
    ]


def unserved_queues(queues: Sequence[QueueStats]) -> list[str]:
    """A warning per queue with runs due and no live worker that claims from it: nothing will run them."""
    return [
        f"queue {stats.name}: {stats.due} run{'' if stats.due == 1 else 's'} due and no live worker claims from it "
        f"(start one: sonamu-tasks worker --queue {stats.name})"
        for stats in queues
        if stats.due and stats.workers == 0
    ]


def queue_summary(stats: QueueStats) -> dict[str, Any]:
    """A queue as `sonamu-tasks queues --json` and the dashboard's /api/queues give it. `rate_limit` is spelled
    as declared (`100/1s`), and given apart as `rate_limit_starts` and `rate_limit_window_s`."""
    return {
        "name": stats.name,
        "concurrency": stats.concurrency,
        "worker_concurrency": stats.worker_concurrency,
        "rate_limit": rate_text(stats),
        "rate_limit_starts": stats.rate_limit_starts,
        "rate_limit_window_s": None if stats.rate_limit_window is None else stats.rate_limit_window.total_seconds(),
        "per_key_concurrency": stats.per_key_concurrency,
        "running": stats.running,
        "due": stats.due,
        "oldest_due_s": None if stats.oldest_due_seconds is None else round(max(0.0, stats.oldest_due_seconds), 3),
        "starts_in_window": stats.starts_in_window,
        "parked_on_key": stats.parked_on_key,
        "workers": stats.workers,
    }


def run_queue(run: RunRecord) -> list[tuple[str, str]]:
    """Where a run waits its turn, as (label, value) pairs: its queue, then its priority and concurrency key when
    it has them. Empty for a run in the default queue with neither: nothing to say."""
    if run.queue == DEFAULT_QUEUE and run.priority == 0 and run.concurrency_key is None:
        return []
    parts = [("queue", run.queue)]
    if run.priority != 0:
        parts.append(("priority", str(run.priority)))
    if run.concurrency_key is not None:
        parts.append(("concurrency key", run.concurrency_key))
    return parts
