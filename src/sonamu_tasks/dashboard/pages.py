"""HTML of the dashboard's pages. Every value is escaped; pages refresh themselves while runs move."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

from ..backends.base import RunRecord, ScheduleRecord, WorkerRecord
from ..display import duration_text, preview
from ..status import RunStatus
from .timeline import timeline_svg

_STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px}header a{color:#fff;margin-right:18px;text-decoration:none}
main{padding:16px 20px}table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;
border-bottom:1px solid #e3e6ee}th{background:#f5f6fa}.status{font-weight:600}.completed{color:#1a7f37}
.failed,.canceled{color:#c62828}.running{color:#1565c0}.sleeping,.paused,.pending{color:#8a6d00}
pre{background:#f5f6fa;padding:8px;overflow:auto;max-height:260px}.muted{color:#777}form.inline{display:inline}
button{margin-right:8px;padding:4px 12px}.timeline .label,.timeline .axis{font-size:12px}
.bar.completed{fill:#43a047}.bar.failed{fill:#e53935}.bar.sleep{fill:#90a4ae}.bar.sleeping{fill:#90a4ae}
"""

_REFRESH = """<script>
setInterval(async () => {
  const response = await fetch(location.href, {headers: {"X-Partial": "1"}});
  if (response.ok) document.getElementById("live").innerHTML = await response.text();
}, %d);
</script>"""


def page(title: str, body: str, *, refresh_ms: int | None = 1000) -> str:
    script = _REFRESH % refresh_ms if refresh_ms else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)} · sonamu-tasks</title>"
        f"<style>{_STYLE}</style></head><body><header><a href='/'>Runs</a><a href='/workers'>Workers</a>"
        f"<a href='/schedules'>Schedules</a></header><main><h2>{escape(title)}</h2>"
        f"<div id='live'>{body}</div></main>{script}</body></html>"
    )


def runs_filters(workflow: str, status: str) -> str:
    options = "".join(
        f"<option value='{s.value}'{' selected' if s.value == status else ''}>{s.value}</option>" for s in RunStatus
    )
    return (
        "<form method='get' action='/'>workflow <input name='workflow' value='" + escape(workflow) + "'> "
        f"status <select name='status'><option value=''>any</option>{options}</select> "
        "<button type='submit'>Filter</button></form><br>"
    )


def runs_table(runs: Sequence[RunRecord], next_cursor: str | None, query: dict[str, str]) -> str:
    if not runs:
        return "<p class='muted'>no runs</p>"
    rows = "".join(
        f"<tr data-run='{run.id}'><td><a href='/runs/{run.id}'>{run.id}</a></td>"
        f"<td>{escape(run.workflow_name)}@{escape(run.version)}</td>"
        f"<td class='status {run.status.value}'>{run.status.value}</td><td>{run.attempts}</td>"
        f"<td>{_time(run.created_at)}</td><td>{duration_text(run.started_at, run.finished_at)}</td></tr>"
        for run in runs
    )
    more = ""
    if next_cursor:
        more = f"<p><a href='/?{urlencode({**query, 'cursor': next_cursor})}'>older runs</a></p>"
    return (
        "<table><thead><tr><th>run</th><th>workflow</th><th>status</th><th>attempts</th><th>created</th>"
        f"<th>duration</th></tr></thead><tbody>{rows}</tbody></table>{more}"
    )


def run_detail(run: RunRecord, csrf: str) -> str:
    buttons = ""
    if not run.status.finished:
        buttons += _button(run.id, "cancel", "Cancel", csrf)
    if run.status in (RunStatus.FAILED, RunStatus.CANCELED):
        buttons += _button(run.id, "retry", "Retry", csrf)
    request = f" ({run.requested_action} requested)" if run.requested_action else ""
    error = ""
    if run.error:
        where = f" in step {escape(str(run.error.get('step')))}" if run.error.get("step") else ""
        error = (
            f"<h3>Error{where}</h3><p>{escape(str(run.error.get('type')))}: {escape(str(run.error.get('message')))}"
            f"</p><pre>{escape(str(run.error.get('traceback', '')))}</pre>"
        )
    steps = "".join(
        f"<tr><td>{escape(step.name)}</td><td>{step.kind}</td><td class='status {step.status.value}'>"
        f"{step.status.value}</td><td>{step.attempts}</td><td>{duration_text(step.started_at, step.finished_at)}</td>"
        f"<td>{escape(preview(step.output if step.error is None else step.error.get('message'), 80))}</td></tr>"
        for step in run.steps
    )
    output = f"<h3>Output</h3><pre>{escape(_json(run.output))}</pre>" if run.status is RunStatus.COMPLETED else ""
    return (
        f"<p>{escape(run.workflow_name)} version {escape(run.version)} · "
        f"<span id='run-status' class='status {run.status.value}'>{run.status.value}</span>{request} · "
        f"attempts {run.attempts} · recoveries {run.recoveries} · created {_time(run.created_at)}</p>"
        f"<p>{buttons}</p><h3>Timeline</h3>{timeline_svg(run)}"
        "<h3>Steps</h3><table><thead><tr><th>step</th><th>kind</th><th>status</th><th>attempts</th>"
        f"<th>duration</th><th>output / error</th></tr></thead><tbody>{steps}</tbody></table>"
        f"<h3>Input</h3><pre>{escape(_json(run.input))}</pre>{output}{error}"
    )


def workers_table(workers: Sequence[WorkerRecord]) -> str:
    now = datetime.now(UTC)
    rows = "".join(
        f"<tr><td>{escape(w.id)}</td><td>{escape(w.host)}</td><td>{w.pid}</td><td>{w.concurrency}</td>"
        f"<td>{escape(', '.join(f'{n}@{v}' for n, v in w.workflows))}</td>"
        f"<td>{(now - w.heartbeat_at).total_seconds():.1f}s</td></tr>"
        for w in workers
    )
    head = "<tr><th>worker</th><th>host</th><th>pid</th><th>slots</th><th>workflows</th><th>heartbeat age</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>" if rows else "<p class='muted'>no workers</p>"


def schedules_table(schedules: Sequence[ScheduleRecord]) -> str:
    rows = "".join(
        f"<tr><td>{escape(s.name)}</td><td>{escape(s.workflow_name)}@{escape(s.version)}</td>"
        f"<td>{escape(s.expression)}</td><td>{escape(s.timezone)}</td><td>{_time(s.next_fire_at)}</td>"
        f"<td>{_run_link(s.last_run_id)}</td></tr>"
        for s in schedules
    )
    head = (
        "<tr><th>name</th><th>workflow</th><th>expression</th><th>timezone</th><th>next fire</th><th>last run</th></tr>"
    )
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>" if rows else "<p class='muted'>no schedules</p>"


def _button(run_id: str, action: str, label: str, csrf: str) -> str:
    return (
        f"<form class='inline' method='post' action='/runs/{run_id}/{action}'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'><button id='{action}' type='submit'>{label}</button>"
        "</form>"
    )


def _run_link(run_id: str | None) -> str:
    return f"<a href='/runs/{run_id}'>{run_id}</a>" if run_id else "-"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
