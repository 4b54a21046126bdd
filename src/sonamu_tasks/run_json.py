"""A run as JSON, built once for the command line and the dashboard, so that they cannot drift apart: a listed
run (`runs --json` and `/api/runs`: `run_summary`) and a run in full (`show --json` and `/api/runs/{id}`:
`run_detail`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .display import (
    NO_CHILDREN,
    Children,
    Messages,
    events_summary,
    other_waits,
    outside_waits,
    pending_sleep,
    wake_time,
)
from .records import RunEventRecord, RunRecord, StepRecord
from .status import RunStatus


def run_summary(run: RunRecord) -> dict[str, Any]:
    """A run without its values (a list reads none): `available_at` is null when only a child, a message or an
    event can wake it (never the far-future time such a run is parked at)."""
    return {
        "id": run.id,
        "workflow": run.workflow_name,
        "version": run.version,
        "status": run.status.value,
        "requested_action": run.requested_action,
        "attempts": run.attempts,
        "recoveries": run.recoveries,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "updated_at": _iso(run.updated_at),
        "available_at": _iso(wake_time(run.available_at)),
        "deadline_at": _iso(run.deadline_at),
        "idempotency_key": run.idempotency_key,
        "worker_id": run.worker_id,
        "parent_id": run.parent_id,
        "parent_step": run.parent_step,
        "detached": run.detached,
        "forked_from": run.forked_from,
        "forked_step": run.forked_step,
        "queue": run.queue,
        "priority": run.priority,
        "concurrency_key": run.concurrency_key,
    }


def run_detail(
    run: RunRecord,
    *,
    parent: RunRecord | None,
    children: Children,
    messages: Messages,
    events: Sequence[RunEventRecord],
) -> dict[str, Any]:
    """A run read whole, with its steps: its summary, its parent and children, what it waits for, its
    unconsumed messages and published events, its input, output and error, and every step."""
    return {
        **run_summary(run),
        "parent": parent_summary(run, parent),
        "children": children.summary() if children is not NO_CHILDREN else None,
        "waiting_for": waiting_for(run, children),
        "messages": messages.summary(),
        "events": events_summary(events),
        "input": run.input,
        "output": run.output,
        "error": run.error,
        "steps": [step_summary(step) for step in run.steps],
    }


def parent_summary(run: RunRecord, parent: RunRecord | None) -> dict[str, Any] | None:
    """The run that started this one (its workflow and status null when it is no longer stored), or None."""
    if run.parent_id is None:
        return None
    return {
        "id": run.parent_id,
        "workflow": parent.workflow_name if parent else None,
        "version": parent.version if parent else None,
        "status": parent.status.value if parent else None,
        "step": run.parent_step,
        "detached": run.detached,
    }


def waiting_for(run: RunRecord, children: Children) -> dict[str, Any] | None:
    """What a waiting run waits for: its unfinished children, its first sleep to wake if one is pending, its
    receives (topic, timeout) and event waits (event, key, timeout). None for a run that is not waiting."""
    if run.status is not RunStatus.WAITING:
        return None
    sleep = pending_sleep(run)
    waits = outside_waits(run)
    return {
        "unfinished_children": children.unfinished_count,
        "children": [row.summary() for row in children.unfinished],
        "sleep": {"step": sleep.name, "wake_at": _iso(sleep.wake_at)} if sleep else None,
        "messages": [wait.summary() for wait in waits if wait.kind == "receive"],
        "events": [wait.summary() for wait in waits if wait.kind == "event"],
        "steps": other_waits(run),
    }


def step_summary(step: StepRecord) -> dict[str, Any]:
    return {
        "name": step.name,
        "kind": step.kind,
        "status": step.status.value,
        "attempts": step.attempts,
        "started_at": _iso(step.started_at),
        "finished_at": _iso(step.finished_at),
        "wake_at": _iso(step.wake_at),
        "waits_for": step.waits_for,
        "output": step.output,
        "error": step.error,
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
