"""A run's steps as bars on a time axis (SVG): calls, sleeps, children and failed attempts at a glance."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape

from ..display_text import escaped
from ..records import RunRecord, StepRecord

_ROW = 26
_LABEL = 160
_WIDTH = 900


def timeline_svg(run: RunRecord, now: datetime | None = None, *, links: Mapping[str, str] | None = None) -> str:
    """`links`: step name -> the child run it started; that step's bar links to the child's page."""
    links = links or {}
    now = now or datetime.now(UTC)
    steps = list(run.steps)
    if not steps:
        return '<p class="muted">no steps yet</p>'
    start = run.started_at or run.created_at
    ends = [_end(step, now) for step in steps] + [run.finished_at or now]
    span = max((max(ends) - start).total_seconds(), 0.001)
    plot = _WIDTH - _LABEL - 10

    def x(moment: datetime) -> float:
        return _LABEL + plot * max(0.0, (moment - start).total_seconds()) / span

    parts = [
        f'<svg class="timeline" width="{_WIDTH}" height="{_ROW * len(steps) + 30}" role="img" '
        f'aria-label="step timeline">'
    ]
    for index, step in enumerate(steps):
        top = 6 + index * _ROW
        began = step.started_at or start
        left, right = x(began), max(x(_end(step, now)), x(began) + 4)  # an instant step stays visible (and clickable)
        kind = step.kind if step.kind in ("sleep", "child") and step.error is None else step.status.value
        label = f"{step.name}" + (f" x{step.attempts}" if step.attempts > 1 else "")
        seconds = (_end(step, now) - began).total_seconds()
        parts.append(f'<text x="4" y="{top + 14}" class="label">{escape(escaped(label))}</text>')
        child = links.get(step.name)
        title = f"{escape(escaped(step.name))}: {kind}" + (f" {child}" if child else "")
        bar = (
            f'<rect class="bar {kind}" data-step="{escape(step.name)}" x="{left:.1f}" y="{top}" '
            f'width="{right - left:.1f}" height="{_ROW - 8}"><title>{title}, '
            f"{seconds:.3f}s, {step.attempts} attempt(s)</title></rect>"
        )
        parts.append(f'<a href="/runs/{escape(child)}">{bar}</a>' if child else bar)
    axis = 6 + len(steps) * _ROW + 14
    parts.append(f'<text x="{_LABEL}" y="{axis}" class="axis">0s</text>')
    parts.append(f'<text x="{_WIDTH - 60}" y="{axis}" class="axis">{span:.2f}s</text>')
    parts.append("</svg>")
    return "".join(parts)


def _end(step: StepRecord, now: datetime) -> datetime:
    if step.kind == "sleep" and step.wake_at is not None:
        return step.wake_at if step.finished_at is None else step.finished_at
    return step.finished_at or now
