"""What a person sees of runs, shared by the CLI and the dashboard: short forms of durations and values, a
run's wake time, and a run's children (counts per status, a few listed, what a waiting run waits for)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .backends.base import FOREVER
from .records import RunRecord, StepRecord
from .status import RunStatus, StepStatus

if TYPE_CHECKING:
    from .manager import WorkflowManager

LISTED_CHILDREN = 20
"""Children named one by one (`show`, a run's page); the rest are counted, and listed by `runs --parent`."""
COUNTED_CHILDREN = 5000
"""Children read to count them per status: a fan-out larger than this is counted on its newest ones."""
_PAGE = 1000


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
    """The first `limit` characters of `value` as JSON, and whether there was more.

    Encoded piece by piece and stopped at the limit, so a 50 MB list of values is not serialized whole to
    show a line of it (one huge string is still encoded in one piece, at C speed).
    """
    pieces: list[str] = []
    size = 0
    for piece in json.JSONEncoder(indent=indent, default=str).iterencode(value):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            return "".join(pieces)[:limit], True
    return "".join(pieces), False


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
    """Steps of `run` waiting for something other than a child or a sleep (a step whose status is `waiting`,
    such as a message or an event), as `kind 'name' {what}`."""
    lines = []
    for step in run.steps:
        if step.status.value == "waiting":
            what = getattr(step, "waits_for", None)
            lines.append(f"{step.kind} {step.name!r}" + (f" {preview(what, 80)}" if what else ""))
    return lines


@dataclass(frozen=True)
class ChildRow:
    """One child run, as a list shows it."""

    id: str
    step: str
    workflow_name: str
    version: str
    status: RunStatus
    detached: bool

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
    """A run's children: how many, how many per status, and the first few in step order."""

    total: int
    """Children of the run: those read, or, when there were too many to read, those its child steps started."""
    counted: int
    """Children read and counted (all of them unless more than COUNTED_CHILDREN)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Counted children per status."""
    listed: list[ChildRow] = field(default_factory=list)
    """The first LISTED_CHILDREN children, in step order (`kids[2]` before `kids[10]`)."""
    unfinished: list[ChildRow] = field(default_factory=list)
    """The first LISTED_CHILDREN of the unfinished children, in step order."""
    unfinished_count: int = 0

    @property
    def more(self) -> int:
        """Children not listed."""
        return self.total - len(self.listed)

    def counts_text(self) -> str:
        """`1000: 998 pending, 2 completed` (statuses in their lifecycle order)."""
        parts = [f"{self.counts[s.value]} {s.value}" for s in RunStatus if self.counts.get(s.value)]
        counted = "" if self.counted >= self.total else f" (the newest {self.counted} counted)"
        return f"{self.total}: {', '.join(parts) or 'none found'}{counted}"

    def summary(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "counted": self.counted,
            "counts": self.counts,
            "listed": [row.summary() for row in self.listed],
            "more": self.more,
        }


NO_CHILDREN = Children(total=0, counted=0)


async def children_of(
    manager: WorkflowManager, run: RunRecord, *, listed: int = LISTED_CHILDREN, count_up_to: int = COUNTED_CHILDREN
) -> Children:
    """The children of `run` (read with its steps). A run without a child step has none, and costs no read;
    otherwise its children are read a page at a time, up to `count_up_to` of them."""
    started = {run_id for step in run.steps for run_id in child_run_ids(step)}
    if not started and not any(step.kind == "child" for step in run.steps):
        return NO_CHILDREN
    rows: list[ChildRow] = []
    cursor = None
    while len(rows) < count_up_to:
        page = await manager.list_runs(parent_id=run.id, limit=min(_PAGE, count_up_to - len(rows)), cursor=cursor)
        rows.extend(_row(child) for child in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    counts = Counter(row.status.value for row in rows)
    ordered = sorted(rows, key=_step_order)
    unfinished = [row for row in ordered if not row.status.finished]
    return Children(
        total=len(rows) if cursor is None else max(len(started), len(rows)),
        counted=len(rows),
        counts={s.value: counts[s.value] for s in RunStatus if counts[s.value]},
        listed=ordered[:listed],
        unfinished=unfinished[:listed],
        unfinished_count=len(unfinished),
    )


def child_links(steps: Iterable[StepRecord]) -> dict[str, str]:
    """Step name -> the child run it started, for steps that started exactly one."""
    links = {}
    for step in steps:
        ids = child_run_ids(step)
        if len(ids) == 1 and not (isinstance(step.output, dict) and "run_ids" in step.output):
            links[step.name] = ids[0]
    return links


def _row(run: RunRecord) -> ChildRow:
    return ChildRow(run.id, run.parent_step or "", run.workflow_name, run.version, run.status, run.detached)


def _step_order(row: ChildRow) -> list[tuple[int, int | str]]:
    """Natural order of step names: `kids[2]` before `kids[10]`."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", row.step)]
