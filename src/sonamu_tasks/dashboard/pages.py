"""HTML of the dashboard's pages. Every value is escaped, long ones are cut; no inline script or style (the
Content-Security-Policy forbids them): the stylesheet and the live refresh are files under static/."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

from ..display import (
    LISTED_EVENTS,
    NO_CHILDREN,
    QUEUE_COLUMNS,
    STEERING_ACTIONS,
    Children,
    ChildRow,
    Messages,
    OutsideWait,
    age_text,
    child_links,
    child_run_ids,
    duration_text,
    heartbeat_text,
    json_excerpt,
    not_steered,
    other_waits,
    outside_wait,
    outside_waits,
    pending_sleep,
    preview,
    queue_row,
    run_queue,
    short_id,
    slots_text,
    stranded_counts,
    unserved_queues,
    worker_queues_text,
)
from ..display_text import escaped
from ..limits import MAX_KEY_LENGTH, MAX_NAME_LENGTH
from ..manager import StrandedRuns
from ..records import QueueStats, RunEventRecord, RunRecord, ScheduleRecord, StepRecord, WorkerRecord
from ..status import RunStatus, StepStatus
from .timeline import timeline_svg

# Shown on a run's page per value (input, output, error, traceback); the whole value is at /api/runs/{id}.
VALUE_LIMIT = 20_000
# Steps drawn and listed on a run's page (a fan-out of 1,000 children records a step per child seen); all of
# them are at /api/runs/{id}.
STEP_LIMIT = 300
# Left as it is in an error's message and traceback (as `sonamu-tasks show` prints them): lines, not `\n`.
NEWLINE = "\n"


NO_MESSAGES = Messages(total=0, exact=True)


def page(
    title: str,
    body: str,
    *,
    refresh_ms: int | None = 1000,
    before: str = "",
    after: str = "",
    read_only: bool = False,
) -> str:
    """A whole page around `body`; /static/live.js refreshes `#live` every `refresh_ms` (None: never). `before`
    and `after` stay as they are (a form being filled in is not replaced). `read_only`: the header says, once,
    that this dashboard changes nothing (why its pages have no buttons)."""
    refresh = f" data-refresh-ms='{refresh_ms}'" if refresh_ms else ""
    mode = (
        "<span id='read-only' title='this dashboard only reads: it cancels, pauses, resumes, retries, sends, "
        "forks and deletes nothing'>read-only</span>"
        if read_only
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)} · sonamu-tasks</title>"
        "<link rel='stylesheet' href='/static/dashboard.css'></head><body><header><a href='/'>Runs</a>"
        "<a href='/queues'>Queues</a><a href='/workers'>Workers</a><a href='/schedules'>Schedules</a>"
        f"{mode}</header>"
        f"<main><h2>{escape(title)}</h2>{before}<div id='live'{refresh}>{body}</div>{after}</main>"
        "<script src='/static/live.js'></script></body></html>"
    )


def runs_filters(workflow: str, status: str, parent: str = "", version: str = "") -> str:
    """The filter form; `parent` (checked by the caller: a run id or empty) lists one run's children."""
    options = "".join(
        f"<option value='{s.value}'{' selected' if s.value == status else ''}>{s.value}</option>" for s in RunStatus
    )
    children_of = ""
    if parent:
        children_of = f"<p id='children-of'>children of {_run_link(parent)} · <a href='/'>all runs</a></p>"
    return (
        f"{children_of}<form method='get' action='/'>workflow <input name='workflow' value='{escape(workflow)}'> "
        f"version <input name='version' size='8' value='{escape(version)}'> "
        f"status <select name='status'><option value=''>any</option>{options}</select> "
        f"parent <input name='parent' size='38' placeholder='run id' value='{escape(parent)}'> "
        "<button type='submit'>Filter</button></form><br>"
    )


def stranded_banner(groups: Sequence[StrandedRuns]) -> str:
    """A warning over the runs list: versions no live worker registers, whose unfinished runs nothing will
    execute. Each links to its runs (`/?workflow=W&version=V`). Empty when there are none."""
    if not groups:
        return ""
    now = datetime.now(UTC)
    items = "".join(
        f"<li data-stranded='{escape(group.workflow)}@{escape(group.version)}'>"
        f"<a href='/?{escape(urlencode({'workflow': group.workflow, 'version': group.version}))}'>"
        f"{_text(group.workflow)}@{_text(group.version)}</a>: {group.total} unfinished ("
        + ", ".join(f"{count} {status}" for status, count in stranded_counts(group).items())
        + f"), the oldest created {age_text(group.oldest_created_at, now)} ago</li>"
        for group in groups
    )
    total = sum(group.total for group in groups)
    return (
        f"<div id='stranded' class='warning'><p><strong>{total} stranded run{'' if total == 1 else 's'}</strong>: "
        "no live worker registers these versions, so nothing will execute their unfinished runs.</p>"
        f"<ul>{items}</ul><p>Start a worker that registers the version, or cancel or fork them from the command "
        "line: <code>sonamu-tasks runs --stranded</code> says how (<a href='/api/stranded'>as JSON</a>).</p></div>"
    )


def runs_table(runs: Sequence[RunRecord], next_cursor: str | None, query: dict[str, str]) -> str:
    if not runs:
        return "<p class='muted'>no runs</p>"
    rows = "".join(
        f"<tr data-run='{run.id}'><td><a href='/runs/{run.id}'>{run.id}</a></td>"
        f"<td>{_text(run.workflow_name)}@{_text(run.version)}</td>"
        f"<td class='status {run.status.value}'>{run.status.value}</td><td>{_parent_cell(run)}</td>"
        f"<td>{run.attempts}</td><td>{_time(run.created_at)}</td>"
        f"<td>{duration_text(run.started_at, run.finished_at)}</td></tr>"
        for run in runs
    )
    more = ""
    if next_cursor:
        more = f"<p><a href='/?{urlencode({**query, 'cursor': next_cursor})}'>older runs</a></p>"
    return (
        "<table><thead><tr><th>run</th><th>workflow</th><th>status</th><th>parent · step</th><th>attempts</th>"
        f"<th>created</th><th>duration</th></tr></thead><tbody>{rows}</tbody></table>{more}"
    )


def run_detail(
    run: RunRecord,
    csrf: str | None,
    *,
    parent: RunRecord | None = None,
    children: Children = NO_CHILDREN,
    messages: Messages = NO_MESSAGES,
    events: Sequence[RunEventRecord] = (),
) -> str:
    """A run's content: `parent` is the record of `run.parent_id` (None if it is gone), `children` its
    children (display.children_of), `messages` its unconsumed messages (display.messages_of), `events` what
    it published. A finished run is marked `data-finished`: nothing on it changes by itself any more, so the
    live refresh stops. `csrf` is the token the page's forms carry; None for a read-only dashboard: no button,
    no fork, no link to a message form."""
    buttons = "" if csrf is None else _steering_buttons(run, csrf)
    request = f" ({run.requested_action} requested)" if run.requested_action else ""
    error = ""
    if run.error:
        where = f" in step {_short(run.error.get('step'), run.id)}" if run.error.get("step") else ""
        error = (
            f"<h3>Error{where}</h3><p>{_short(run.error.get('type'), run.id)}: "
            f"{_short(run.error.get('message'), run.id, keep=NEWLINE)}</p>"
            f"<pre>{_short(run.error.get('traceback', ''), run.id, keep=NEWLINE)}</pre>"
        )
    shown = run.steps[:STEP_LIMIT]
    steps = "".join(
        f"<tr><td>{_text(step.name)}</td><td>{step.kind}</td><td class='status {step.status.value}'>"
        f"{step.status.value}</td><td>{step.attempts}</td><td>{duration_text(step.started_at, step.finished_at)}</td>"
        f"<td>{_step_detail(run, step)}</td><td>{'' if csrf is None else _fork_button(step)}</td></tr>"
        for step in shown
    )
    if len(run.steps) > len(shown):
        steps += (
            f"<tr><td colspan='7' class='muted'>the first {len(shown)} of {len(run.steps)} steps; all of them in "
            f"<a href='/api/runs/{run.id}'>the run as JSON</a></td></tr>"
        )
    shown_run = run if len(shown) == len(run.steps) else _with_steps(run, shown)
    output = f"<h3>Output</h3>{_value(run.output, run.id)}" if run.status is RunStatus.COMPLETED else ""
    finished = " data-finished" if run.status.finished else ""
    return (
        f"<p>{_text(run.workflow_name)} version {_text(run.version)} · "
        f"<span id='run-status' class='status {run.status.value}'{finished}>{run.status.value}</span>{request} · "
        f"attempts {run.attempts} · recoveries {run.recoveries} · created {_time(run.created_at)}</p>"
        f"{_worker(run)}"
        f"{_queue(run)}{_parent(run, parent)}{_forked(run)}<p>{buttons}</p>"
        f"{_waiting_for(run, children, can_send=csrf is not None)}{_children(run, children)}"
        f"<h3>Timeline</h3>{timeline_svg(shown_run, links=child_links(shown))}"
        "<h3>Steps</h3><table><thead><tr><th>step</th><th>kind</th><th>status</th><th>attempts</th>"
        f"<th>duration</th><th>output / error</th><th></th></tr></thead><tbody>{steps}</tbody></table>"
        f"{_messages(run.id, messages)}{_events(run.id, events)}"
        f"<h3>Input</h3>{_value(run.input, run.id)}{output}{error}"
    )


def _steering_buttons(run: RunRecord, csrf: str) -> str:
    """The actions the run's status allows: Cancel, Pause or Resume, Retry."""
    buttons = ""
    if not run.status.finished:
        buttons += _button(run.id, "cancel", "Cancel", csrf)
        # Resume also withdraws a pause a running run has not reached yet (its next step boundary); a run asked to
        # cancel is past pausing.
        if run.status is RunStatus.PAUSED or run.requested_action == "pause":
            buttons += _button(run.id, "resume", "Resume", csrf)
        elif run.requested_action != "cancel":
            buttons += _button(run.id, "pause", "Pause", csrf)
    if run.status in (RunStatus.FAILED, RunStatus.CANCELED):
        buttons += _button(run.id, "retry", "Retry", csrf)
    return buttons


def queues_table(queues: Sequence[QueueStats]) -> str:
    """Each queue's limits (`-` for none), runs executing, due backlog and the oldest due run's wait, starts in
    the current rate window over the limit, due runs parked behind a full concurrency key, live workers that
    claim from it: the columns of `sonamu-tasks queues`."""
    if not queues:
        return "<p class='muted'>no queues: none is declared and no unfinished run is in one</p>"
    head = "".join(f"<th>{escape(column)}</th>" for column in QUEUE_COLUMNS)
    rows = "".join(
        f"<tr data-queue='{escape(stats.name)}'>"
        + "".join(f"<td>{_text(cell)}</td>" for cell in queue_row(stats))
        + "</tr>"
        for stats in queues
    )
    warnings = "".join(f"<p>{_text(warning)}</p>" for warning in unserved_queues(queues))
    return (
        (f"<div id='unserved' class='warning'>{warnings}</div>" if warnings else "")
        + f"<table id='queues'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        "<p class='muted'>due: due and not claimed, the parked ones included; rate window: starts in the current "
        "window / the limit; parked on key: due runs waiting for a free slot of their concurrency key; workers: "
        "live workers that claim from it (0 with runs due: nothing will run them) "
        "(<a href='/api/queues'>as JSON</a>)</p>"
    )


def workers_table(workers: Sequence[WorkerRecord]) -> str:
    now = datetime.now(UTC)
    rows = "".join(
        f"<tr><td>{_text(w.id)}</td><td>{_text(w.host)}</td><td>{w.pid}</td><td>{slots_text(w)}</td>"
        f"<td>{_text(worker_queues_text(w))}</td>"
        f"<td>{_text(', '.join(f'{n}@{v}' for n, v in w.workflows))}</td>"
        f"<td>{heartbeat_text(w, now)}</td></tr>"
        for w in workers
    )
    head = (
        "<tr><th>worker</th><th>host</th><th>pid</th><th>slots in use</th><th>queues</th><th>workflows</th>"
        "<th>heartbeat age</th></tr>"
    )
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>" if rows else "<p class='muted'>no workers</p>"


def schedules_table(schedules: Sequence[ScheduleRecord], served: set[str], csrf: str | None) -> str:
    """`served`: the workflow names a live worker registers (a schedule of another workflow is fired by nobody,
    and can be deleted here: its workflow may have left the code). `csrf`: the Delete form's token; None for a
    read-only dashboard, which has no Delete."""
    rows = "".join(
        f"<tr><td>{_text(s.name)}</td><td>{_text(s.workflow_name)}@{_text(s.version)}</td>"
        f"<td>{_text(s.expression)}</td><td>{_text(s.timezone)}</td><td>{_time(s.next_fire_at)}</td>"
        f"<td>{_run_link(s.last_run_id)}</td>"
        f"<td>{'live workers' if s.workflow_name in served else '<strong>nobody</strong>' + _delete(s, csrf)}</td>"
        "</tr>"
        for s in schedules
    )
    head = (
        "<tr><th>name</th><th>workflow</th><th>expression</th><th>timezone</th><th>next fire</th><th>last run</th>"
        "<th>fired by</th></tr>"
    )
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>" if rows else "<p class='muted'>no schedules</p>"


def _queue(run: RunRecord) -> str:
    """The run's queue, priority and concurrency key, when it is not in the default queue with neither."""
    parts = run_queue(run)
    if not parts:
        return ""
    shown = " · ".join(
        f"queue <a href='/queues'>{_text(value)}</a>" if label == "queue" else f"{label} <code>{_text(value)}</code>"
        for label, value in parts
    )
    return f"<p id='run-queue'>{shown}</p>"


def _forked(run: RunRecord) -> str:
    if run.forked_from is None:
        return ""
    return (
        f"<p id='forked'>forked from <a href='/runs/{run.forked_from}'>{run.forked_from}</a> at its step "
        f"<code>{_text(run.forked_step or '-')}</code></p>"
    )


def _parent(run: RunRecord, parent: RunRecord | None) -> str:
    if run.parent_id is None:
        return ""
    what = (
        f"{_text(parent.workflow_name)}@{_text(parent.version)}, "
        f"<span class='status {parent.status.value}'>{parent.status.value}</span>"
        if parent
        else "no longer stored"
    )
    detached = " · detached (canceling the parent leaves it running)" if run.detached else ""
    return (
        f"<p id='parent'>child of <a href='/runs/{run.parent_id}'>{run.parent_id}</a> ({what}) · "
        f"started by its step <code>{_text(run.parent_step or '-')}</code>{detached}</p>"
    )


def _waiting_for(run: RunRecord, children: Children, *, can_send: bool) -> str:
    """What a waiting run waits for: its unfinished children, and the first of its pending sleeps. `can_send`:
    the page has the message form, which a receive links to."""
    if run.status is not RunStatus.WAITING:
        return ""
    parts = []
    if children.unfinished_count:
        links = ", ".join(
            f"<a href='/runs/{row.id}'>{_text(row.step)}</a> ({row.status.value})" for row in children.unfinished
        )
        hidden = children.unfinished_count - len(children.unfinished)
        more = f" and <a href='/?parent={run.id}'>{hidden} more</a>" if hidden else ""
        parts.append(
            f"{children.unfinished_count} unfinished {_children_word(children.unfinished_count)}: {links}{more}"
        )
    parts.extend(
        f"<span class='outside-wait'>{_outside_wait(wait)}</span>"
        + (" · <a href='#send-message'>send it one</a>" if can_send and wait.kind == "receive" else "")
        for wait in outside_waits(run)
    )
    parts.extend(_text(line) for line in other_waits(run))
    sleep = pending_sleep(run)
    if sleep is not None:
        parts.append(f"sleep <code>{_text(sleep.name)}</code> until {_time(sleep.wake_at)}")
    if not parts:
        parts.append("nothing left unfinished: it is about to wake")
    return "<div id='waits-for'><h3>Waiting for</h3>" + "".join(f"<p>{part}</p>" for part in parts) + "</div>"


def send_form(run: RunRecord, csrf: str) -> str:
    """A form to send the run a message (POST /runs/{id}/send), its topic filled in with the one its first
    waiting receive waits on. Outside the live part of the page, so a refresh does not wipe what is being
    typed; /static/live.js removes it (`data-unfinished-only`) once the run is finished."""
    topic = next((wait.topic for wait in outside_waits(run) if wait.topic is not None), "")
    return (
        f"<section id='send-message' data-unfinished-only><h3>Send a message</h3>"
        f"<form method='post' action='/runs/{run.id}/send'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'>"
        f"<label>topic <input name='topic' value='{escape(topic)}' required maxlength='{MAX_KEY_LENGTH}'></label>"
        "<label>message (JSON) <textarea name='message' rows='3' cols='60' required "
        "placeholder='{&quot;approved&quot;: true}'></textarea></label>"
        f"<label>idempotency key (optional) <input name='idempotency_key' maxlength='{MAX_KEY_LENGTH}'></label>"
        "<button id='send' type='submit'>Send</button></form></section>"
    )


def fork_form(run: RunRecord, csrf: str) -> str:
    """The form each step's "Fork from here" button submits (POST /runs/{id}/fork with that step's name), and
    its one field: the version the fork runs on. It comes before the live part of the page, so that what is
    typed survives a refresh, and its first submit button is a disabled one, so that Enter in the field submits
    nothing (the default button of a form is its first, and every step's button belongs to this form)."""
    return (
        f"<form id='fork-form' class='fork' method='post' action='/runs/{run.id}/fork'>"
        "<button type='submit' disabled hidden></button>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'>"
        f"<label>Fork onto version <input name='version' size='8' maxlength='{MAX_NAME_LENGTH}' "
        f"placeholder='{escape(run.version)}'></label> "
        "<span class='muted'>(empty: its own). “Fork from here” on a step starts a new run of the same input that "
        "keeps the checkpoints of the steps before it and executes from that step on; this run is left as it is."
        "</span></form>"
    )


def forked_notice(source: str | None, step: str) -> str:
    """What the new run's page says after a fork: `source` is the forked run's id (checked), `step` where from."""
    if source is None:
        return ""
    at = f" at step <code>{_text(step[:MAX_NAME_LENGTH])}</code>" if step else ""
    return f"<p id='notice' class='notice'>Forked from run {_run_link(source)}{at}.</p>"


def sent_notice(sent: str) -> str:
    """What the send form's redirect says: `?sent=1` stored, `?sent=again` a repeated idempotency key."""
    if sent == "1":
        return "<p id='notice' class='notice'>Message sent.</p>"
    if sent == "again":
        return (
            "<p id='notice' class='notice'>Not sent again: that idempotency key was used for this run before "
            "(the message is stored once).</p>"
        )
    return ""


def deleted_notice(name: str) -> str:
    """What the schedules page says after its Delete (`?deleted=NAME`)."""
    shown = _text(name[:MAX_NAME_LENGTH])
    return f"<p id='notice' class='notice'>Deleted schedule <code>{shown}</code>.</p>" if name else ""


def _delete(schedule: ScheduleRecord, csrf: str | None) -> str:
    if csrf is None:
        return ""
    return (
        " <form class='inline' method='post' action='/schedules/delete'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'>"
        f"<input type='hidden' name='name' value='{escape(schedule.name)}'>"
        "<button class='delete-schedule' type='submit'>Delete</button></form>"
    )


def not_steered_notice(run_id: str, action: str, status: str) -> str:
    """What a steering action's redirect says when it did nothing (`?not_steered=retry&status=completed`): the
    sentence `sonamu-tasks retry` prints. Empty for anything but an action and a status."""
    if action not in STEERING_ACTIONS or status not in {known.value for known in RunStatus}:
        return ""
    refusal = not_steered(action, run_id, RunStatus(status))
    return f"<p id='notice' class='notice'>Nothing done: {_text(refusal)}.</p>" if refusal else ""


def _outside_wait(wait: OutsideWait, *, step: bool = True) -> str:
    """A receive or event wait: what it waits for, its step, its timeout."""
    if wait.kind == "receive":
        what = f"message on topic <code>{_text(wait.topic or '')}</code>"
    else:
        key = f" with key <code>{_text(wait.key)}</code>" if wait.key else " (no key)"
        what = f"event <code>{_text(wait.event or '')}</code>{key}"
    until = f"times out {_time(wait.timeout_at)}" if wait.timeout_at else "no timeout"
    return f"{what} (step <code>{_text(wait.step)}</code>) · {until}" if step else f"{what} · {until}"


def _messages(run_id: str, messages: Messages) -> str:
    """The oldest unconsumed messages: topic, payload preview, idempotency key, when sent."""
    if not messages.total:
        return ""
    now = datetime.now(UTC)
    rows = "".join(
        f"<tr data-message='{m.id}'><td>{_text(m.topic)}</td><td>{escape(preview(m.payload, 80))}</td>"
        f"<td>{_text(m.idempotency_key or '-')}</td><td>{_time(m.created_at)} ({age_text(m.created_at, now)} ago)"
        "</td></tr>"
        for m in messages.listed
    )
    more = ""
    if messages.more > 0:
        count = messages.more if messages.exact else f"more than {messages.more}"
        more = f"<p>and {count} more; <a href='/api/runs/{run_id}'>the run as JSON</a> lists the first 100</p>"
    return (
        f"<h3>Messages</h3><p id='message-count'>{escape(messages.count_text())}, oldest first</p>"
        "<table id='messages'><thead><tr><th>topic</th><th>message</th><th>idempotency key</th><th>sent</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>{more}"
    )


def _events(run_id: str, events: Sequence[RunEventRecord]) -> str:
    """The events the run published (set_event): key, value preview, when last set."""
    if not events:
        return ""
    rows = "".join(
        f"<tr><td>{_text(e.key)}</td><td>{escape(preview(e.value, 80))}</td><td>{_time(e.updated_at)}</td></tr>"
        for e in events[:LISTED_EVENTS]
    )
    more = ""
    if len(events) > LISTED_EVENTS:
        more = f"<p>and {len(events) - LISTED_EVENTS} more in <a href='/api/runs/{run_id}'>the run as JSON</a></p>"
    return (
        f"<h3>Events</h3><p>{len(events)} published</p><table id='events'><thead><tr><th>key</th><th>value</th>"
        f"<th>updated</th></tr></thead><tbody>{rows}</tbody></table>{more}"
    )


def _children(run: RunRecord, children: Children) -> str:
    """Counts per status (each a link to those children), the first few children, a link to all of them."""
    if children is NO_CHILDREN:
        return ""
    counts = ", ".join(
        f"<a class='status {status}' href='/?{escape(urlencode({'parent': run.id, 'status': status}))}'>"
        f"{count} {status}</a>"
        for status, count in children.counts.items()
    )
    rows = "".join(_child_row(row) for row in children.listed)
    table = (
        "<table id='children'><thead><tr><th>child</th><th>step</th><th>workflow</th><th>status</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if rows
        else ""
    )
    total = children.total
    more = f"<p><a href='/?parent={run.id}'>all {total} children</a> ({children.more} not shown above)</p>"
    kept = _text(children.kept_text())
    return f"<h3>Children</h3><p id='child-counts'>{total}: {counts or 'none found'}{kept}</p>{table}" + (
        more if children.more > 0 else ""
    )


def _worker(run: RunRecord) -> str:
    """The worker executing a running run, and until when its lease holds (which worker to look at)."""
    if run.status is not RunStatus.RUNNING or not run.worker_id:
        return ""
    return f"<p id='run-worker'>worker <code>{_text(run.worker_id)}</code> · lease until {_time(run.available_at)}</p>"


def _child_row(row: ChildRow) -> str:
    detached = " (detached)" if row.detached else ""
    return (
        f"<tr data-child='{row.id}'><td><a href='/runs/{row.id}'>{row.id}</a></td><td>{_text(row.step)}</td>"
        f"<td>{_text(row.workflow_name)}@{_text(row.version)}</td>"
        f"<td class='status {row.status.value}'>{row.status.value}{detached}</td></tr>"
    )


def _step_detail(run: RunRecord, step: StepRecord) -> str:
    """A step's output or error; a child step links to its child (a fan-out to the list of its children)."""
    if step.kind == "child" and step.error is None:
        ids = child_run_ids(step)
        output = step.output if isinstance(step.output, dict) else {}
        if "run_ids" in output:
            return f"children → <a href='/?parent={run.id}'>{len(ids)} runs</a>"
        if ids:
            outcome = output.get("outcome")
            seen = f" ({_text(str(outcome.get('status')))})" if isinstance(outcome, dict) else ""
            return f"child → <a class='child' href='/runs/{ids[0]}'>{ids[0]}</a>{seen}"
    if step.kind == "sleep" and step.wake_at is not None:
        return f"{'wakes' if step.status is StepStatus.SLEEPING else 'woke'} {_time(step.wake_at)}"
    wait = outside_wait(step)
    if wait is not None:
        return _outside_wait(wait, step=False)
    return escape(preview(step.output if step.error is None else step.error.get("message"), 80))


def _parent_cell(run: RunRecord) -> str:
    if run.parent_id is None:
        return "-"
    return (
        f"<a href='/runs/{run.parent_id}' title='{run.parent_id}'>{escape(short_id(run.parent_id))}</a> "
        f"{_text(run.parent_step or '')}"
    )


def _children_word(count: int) -> str:
    return "child" if count == 1 else "children"


def _fork_button(step: StepRecord) -> str:
    """A step's "Fork from here": a submit button of the page's fork form (`fork_form`) carrying the step."""
    return (
        f"<button class='fork' type='submit' form='fork-form' name='from_step' value='{escape(step.name)}'>"
        "Fork from here</button>"
    )


def _with_steps(run: RunRecord, steps: Sequence[StepRecord]) -> RunRecord:
    return dataclasses.replace(run, steps=tuple(steps))


def _button(run_id: str, action: str, label: str, csrf: str) -> str:
    return (
        f"<form class='inline' method='post' action='/runs/{run_id}/{action}'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'><button id='{action}' type='submit'>{label}</button>"
        "</form>"
    )


def _run_link(run_id: str | None) -> str:
    return f"<a href='/runs/{run_id}'>{run_id}</a>" if run_id else "-"


def _value(value: Any, run_id: str) -> str:
    """`value` as indented JSON in a <pre>, at most VALUE_LIMIT characters of it."""
    text, cut = json_excerpt(value, VALUE_LIMIT, indent=2)
    return f"<pre>{escape(text)}</pre>{_more(run_id) if cut else ''}"


def _short(value: Any, run_id: str, *, keep: str = "") -> str:
    """Text of an error field as `_text` shows it (`keep`: the characters left as they are, a traceback's
    newlines), at most VALUE_LIMIT characters."""
    text = str(value)
    if len(text) <= VALUE_LIMIT:
        return _text(text, keep=keep)
    return _text(text[:VALUE_LIMIT], keep=keep) + _more(run_id)


def _text(value: Any, *, keep: str = "") -> str:
    """Stored text (a name, an error message) for a page: HTML-escaped, and its control characters and
    bidirectional overrides escaped (`\\u202e`, `\\u001b`) as the value previews have them, so that no stored
    name or message can reorder or hide what an operator reads. Not for attribute values sent back as they
    are (the fork button's step name)."""
    return escape(escaped(str(value), keep=keep))


def _more(run_id: str) -> str:
    return (
        f"<p class='truncated'>cut at {VALUE_LIMIT:,} characters; "
        f"<a href='/api/runs/{run_id}'>the whole run as JSON</a></p>"
    )


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
