"""The `sonamu-tasks` command: run workers, see schedules and queues, start runs, send messages and events, find
stranded runs, cancel and fork runs one at a time or a whole version at once."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from . import arguments, limits
from .cli_config import CliOptions, command_config, flat
from .config import Config
from .display import (
    LISTED_EVENTS,
    NO_CHILDREN,
    NO_VALUES,
    QUEUE_COLUMNS,
    Children,
    ChildRow,
    Messages,
    age_text,
    child_step_text,
    children_of,
    duration_text,
    heartbeat_text,
    messages_of,
    not_steered,
    other_waits,
    outside_wait,
    outside_waits,
    pending_sleep,
    preview,
    queue_row,
    queue_summary,
    run_queue,
    short_id,
    slots_text,
    stranded_counts,
    stranded_summary,
    unserved_queues,
    wake_time,
    worker_queues_text,
)
from .display_text import MAX_CELL_WIDTH, escaped, fit, format_table
from .duration import parse_duration
from .errors import (
    BackendUnavailable,
    ConfigError,
    InvalidInput,
    InvalidValue,
    RunNotFound,
    ScheduleInUse,
    ScheduleNotFound,
    SonamuTasksError,
    WorkflowFailed,
)
from .manager import RunPage, StopSignals, StrandedRuns, WorkflowManager
from .queue import Queue, served_queues
from .records import (
    STALE_AFTER,
    QueueStats,
    RunEventRecord,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    WorkerRecord,
    served_workflows,
)
from .run_json import run_detail, run_summary
from .schedule import zone
from .status import RunStatus

T = TypeVar("T")
logger = logging.getLogger("sonamu_tasks.cli")


class _Commands(click.Group):
    """Every failure is one line on stderr and a non-zero exit, never a traceback: a usage error exits 2, any
    other error 1. An error nobody anticipated keeps its traceback in the debug log (`-v`)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as error:
            raise _one_line(error) from error

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise _one_line(error) from error
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            raise  # the reader of stdout is gone (`runs | head -1`): click's main ends quietly, exit 1
        except SonamuTasksError as error:
            raise click.ClickException(flat(str(error))) from error
        except Exception as error:
            logger.debug("unexpected error", exc_info=True)
            raise click.ClickException(
                f"{type(error).__name__}: {flat(str(error))} (run with -v for the traceback)"
            ) from error


class _UsageError(click.UsageError):
    """A usage error on one line: the message and where to look, without click's usage block."""

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{hint}", file=file, err=file is None)


def _one_line(error: click.UsageError) -> click.UsageError:
    if isinstance(error, (_UsageError, getattr(click.exceptions, "NoArgsIsHelpError", ()))):
        return error  # already one line, or the help text asked for by giving no arguments
    return _UsageError(flat(error.format_message()), error.ctx)


def _checked(check: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """A click callback that passes a value through one of `arguments`' checks: a bad value is a usage error
    naming the option, before anything reaches the database."""

    def callback(context: click.Context, param: click.Parameter, value: str | None) -> Any:
        try:
            return None if value is None else check(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None

    return callback


_run_id = _checked(arguments.run_id)


def _queue_names(context: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """`--queue` (repeatable): each a storable queue name, checked before anything starts; repeats dropped."""
    try:
        return tuple(dict.fromkeys(limits.check_queue_name(value) for value in values))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


"""A run id, checked before it reaches the database (PostgreSQL answers a malformed UUID with an error)."""

_LIST_FILTERS = ("workflow", "version", "queue", "statuses", "parent_id", "since", "limit", "cursor")
"""The filters of `runs`, none of which goes with --stranded."""


@click.group(cls=_Commands)
@click.option(
    "--config",
    "config_spec",
    metavar="MODULE:ATTR",
    help="Config object (env SONAMU_TASKS_CONFIG; default sonamu_config:config).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(context: click.Context, config_spec: str | None, verbose: bool) -> None:
    """sonamu-tasks: durable workflows on PostgreSQL."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # we log reconnects ourselves
    context.obj = CliOptions(config_spec, verbose)


@main.command()
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; above 1, a supervisor starts them, restarts a crashed one and stops them together.",
)
@click.option("--concurrency", type=click.IntRange(min=1), help="Runs at once per process (overrides worker_options).")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    metavar="NAME",
    callback=_queue_names,
    help="Serve only this queue (repeatable; overrides worker_options.queues; default: every queue of the "
    "workflows it registers).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve Prometheus metrics at http://127.0.0.1:PORT/metrics (worker i of --processes N: PORT+i).",
)
@click.option("--supervisor-pid", type=int, hidden=True)  # given by the supervisor to the workers it starts
@click.pass_context
def worker(
    context: click.Context,
    processes: int,
    concurrency: int | None,
    queues: tuple[str, ...],
    metrics_port: int | None,
    supervisor_pid: int | None,
) -> None:
    """Run a worker and the cron scheduler until SIGTERM/SIGINT (graceful shutdown); with --processes N, N
    worker processes under a supervisor."""
    from .supervisor import WORKER_INDEX_ENV, Supervisor, stop_when_orphaned, worker_command

    config = command_config(context, enable_worker=True, announce=True, creates=True)
    if concurrency is not None:
        config.tasks.worker_options.concurrency = concurrency
    if queues:
        config.tasks.worker_options.queues = queues
    if metrics_port is not None and processes == 1:
        config.tasks.worker_options.metrics_port = metrics_port + int(os.environ.get(WORKER_INDEX_ENV, "0"))
    if processes > 1:
        options: CliOptions = context.obj
        command = worker_command(
            config_spec=options.config_spec,
            verbose=options.verbose,
            concurrency=concurrency,
            metrics_port=metrics_port,
            queues=queues,
        )
        stop_timeout_s = config.tasks.worker_options.shutdown_grace_ms / 1000 + 30
        sys.exit(Supervisor(command, processes, stop_timeout_s=stop_timeout_s).run())
    if supervisor_pid is not None:
        stop_when_orphaned(supervisor_pid)
    asyncio.run(_serve(config, reload=False))


@main.command()
@click.pass_context
def dev(context: click.Context) -> None:
    """Like `worker`, and re-register workflows when their files change (runs in flight keep going)."""
    config = command_config(context, enable_worker=True, announce=True, creates=True)
    asyncio.run(_serve(config, reload=True))


async def _serve(config: Config, *, reload: bool) -> None:
    manager = WorkflowManager(config)
    with StopSignals() as signals:
        async with manager:
            _report_discovery(manager)
            watcher = asyncio.create_task(_watch(manager)) if reload else None
            await signals.stopped.wait()
            click.echo("shutting down: finishing running steps", err=True)
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)


async def _watch(manager: WorkflowManager) -> None:
    try:
        from watchfiles import PythonFilter, awatch
    except ImportError as error:
        raise click.ClickException("dev mode needs watchfiles: pip install 'sonamu-tasks[dev]'") from error
    paths = manager.watched_paths
    if not paths:
        click.echo("dev: no workflow packages configured (workflows=[...]); nothing to watch", err=True)
        return
    watching = False
    async for changes in awatch(*paths, watch_filter=PythonFilter(), yield_on_timeout=True, rust_timeout=500):
        if not watching:  # the first (empty) yield: the watcher is in place
            click.echo(f"dev: watching {', '.join(str(p) for p in paths)}", err=True)
            watching = True
        if not changes:
            continue
        names = sorted({change[1] for change in changes})
        click.echo(f"dev: changed {', '.join(names)}; re-synchronizing", err=True)
        try:
            await manager.synchronize()
        except SonamuTasksError as error:
            click.echo(f"dev: synchronize failed: {error}", err=True)
            continue
        _report_discovery(manager)


def _report_discovery(manager: WorkflowManager) -> None:
    for error in manager.discovery_errors:
        click.echo(f"error: workflow module {error.path} failed to load and was skipped:\n{error.traceback}", err=True)
    registered = ", ".join(f"{name}@{version}" for name, version in manager.registry.keys()) or "none"
    click.echo(f"workflows: {registered}", err=True)
    if manager.config.tasks.enable_worker:
        _report_queues(manager)


def _report_queues(manager: WorkflowManager) -> None:
    """The queues the worker serves; a chosen one that neither a registered workflow nor the config declares is
    likely a typo, and is said to be."""
    chosen = manager.config.tasks.worker_options.queues
    served = served_queues(chosen, manager.registry)
    click.echo(f"queues: {', '.join(served) or 'none'}", err=True)
    if chosen is None:
        return
    known = {definition.queue_name for definition in manager.registry}
    known |= {queue.name for queue in manager.config.tasks.queues if isinstance(queue, Queue)}
    for name in served:
        if name not in known:
            click.echo(
                f"warning: queue {name!r} is neither the queue of a workflow this worker registers nor declared in "
                f"the config: it takes only runs started with run(queue={name!r})",
                err=True,
            )


@main.command()
@click.pass_context
def migrate(context: click.Context) -> None:
    """Create or upgrade the database schema (safe to run from many processes at once)."""
    config = command_config(context, enable_worker=False, announce=True, creates=True)

    applied = _steering(WorkflowManager(config).migrate())
    click.echo(f"applied: {', '.join(applied)}" if applied else "already up to date")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def schedules(context: click.Context, as_json: bool) -> None:
    """List cron schedules: name, expression, timezone, next fire, last run."""
    config = command_config(context, enable_worker=False)

    async def collect() -> list[dict[str, Any]]:
        async with WorkflowManager(config, read_only=True) as manager:
            records = await manager.list_schedules()
            served = served_workflows(await manager.list_workers(), datetime.now(UTC))
            rows = []
            for record in records:
                last = await _run_or_none(manager, record.last_run_id)
                rows.append(
                    {
                        "name": record.name,
                        "workflow": f"{record.workflow_name}@{record.version}",
                        "served": record.workflow_name in served,
                        "expression": record.expression,
                        "timezone": record.timezone,
                        "next_fire_at": record.next_fire_at.isoformat(),
                        "next_fire_local": _local(record.next_fire_at, record.timezone),
                        "last_fire_at": record.last_fire_at.isoformat() if record.last_fire_at else None,
                        "last_run_id": record.last_run_id,
                        "last_run_status": last.status.value if last else None,
                    }
                )
            return rows

    rows = _steering(collect())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no schedules")
        return
    headers = ["NAME", "WORKFLOW", "EXPRESSION", "TIMEZONE", "NEXT FIRE (LOCAL)", "LAST RUN", "FIRED BY"]
    table = [
        [
            r["name"],
            r["workflow"],
            r["expression"],
            r["timezone"],
            r["next_fire_local"],
            f"{r['last_run_id']} {r['last_run_status']}" if r["last_run_id"] else "-",
            "live workers" if r["served"] else "nobody",
        ]
        for r in rows
    ]
    click.echo(format_table(headers, table))
    if not all(r["served"] for r in rows):
        click.echo(
            "\nA schedule fired by nobody: no live worker registers its workflow (its fleet is down, or the workflow "
            "left the code and its schedule stays stored). It fires again, once for the latest missed time, when a "
            "worker whose code declares it starts; `sonamu-tasks delete-schedule NAME` deletes one whose workflow "
            "is gone."
        )


@main.command("delete-schedule")
@click.argument("names", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def delete_schedule(context: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Delete stored schedules NAMES whose workflow no live worker registers (the workflow left the code).
    Refused, deleting none, for a name not stored or a schedule live workers fire: remove it from the code."""
    config = command_config(context, enable_worker=False)

    async def delete() -> list[ScheduleRecord]:
        async with WorkflowManager(config) as manager:
            stored = {record.name: record for record in await manager.list_schedules()}
            # Every name checked first: a typo or a live schedule among them deletes none.
            unknown = [name for name in names if name not in stored]
            if unknown:
                known = ", ".join(sorted(stored)) or "none"
                raise ScheduleNotFound(f"no schedule named {', '.join(map(repr, unknown))} is stored (stored: {known})")
            served = served_workflows(await manager.list_workers(), datetime.now(UTC))
            live = [f"{n!r} ({stored[n].workflow_name})" for n in names if stored[n].workflow_name in served]
            if live:
                raise ScheduleInUse(
                    f"live workers register the workflow of schedule {', '.join(live)}: remove the schedule from "
                    "the code instead (its workers then delete it); nothing was deleted"
                )
            return [await manager.delete_schedule(name) for name in dict.fromkeys(names)]

    deleted = _steering(delete())
    if as_json:
        rows = [{"name": r.name, "workflow": r.workflow_name, "expression": r.expression} for r in deleted]
        click.echo(json.dumps(rows))
        return
    for record in deleted:
        click.echo(f"deleted schedule {record.name} ({record.workflow_name}, {record.expression})")


@main.command("run")
@click.argument("name", callback=_checked(arguments.workflow_name))
@click.option(
    "--version",
    "version",
    callback=_checked(arguments.version),
    help="Workflow version (needed when this process does not register it).",
)
@click.option("--input", "input_json", default=None, help="Input as JSON (default null).")
@click.option(
    "--inputs",
    "inputs_file",
    type=click.File("r", encoding="utf-8"),
    help="A JSON Lines file (- for stdin): one run per line, all started in one statement or none.",
)
@click.option(
    "--idempotency-key",
    callback=_checked(arguments.idempotency_key),
    help="A repeated key returns the existing run; with --inputs, each run's key is KEY:LINE.",
)
@click.option("--start-at", help="Delay as a duration (10m) or an ISO datetime with timezone.")
@click.option("--deadline", help="Duration (1h) or ISO datetime after which the run fails instead of running.")
@click.option("--queue", callback=_checked(arguments.queue_name), help="The queue (default: the workflow's).")
@click.option("--priority", type=int, default=0, show_default=True, help="Lower starts first within its queue.")
@click.option("--concurrency-key", help="The key a per-key concurrency limit of the queue counts by.")
@click.option("--wait", is_flag=True, help="Wait for the result; exit 1 if the run fails.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="With --wait: seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="With --inputs: the runs' lines and ids as JSON.")
@click.pass_context
def run_command(
    context: click.Context,
    name: str,
    version: str | None,
    input_json: str | None,
    inputs_file: Any,
    idempotency_key: str | None,
    start_at: str | None,
    deadline: str | None,
    queue: str | None,
    priority: int,
    concurrency_key: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Start a run of workflow NAME, or one per line of --inputs."""
    start = _moment(start_at, "--start-at")
    end = _moment(deadline, "--deadline")
    spec = {"name": name, "version": version} if version else {"name": name}
    options: dict[str, Any] = {
        "start_at": start,
        "deadline": end,
        "queue": queue,
        "priority": priority,
        "concurrency_key": concurrency_key,
    }
    if inputs_file is not None:
        if input_json is not None:
            raise click.UsageError("--input starts one run and --inputs one per line: give one of them", context)
        if wait:
            raise click.UsageError(
                f"--wait waits for one run; watch these with `sonamu-tasks runs --workflow {name}`", context
            )
        lines = _input_lines(inputs_file)
        config = command_config(context, enable_worker=False, creates=True)
        sys.exit(_steering(_start_lines(config, spec, lines, idempotency_key, options, as_json)))
    if as_json:
        raise click.UsageError("--json goes with --inputs (one run prints its id)", context)
    value = None if input_json is None else _json_option(input_json, "--input")
    config = command_config(context, enable_worker=False, creates=True)

    async def start_run() -> int:
        async with WorkflowManager(config) as manager:
            handle = await manager.run(spec, value, idempotency_key=idempotency_key, **options)
            click.echo(handle.id)
            if not wait:
                return 0
            try:
                result = await handle.result(timeout=timeout)
            except WorkflowFailed as failure:
                click.echo(f"run {handle.id} {failure.status}: {failure}", err=True)
                if failure.error.get("traceback"):
                    click.echo(failure.error["traceback"], err=True)
                return 1
            click.echo(json.dumps(result, indent=2))
            return 0

    sys.exit(_steering(start_run()))


def _input_lines(file: Any) -> list[tuple[int, Any]]:
    """The inputs of `run --inputs`: (line number, value) for each line that is not blank, every one checked
    before any run starts."""
    lines: list[tuple[int, Any]] = []
    for number, line in enumerate(file, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            lines.append((number, arguments.json_value(text)))
        except ValueError as error:
            raise click.BadParameter(f"line {number}: {error}", param_hint="--inputs") from None
    return lines


async def _start_lines(
    config: Config,
    spec: dict[str, str],
    lines: list[tuple[int, Any]],
    key: str | None,
    options: dict[str, Any],
    as_json: bool,
) -> int:
    """One run per line, in one run_many call: all stored, or none and the error names the line."""
    began = time.monotonic()
    async with WorkflowManager(config) as manager:
        try:
            handles = await manager.run_many(
                spec,
                [value for _, value in lines],
                idempotency_keys=None if key is None else [f"{key}:{number}" for number, _ in lines],
                **options,
            )
        except InvalidInput as error:
            # run_many names an item by its index; the person wrote lines (blank ones are skipped).
            problems = [_line_named(problem, lines) for problem in error.problems]
            raise InvalidInput(error.workflow, problems) from error
    if as_json:
        click.echo(json.dumps([{"line": n, "id": h.id} for (n, _), h in zip(lines, handles, strict=True)]))
    else:
        for handle in handles:
            click.echo(handle.id)
        runs = "run" if len(handles) == 1 else "runs"
        click.echo(f"started {len(handles):,} {runs} of {spec['name']} in {time.monotonic() - began:.1f}s", err=True)
    return 0


def _line_named(problem: str, lines: list[tuple[int, Any]]) -> str:
    """'inputs[INDEX]: ...' (run_creation's naming of a run_many item) as 'line N: ...'."""
    head, sep, rest = problem.partition("]: ")
    if sep and head.startswith("inputs[") and head[len("inputs[") :].isdigit():
        index = int(head[len("inputs[") :])
        if index < len(lines):
            return f"line {lines[index][0]}: {rest}"
    return problem


_STATUSES = click.Choice([s.value for s in RunStatus])


@main.command()
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--version", "version", callback=_checked(arguments.version), help="Only runs of this version.")
@click.option("--queue", "queue", callback=_checked(arguments.queue_name), help="Only runs of this queue.")
@click.option("--status", "statuses", multiple=True, type=_STATUSES, help="Only runs in this status (repeatable).")
@click.option("--parent", "parent_id", callback=_run_id, metavar="RUN_ID", help="Only the children of this run.")
@click.option("--since", help="Only runs created in the last DURATION (1h, 7d) or after an ISO datetime.")
@click.option("--limit", type=click.IntRange(1, arguments.MAX_LIMIT), default=20, show_default=True)
@click.option("--cursor", callback=_run_id, help="The next_cursor printed by the previous page.")
@click.option(
    "--stranded",
    is_flag=True,
    help="Instead of runs: unfinished runs per (workflow, version) that no live worker registers.",
)
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help=f"With --stranded: a worker is live if it heartbeat in the last SECONDS (default {STALE_AFTER:g}).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def runs(
    context: click.Context,
    workflow: str | None,
    version: str | None,
    queue: str | None,
    statuses: tuple[str, ...],
    parent_id: str | None,
    since: str | None,
    limit: int,
    cursor: str | None,
    stranded: bool,
    stale_after: float | None,
    as_json: bool,
) -> None:
    """List runs, newest first (one page; --cursor for the next). A child run shows its parent's id (short).
    With --stranded, the unfinished runs no live worker will execute, counted per (workflow, version)."""
    if stranded:
        given = _given(context, _LIST_FILTERS)
        if given:
            raise click.UsageError(f"--stranded lists every version; it takes no {', '.join(given)}", context)
        _stranded(context, STALE_AFTER if stale_after is None else stale_after, as_json)
        return
    if stale_after is not None:
        raise click.UsageError("--stale-after goes with --stranded", context)
    config = command_config(context, enable_worker=False)
    created_after = _since(since)

    async def fetch() -> RunPage:
        async with WorkflowManager(config, read_only=True) as manager:
            return await manager.list_runs(
                workflow=workflow,
                version=version,
                status=statuses or None,
                created_after=created_after,
                limit=limit,
                cursor=cursor,
                parent_id=parent_id,
                queue=queue,
                value_limit=NO_VALUES,  # neither the table nor --json shows a value
            )

    page = _steering(fetch())
    if as_json:
        payload = {"items": [run_summary(run) for run in page.items], "next_cursor": page.next_cursor}
        click.echo(json.dumps(payload, indent=2))
        return
    # Children of one parent: the step that started each says more than the parent's id, the same on every row.
    by_step = parent_id is not None
    headers = ["ID", "WORKFLOW", "STATUS", "STEP" if by_step else "PARENT", "ATTEMPTS", "CREATED", "DURATION"]
    rows = [
        [
            run.id,
            f"{run.workflow_name}@{run.version}",
            _status_text(run),
            _step_cell(run.parent_step) if by_step else _parent_text(run),
            run.attempts,
            _time(run.created_at),
            duration_text(run.started_at, run.finished_at),
        ]
        for run in page.items
    ]
    click.echo(format_table(headers, rows) if rows else "no runs")
    if page.next_cursor:
        click.echo(f"more: --cursor {page.next_cursor}")


def _step_cell(step: str | None) -> str:
    """The step that started a child, cut from its start: fan-out children differ only by their `[index]`."""
    return fit(escaped(step or "-"), MAX_CELL_WIDTH, keep_end=True)


def _given(context: click.Context, names: Sequence[str]) -> list[str]:
    """The options among `names` (parameter names) given on the command line, as spelled there (`--status`)."""
    return [
        param.opts[0]
        for param in context.command.params
        if param.name in names and context.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
    ]


def _stranded(context: click.Context, stale_after: float, as_json: bool) -> None:
    """`runs --stranded`: per (workflow, version) no live worker registers, its unfinished runs per status."""
    config = command_config(context, enable_worker=False)

    async def fetch() -> list[StrandedRuns]:
        async with WorkflowManager(config, read_only=True) as manager:
            return await manager.stranded_runs(stale_after=stale_after)

    groups = _steering(fetch())
    now = datetime.now(UTC)
    if as_json:
        summary = {"stale_after": stale_after, "groups": [stranded_summary(group, now) for group in groups]}
        click.echo(json.dumps(summary, indent=2))
        return
    if not groups:
        click.echo(
            "no stranded runs: every unfinished run's version is registered by a worker that heartbeat in the "
            f"last {stale_after:g}s"
        )
        return
    statuses = [status for status in RunStatus if any(group.counts.get(status) for group in groups)]
    headers = ["WORKFLOW", "VERSION", *(status.value.upper() for status in statuses), "TOTAL", "OLDEST"]
    rows = [
        [
            group.workflow,
            group.version,
            *(group.counts.get(status, 0) for status in statuses),
            group.total,
            age_text(group.oldest_created_at, now),
        ]
        for group in groups
    ]
    click.echo(format_table(headers, rows))
    total = sum(group.total for group in groups)
    click.echo(
        f"\n{_count(total, 'unfinished run')} of {_count(len(groups), 'version')} that no live worker registers "
        f"(none heartbeat in the last {stale_after:g}s): nothing will execute them."
    )
    click.echo(_stranded_hint(groups[0], len(groups)))


def _stranded_hint(group: StrandedRuns, groups: int) -> str:
    """What to do about stranded runs, spelled out for the first group."""
    select = f"--workflow {shlex.quote(group.workflow)} --version {shlex.quote(group.version)}"
    statuses = " ".join(f"--status {status}" for status in stranded_counts(group))
    others = "" if groups == 1 else f" (shown for {group.workflow}@{group.version}; the same for the others)"
    return (
        f"Start a worker that registers the version, or act on them{others}:\n"
        f"  list:   sonamu-tasks runs {select}\n"
        f"  cancel: sonamu-tasks cancel {select} --dry-run   (then again without --dry-run)\n"
        f"  fork:   sonamu-tasks fork {select} {statuses} --from-step STEP --to-version V --dry-run\n"
        "          (a run that never started has no step to fork from: cancel it and start its input again)"
    )


@main.command()
@click.argument("run_id", required=False, callback=_run_id)
@click.option(
    "--from-step",
    required=True,
    callback=_checked(arguments.step_name),
    help="The step to execute from: the steps started before it keep their checkpoints.",
)
@click.option(
    "--version",
    "version",
    callback=_checked(arguments.version),
    help="With RUN_ID: the version the fork runs on (default: the run's own). With --workflow: the version whose "
    "runs are forked.",
)
@click.option(
    "--to-version",
    callback=_checked(arguments.version),
    help="The version the forks run on: required with --workflow (give --version's value to stay on it).",
)
@click.option(
    "--workflow",
    callback=_checked(arguments.workflow_name),
    help="With --version and --to-version: fork every matching run instead of RUN_ID.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=_STATUSES,
    help="With --workflow: only runs in this status (repeatable; default: failed).",
)
@click.option("--dry-run", is_flag=True, help="With --workflow: print the runs it would fork; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def fork(
    context: click.Context,
    run_id: str | None,
    from_step: str,
    version: str | None,
    to_version: str | None,
    workflow: str | None,
    statuses: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
) -> None:
    """Start a new run of run RUN_ID's workflow and input that keeps its checkpoints of the steps started before
    --from-step and executes from there, on its version or another (a fixed one); prints the new run's id. The
    source run is left as it is. With --workflow W --version V --to-version V2 instead of RUN_ID: every matching
    run (--status, default failed), with --dry-run first."""
    if run_id is None:
        selection = _selection(context, "fork", workflow, version, statuses, default=(RunStatus.FAILED,))
        if to_version is None:
            raise click.UsageError(
                "forking many runs needs --to-version V, the version the forks run on (give "
                f"--to-version {shlex.quote(selection.version)} to stay on the same version)",
                context,
            )
        _fork_many(context, selection, from_step, to_version, dry_run, as_json)
        return
    _refuse_bulk_options(context, ("workflow", "statuses", "dry_run"))
    if version is not None and to_version is not None and version != to_version:
        raise click.UsageError(f"--version {version!r} and --to-version {to_version!r} disagree; give one", context)
    target = to_version or version
    config = command_config(context, enable_worker=False)

    async def start_fork() -> tuple[RunRecord, bool]:
        async with WorkflowManager(config) as manager:
            handle = await manager.fork(run_id, from_step, target)
            forked = await manager.get_run(handle.id, value_limit=NO_VALUES)
            return forked, await _served(manager, forked.workflow_name, forked.version)

    with _quiet_forks(context):
        forked, served = _steering(start_fork())
    if not served:
        click.echo(_unserved_warning(forked.workflow_name, forked.version, "the fork waits"), err=True)
    if as_json:
        summary = {
            "source_id": run_id,
            "run_id": forked.id,
            "workflow": forked.workflow_name,
            "version": forked.version,
            "from_step": from_step,
            "served": served,
        }
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(forked.id)


@main.command()
@click.argument("run_id", required=False, callback=_run_id)
@click.option(
    "--workflow",
    callback=_checked(arguments.workflow_name),
    help="With --version: cancel every matching run instead of RUN_ID.",
)
@click.option("--version", "version", callback=_checked(arguments.version), help="With --workflow: its version.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=_STATUSES,
    help="With --workflow: only runs in this status (repeatable; default: every unfinished one).",
)
@click.option("--dry-run", is_flag=True, help="With --workflow: print the runs it would cancel; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cancel(
    context: click.Context,
    run_id: str | None,
    workflow: str | None,
    version: str | None,
    statuses: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
) -> None:
    """Cancel run RUN_ID: at once, or at its next step boundary if running; prints the status after. With
    --workflow W --version V instead of RUN_ID: every matching unfinished run (--status to narrow), with
    --dry-run first."""
    if run_id is None:
        unfinished = tuple(status for status in RunStatus if not status.finished)
        _cancel_many(
            context, _selection(context, "cancel", workflow, version, statuses, default=unfinished), dry_run, as_json
        )
        return
    _refuse_bulk_options(context, ("workflow", "version", "statuses", "dry_run"))
    config = command_config(context, enable_worker=False)

    async def act() -> RunStatus:
        async with WorkflowManager(config) as manager:
            return await manager.cancel(run_id)

    status = _steering(act())
    click.echo(json.dumps({"id": run_id, "status": status.value}) if as_json else f"{run_id} {status.value}")


# Acting on many runs: `cancel` and `fork` with --workflow and --version instead of a run id.


@dataclass(frozen=True)
class _Selection:
    """The runs an action on many runs takes: one workflow version, some statuses."""

    workflow: str
    version: str
    statuses: tuple[RunStatus, ...]

    def text(self) -> str:
        return f"{self.workflow}@{self.version} ({', '.join(status.value for status in self.statuses)})"

    def summary(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "version": self.version,
            "statuses": [status.value for status in self.statuses],
        }


@dataclass(frozen=True)
class _Skip:
    """A matching run the action left alone, and why: `reason` groups them (`already finished`, `no such step`,
    `no longer stored`, `refused`), `detail` says it for this run."""

    id: str
    status: RunStatus
    reason: str
    detail: str

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status.value, "reason": self.reason, "detail": self.detail}


@dataclass
class _Bulk:
    """What an action on many runs did to each matching run (or, in a dry run, would do)."""

    selection: _Selection
    dry_run: bool
    matched: list[tuple[str, RunStatus]] = field(default_factory=list)
    acted: list[str] = field(default_factory=list)
    """Canceled or forked runs (in a dry run: those that would be)."""
    forks: dict[str, str] = field(default_factory=dict)
    """Source run -> its fork."""
    requested: list[str] = field(default_factory=list)
    """Running runs asked to cancel: they stop at their next step boundary."""
    skipped: list[_Skip] = field(default_factory=list)
    stopped: str | None = None
    """Why it stopped before the end (the database stopped answering), or None."""

    def skip(self, run_id: str, status: RunStatus, reason: str, detail: str) -> None:
        self.skipped.append(_Skip(run_id, status, reason, detail))

    def skipped_text(self) -> str:
        """`2 skipped: 1 already finished, 1 no such step`."""
        reasons = Counter(skip.reason for skip in self.skipped)
        return f"{len(self.skipped)} skipped: " + ", ".join(f"{count} {reason}" for reason, count in reasons.items())


LISTED_SKIPS = 20
"""Skipped runs named one by one after an action on many runs (--json lists all of them)."""


def _selection(
    context: click.Context,
    command: str,
    workflow: str | None,
    version: str | None,
    statuses: tuple[str, ...],
    *,
    default: tuple[RunStatus, ...],
) -> _Selection:
    """The runs `command` acts on without a run id. Both --workflow and --version are required: a slip of the
    keyboard must not reach every run of a workflow, or every run."""
    if workflow is None or version is None:
        missing = " and ".join(name for name, value in (("--workflow", workflow), ("--version", version)) if not value)
        raise click.UsageError(
            f"give a RUN_ID, or both --workflow and --version to {command} many runs at once (missing {missing}); "
            f"an unscoped {command} is refused",
            context,
        )
    return _Selection(workflow, version, tuple(RunStatus(s) for s in statuses) or default)


def _refuse_bulk_options(context: click.Context, names: Sequence[str]) -> None:
    given = _given(context, names)
    if given:
        raise click.UsageError(
            f"{', '.join(given)} select many runs (with --workflow and --version); with a RUN_ID give none", context
        )


async def _matching(manager: WorkflowManager, selection: _Selection) -> list[tuple[str, RunStatus]]:
    """Every run the selection takes, newest first, read page by page before anything changes (so the runs an
    action creates, such as forks onto the same version, are not taken up in turn)."""
    found: list[tuple[str, RunStatus]] = []
    cursor = None
    while True:
        page = await manager.list_runs(
            workflow=selection.workflow,
            version=selection.version,
            status=selection.statuses,
            limit=arguments.MAX_LIMIT,
            cursor=cursor,
            value_limit=NO_VALUES,
        )
        found.extend((run.id, run.status) for run in page.items)
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


class _Progress:
    """Lines on stderr while an action on many runs goes on: every 100 runs, or every 2 seconds."""

    def __init__(self, verb: str, total: int) -> None:
        self.verb = verb
        self.total = total
        self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and (done % 100 == 0 or now - self.last >= 2):
            click.echo(f"{self.verb}: {done} of {self.total} done", err=True)
            self.last = now


def _cancel_many(context: click.Context, selection: _Selection, dry_run: bool, as_json: bool) -> None:
    config = command_config(context, enable_worker=False)
    bulk = _Bulk(selection, dry_run)

    async def act() -> None:
        async with WorkflowManager(config, read_only=dry_run) as manager:
            bulk.matched = await _matching(manager, selection)
            if dry_run or not bulk.matched:
                for run_id, status in bulk.matched:
                    if status.finished:
                        bulk.skip(run_id, status, "already finished", f"already {status.value}")
                    else:
                        bulk.acted.append(run_id)
                return
            click.echo(f"canceling {_count(len(bulk.matched), 'run')} of {selection.text()}", err=True)
            progress = _Progress("cancel", len(bulk.matched))
            for index, (run_id, status) in enumerate(bulk.matched, 1):
                try:
                    await _cancel_one(manager, bulk, run_id, status)
                except BackendUnavailable as error:
                    bulk.stopped = f"stopped after {index - 1} of {len(bulk.matched)} runs: {flat(str(error))}"
                    return
                progress(index)

    _steering(act())
    if as_json:
        done_key = "would_cancel" if dry_run else "canceled"
        payload: dict[str, Any] = {"action": "cancel", "dry_run": dry_run, **selection.summary()}
        payload.update(matched=len(bulk.matched), **{done_key: bulk.acted})
        if not dry_run:
            payload["cancel_requested"] = bulk.requested
        payload.update(skipped=[skip.summary() for skip in bulk.skipped], stopped=bulk.stopped)
        click.echo(json.dumps(payload, indent=2))
    else:
        _echo_cancels(bulk)
    if bulk.stopped:
        raise click.ClickException(bulk.stopped)


async def _cancel_one(manager: WorkflowManager, bulk: _Bulk, run_id: str, status: RunStatus) -> None:
    if status.finished:
        bulk.skip(run_id, status, "already finished", f"already {status.value}")
        return
    try:
        after = await manager.cancel(run_id)
    except RunNotFound:
        bulk.skip(run_id, status, "no longer stored", "deleted since it was listed")
        return
    if after is RunStatus.CANCELED:
        bulk.acted.append(run_id)
    elif after.finished:
        bulk.skip(run_id, after, "already finished", f"{after.value} before it was canceled")
    else:
        bulk.requested.append(run_id)


def _echo_cancels(bulk: _Bulk) -> None:
    selection = bulk.selection
    if not bulk.matched:
        click.echo(f"no runs of {selection.text()}: nothing to cancel")
        return
    if bulk.dry_run:
        statuses = dict(bulk.matched)
        running = sum(1 for run_id in bulk.acted if statuses[run_id] is RunStatus.RUNNING)
        click.echo(f"dry run: would cancel {_count(len(bulk.acted), 'run')} of {selection.text()}; nothing changed")
        if bulk.acted:
            click.echo(format_table(["RUN", "STATUS"], [[run_id, statuses[run_id].value] for run_id in bulk.acted]))
        if running:
            click.echo(f"({running} running: they would stop at their next step boundary)")
    else:
        click.echo(f"canceled {_count(len(bulk.acted), 'run')} of {selection.text()}")
        if bulk.requested:
            click.echo(
                f"asked {_count(len(bulk.requested), 'running run')} to cancel: each stops at its next step boundary"
            )
    _echo_skips(bulk)


def _fork_many(
    context: click.Context, selection: _Selection, from_step: str, to_version: str, dry_run: bool, as_json: bool
) -> None:
    config = command_config(context, enable_worker=False)
    bulk = _Bulk(selection, dry_run)
    onto = f"from step {from_step!r} onto version {to_version}"

    async def act() -> None:
        async with WorkflowManager(config, read_only=dry_run) as manager:
            bulk.matched = await _matching(manager, selection)
            if bulk.matched and not await _served(manager, selection.workflow, to_version):
                forks = "the forks would wait" if dry_run else "the forks wait"
                click.echo(_unserved_warning(selection.workflow, to_version, forks), err=True)
            if not dry_run and bulk.matched:
                click.echo(f"forking {_count(len(bulk.matched), 'run')} of {selection.text()} {onto}", err=True)
            progress = _Progress("fork", len(bulk.matched))
            for index, (run_id, status) in enumerate(bulk.matched, 1):
                try:
                    await _fork_one(manager, bulk, run_id, status, from_step, to_version)
                except BackendUnavailable as error:
                    bulk.stopped = f"stopped after {index - 1} of {len(bulk.matched)} runs: {flat(str(error))}"
                    return
                if not dry_run:
                    progress(index)

    with _quiet_forks(context):
        _steering(act())
    if as_json:
        payload: dict[str, Any] = {"action": "fork", "dry_run": dry_run, **selection.summary()}
        payload.update(from_step=from_step, to_version=to_version, matched=len(bulk.matched))
        if dry_run:
            payload["would_fork"] = bulk.acted
        else:
            payload["forked"] = [{"source_id": source, "run_id": bulk.forks[source]} for source in bulk.acted]
        payload.update(skipped=[skip.summary() for skip in bulk.skipped], stopped=bulk.stopped)
        click.echo(json.dumps(payload, indent=2))
    else:
        _echo_forks(bulk, onto)
    if bulk.stopped:
        raise click.ClickException(bulk.stopped)


async def _fork_one(
    manager: WorkflowManager, bulk: _Bulk, run_id: str, status: RunStatus, from_step: str, to_version: str
) -> None:
    if bulk.dry_run:  # the same check the fork makes: the step is one of the run's
        try:
            run = await manager.get_run(run_id, with_steps=True, value_limit=NO_VALUES)
        except RunNotFound:
            bulk.skip(run_id, status, "no longer stored", "deleted since it was listed")
            return
        names = [step.name for step in run.steps]
        if from_step in names:
            bulk.acted.append(run_id)
        else:
            known = ", ".join(repr(name) for name in names) or "none"
            bulk.skip(run_id, status, "no such step", f"has no step {from_step!r} to fork from; its steps: {known}")
        return
    try:
        handle = await manager.fork(run_id, from_step, to_version)
    except RunNotFound:
        bulk.skip(run_id, status, "no longer stored", "deleted since it was listed")
    except InvalidValue as error:
        reason = "no such step" if error.field == "from_step" else "refused"
        bulk.skip(run_id, status, reason, _about_run(run_id, error))
    except BackendUnavailable:
        raise
    except SonamuTasksError as error:  # an input the target version refuses, say: this run only
        bulk.skip(run_id, status, "refused", _about_run(run_id, error))
    else:
        bulk.acted.append(run_id)
        bulk.forks[run_id] = handle.id


def _about_run(run_id: str, error: Exception) -> str:
    """An error's message about one run, without the run's id in front (its line names it already)."""
    return flat(str(error)).removeprefix(f"run {run_id} ")


@contextmanager
def _quiet_forks(context: click.Context) -> Iterator[None]:
    """The manager logs each fork it makes; on the command line the output says it already (and a thousand
    such lines would bury the progress). `-v` keeps them."""
    options: CliOptions = context.obj
    log = logging.getLogger("sonamu_tasks.manager")
    level = log.level
    if not options.verbose:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _echo_forks(bulk: _Bulk, onto: str) -> None:
    selection = bulk.selection
    if not bulk.matched:
        click.echo(f"no runs of {selection.text()}: nothing to fork")
        return
    if bulk.dry_run:
        statuses = dict(bulk.matched)
        click.echo(
            f"dry run: would fork {_count(len(bulk.acted), 'run')} of {selection.text()} {onto}; nothing changed"
        )
        if bulk.acted:
            click.echo(format_table(["RUN", "STATUS"], [[run_id, statuses[run_id].value] for run_id in bulk.acted]))
    else:
        click.echo(f"forked {_count(len(bulk.acted), 'run')} of {selection.text()} {onto}")
        if bulk.acted:
            click.echo(format_table(["SOURCE", "FORK"], [[source, bulk.forks[source]] for source in bulk.acted]))
            click.echo("the sources are left as they were")
    _echo_skips(bulk)


def _echo_skips(bulk: _Bulk) -> None:
    if not bulk.skipped:
        return
    click.echo(bulk.skipped_text())
    for skip in bulk.skipped[:LISTED_SKIPS]:
        click.echo(f"  {skip.id} ({skip.status.value}): {skip.detail}")
    if len(bulk.skipped) > LISTED_SKIPS:
        click.echo(f"  and {len(bulk.skipped) - LISTED_SKIPS} more (--json lists every one)")


async def _served(manager: WorkflowManager, workflow: str, version: str) -> bool:
    """Whether a live worker registers this workflow version (one that would execute a run of it now)."""
    now = datetime.now(UTC)
    return any((workflow, version) in worker.workflows and worker.live(now) for worker in await manager.list_workers())


def _unserved_warning(workflow: str, version: str, who: str) -> str:
    return (
        f"warning: no live worker registers {workflow} version {version}: {who} until one does "
        "(sonamu-tasks runs --stranded lists such runs)"
    )


def _count(number: int, noun: str) -> str:
    """`1 run`, `3 runs`."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


@dataclass(frozen=True)
class _Shown:
    """What `show` prints of a run, read in one connection."""

    run: RunRecord
    parent: RunRecord | None
    children: Children
    messages: Messages
    events: list[RunEventRecord]


@main.command()
@click.argument("run_id", callback=_run_id)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show(context: click.Context, run_id: str, as_json: bool) -> None:
    """A run: its parent and children, what it waits for, input, output or error (with traceback), every step,
    its unconsumed messages and the events it published."""
    config = command_config(context, enable_worker=False)

    async def fetch() -> _Shown:
        async with WorkflowManager(config, read_only=True) as manager:
            run = await manager.get_run(run_id, with_steps=True)
            parent = await _run_or_none(manager, run.parent_id)
            children = await children_of(manager, run)
            messages = await messages_of(manager, run.id)
            return _Shown(run, parent, children, messages, await manager.list_events(run.id))

    shown = _steering(fetch())
    run, parent, children = shown.run, shown.parent, shown.children
    if as_json:
        detail = run_detail(run, parent=parent, children=children, messages=shown.messages, events=shown.events)
        click.echo(json.dumps(detail, indent=2, default=str))
        return
    click.echo(f"run       {run.id}")
    click.echo(f"workflow  {run.workflow_name} version {run.version}")
    queue = run_queue(run)
    if queue:
        click.echo("queue     " + "   ".join(_queue_part(label, value) for label, value in queue))
    if run.parent_id:
        click.echo(f"parent    {_parent_line(run, parent)}")
    if run.forked_from:
        click.echo(f"forked    from {run.forked_from} at its step {run.forked_step!r}")
    click.echo(f"status    {_status_text(run)}   attempts {run.attempts}   recoveries {run.recoveries}")
    if run.status is RunStatus.RUNNING and run.worker_id:
        click.echo(f"worker    {run.worker_id}   lease until {_time(run.available_at)}")
    click.echo(
        f"created   {_time(run.created_at)}   started {_time(run.started_at)}   finished {_time(run.finished_at)}"
    )
    if run.status in (RunStatus.PENDING, RunStatus.SLEEPING) and wake_time(run.available_at):
        click.echo(f"next      {_time(run.available_at)}")
    if run.status is RunStatus.WAITING:
        for index, line in enumerate(_waiting_lines(run, children)):
            click.echo(f"{'waits for' if index == 0 else '':<9} {line}")
    click.echo(f"input     {preview(run.input, 200)}")
    if run.status is RunStatus.COMPLETED:
        click.echo(f"output    {preview(run.output, 2000)}")
    if run.error:
        # An error's text is whatever the code raised: its control characters must not act on the terminal.
        message = escaped(str(run.error.get("message")), keep="\n")
        click.echo(
            f"error     {escaped(str(run.error.get('type')))}: {message}"
            + (f" (step {escaped(str(run.error['step']))})" if run.error.get("step") else "")
        )
    rows = [
        [
            step.name,
            step.kind,
            step.status.value,
            step.attempts,
            duration_text(step.started_at, step.finished_at),
            _step_detail(step),
        ]
        for step in run.steps
    ]
    click.echo("")
    click.echo(
        format_table(["STEP", "KIND", "STATUS", "ATTEMPTS", "DURATION", "OUTPUT / WAKE / ERROR"], rows)
        if rows
        else "no steps yet"
    )
    _echo_messages(shown.messages)
    _echo_events(shown.events)
    if children is not NO_CHILDREN:
        click.echo("")
        click.echo(f"children  {children.counts_text()}")
        listed = [
            [row.id, row.step, f"{row.workflow_name}@{row.version}", _child_status(row)] for row in children.listed
        ]
        if listed:
            click.echo(format_table(["CHILD", "STEP", "WORKFLOW", "STATUS"], listed))
        if children.more > 0:
            click.echo(f"and {children.more} more: sonamu-tasks runs --parent {run.id}")
    if run.error and run.error.get("traceback"):
        click.echo("\n" + escaped(run.error["traceback"].rstrip(), keep="\n"))


def _queue_part(label: str, value: str) -> str:
    """`show`'s queue line: `queue payments`, `priority 5`, `concurrency key 'customer-7'` (a key is quoted: it
    may hold spaces)."""
    if label == "queue":
        return value
    return f"{label} {value!r}" if label == "concurrency key" else f"{label} {value}"


def _echo_messages(messages: Messages) -> None:
    """The oldest unconsumed messages: topic, payload preview, idempotency key, age (nothing if none)."""
    if not messages.total:
        return
    now = datetime.now(UTC)
    click.echo("")
    shown = f" (the oldest {len(messages.listed)} listed)" if messages.more > 0 else ""
    click.echo(f"messages  {messages.count_text()}{shown}")
    rows = [
        [m.topic, preview(m.payload, 60), m.idempotency_key or "-", age_text(m.created_at, now)]
        for m in messages.listed
    ]
    click.echo(format_table(["TOPIC", "MESSAGE", "IDEMPOTENCY KEY", "AGE"], rows))
    if messages.more > 0:
        more = f"{messages.more}" if messages.exact else f"more than {messages.more}"
        click.echo(f"and {more} more (show --json lists {len(messages.listed)} with their whole payloads)")


def _echo_events(events: Sequence[RunEventRecord]) -> None:
    """The events the run published (set_event): key, value preview, when it was last set."""
    if not events:
        return
    click.echo("")
    click.echo(f"events    {len(events)} published")
    rows = [[e.key, preview(e.value, 60), _time(e.updated_at)] for e in events[:LISTED_EVENTS]]
    click.echo(format_table(["KEY", "VALUE", "UPDATED"], rows))
    if len(events) > LISTED_EVENTS:
        click.echo(f"and {len(events) - LISTED_EVENTS} more: sonamu-tasks show --json, or get-event RUN_ID KEY")


@main.command()
@click.argument("run_id", callback=_run_id)
@click.option("--topic", required=True, callback=_checked(arguments.topic), help="The topic its receive waits on.")
@click.option("--message", "message_json", required=True, help="The message as JSON.")
@click.option(
    "--idempotency-key",
    callback=_checked(arguments.idempotency_key),
    help="A key already used for this run stores nothing (exit 0, says so).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def send(
    context: click.Context,
    run_id: str,
    topic: str,
    message_json: str,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Send a message to run RUN_ID: its `step.receive` on that topic takes it, once (a waiting run wakes)."""
    message = _json_option(message_json, "--message")
    config = command_config(context, enable_worker=False)

    async def deliver() -> bool:
        async with WorkflowManager(config) as manager:
            return await manager.send(run_id, message, topic=topic, idempotency_key=idempotency_key)

    stored = _steering(deliver())
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "topic": topic, "idempotency_key": idempotency_key, "stored": stored}))
    elif stored:
        click.echo(f"sent to {run_id} on topic {topic!r}")
    else:
        click.echo(f"not sent again: idempotency key {idempotency_key!r} was used for run {run_id} before")


@main.command()
@click.argument("event", callback=_checked(arguments.event_name))
@click.option("--key", callback=_checked(arguments.emit_key), help="Only waits for this key receive it.")
@click.option("--payload", "payload_json", required=True, help="The payload as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def emit(context: click.Context, event: str, key: str | None, payload_json: str, as_json: bool) -> None:
    """Broadcast EVENT: every run waiting for it (and its key) in `step.wait_for_event` receives the payload,
    and so does every run created before now that reaches such a wait later."""
    payload = _json_option(payload_json, "--payload")
    config = command_config(context, enable_worker=False)

    async def broadcast() -> int:
        async with WorkflowManager(config) as manager:
            return await manager.emit(event, payload, key=key)

    woken = _steering(broadcast())
    if as_json:
        click.echo(json.dumps({"event": event, "key": key, "woken": woken}))
        return
    with_key = f" with key {key!r}" if key is not None else ""
    click.echo(f"emitted {event!r}{with_key}: woke {woken} waiting run{'' if woken == 1 else 's'}")


@main.command("get-event")
@click.argument("run_id", callback=_run_id)
@click.argument("key", callback=_checked(arguments.event_key))
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Seconds to wait for it to be set.")
@click.pass_context
def get_event(context: click.Context, run_id: str, key: str, timeout: float | None) -> None:
    """Print, as JSON, the value run RUN_ID published under KEY (`step.set_event`), waiting until it is set.
    Exit 1 if the run finished without setting it, or it was not set within --timeout."""
    config = command_config(context, enable_worker=False)

    async def read() -> tuple[bool, Any, RunRecord]:
        async with WorkflowManager(config, read_only=True) as manager:
            value = await manager.get_event(run_id, key, timeout=timeout)
            # None is also a value a run may set: look whether the key is there.
            found = value is not None or any(e.key == key for e in await manager.list_events(run_id))
            return found, value, await manager.get_run(run_id, value_limit=NO_VALUES)

    found, value, run = _steering(read())
    if not found:
        within = "" if run.status.finished or timeout is None else f" within {timeout:g}s"
        raise click.ClickException(f"run {run_id} did not set event {key!r}{within} (it is {run.status.value})")
    click.echo(json.dumps(value, indent=2))


def _steer_command(name: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.argument("run_id", callback=_run_id)
    @click.pass_context
    def command(context: click.Context, run_id: str) -> None:
        config = command_config(context, enable_worker=False)

        async def act() -> RunStatus:
            async with WorkflowManager(config) as manager:
                return await getattr(manager, name)(run_id)  # type: ignore[no-any-return]

        status = _steering(act())
        refusal = not_steered(name, run_id, status)
        if name == "retry" and refusal is not None:
            # Nothing happened: a script's `retry ID && ...` must not read it as a retry.
            raise click.ClickException(refusal)
        click.echo(f"{run_id} {status.value}")


_steer_command("pause", "Pause a run: it keeps its checkpoints and is not claimed until resumed.")
_steer_command("resume", "Resume a paused run.")
_steer_command("retry", "Start a failed or canceled run again from its failed step.")


@main.command("queues")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def queues_command(context: click.Context, as_json: bool) -> None:
    """Queues with limits or unfinished runs: their limits (CONCURRENCY across all workers, PER WORKER, RATE
    LIMIT as starts/window, PER KEY concurrency; - for none), RUNNING (executing now), DUE (due and not
    claimed, the parked ones included) and the OLDEST DUE run's wait, RATE WINDOW (starts in the current window
    / the limit), PARKED ON KEY (due runs waiting for their concurrency key to have a free slot) and WORKERS
    (live workers that claim from it: 0 with runs due means nothing will run them)."""
    config = command_config(context, enable_worker=False)

    async def fetch() -> list[QueueStats]:
        async with WorkflowManager(config, read_only=True) as manager:
            return await manager.queue_stats()

    found = _steering(fetch())
    if as_json:
        click.echo(json.dumps([queue_summary(stats) for stats in found], indent=2))
        return
    if not found:
        click.echo("no queues: none is declared and no unfinished run is in one")
        return
    click.echo(format_table([column.upper() for column in QUEUE_COLUMNS], [queue_row(stats) for stats in found]))
    for warning in unserved_queues(found):
        click.echo(f"warning: {warning}", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def workers(context: click.Context, as_json: bool) -> None:
    """Workers that registered: host, pid, slots in use / slots, the queues they claim from, workflows,
    heartbeat age."""
    config = command_config(context, enable_worker=False)

    async def fetch() -> list[WorkerRecord]:
        async with WorkflowManager(config, read_only=True) as manager:
            return await manager.list_workers()

    found = _steering(fetch())
    now = datetime.now(UTC)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": w.id,
                        "host": w.host,
                        "pid": w.pid,
                        "concurrency": w.concurrency,
                        "running": w.running,
                        "queues": w.queues,
                        "workflows": [f"{n}@{v}" for n, v in w.workflows],
                        "started_at": w.started_at.isoformat(),
                        "heartbeat_age_s": round((now - w.heartbeat_at).total_seconds(), 3),
                        "stale": not w.live(now),
                    }
                    for w in found
                ],
                indent=2,
            )
        )
        return
    rows = [
        [
            w.id,
            w.host,
            w.pid,
            slots_text(w),
            worker_queues_text(w),
            ", ".join(f"{n}@{v}" for n, v in w.workflows),
            heartbeat_text(w, now),
        ]
        for w in found
    ]
    headers = ["ID", "HOST", "PID", "SLOTS", "QUEUES", "WORKFLOWS", "HEARTBEAT AGE"]
    click.echo(format_table(headers, rows, whole=("ID",)) if rows else "no workers")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option("--token", envvar="SONAMU_TASKS_DASHBOARD_TOKEN", help="Required to listen beyond loopback.")
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME[:PORT]",
    help="Another Host name the dashboard is reached by (a proxy's, or the machine's with --host 0.0.0.0).",
)
@click.option(
    "--read-only",
    is_flag=True,
    help="Only read: no migration at start, no action buttons; works with credentials that may only read.",
)
@click.pass_context
def dashboard(
    context: click.Context, host: str, port: int, token: str | None, allowed_hosts: tuple[str, ...], read_only: bool
) -> None:
    """Serve the web dashboard (runs, a run's step timeline, cancel and retry, workers, schedules)."""
    try:
        import uvicorn

        from .dashboard import Dashboard, check_token
    except ImportError as error:
        raise click.ClickException(
            f"the dashboard needs {error.name}: pip install 'sonamu-tasks[dashboard]'"
        ) from error
    try:
        check_token(token, host)  # before the config is loaded: the first thing a mistake should hit
        _check_can_listen(host, port)
        # Read-only, it creates nothing: a mistyped SQLite path is said, not made an empty database.
        config = command_config(context, enable_worker=False, announce=True, creates=not read_only)
        app = Dashboard(config, token=token, host=host, port=port, allowed_hosts=allowed_hosts, read_only=read_only)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error
    # The schema checked (or migrated) before uvicorn starts the app: a missing or older schema, or a database that
    # does not answer, is one Error line and exit 1, as for the other commands, not a traceback from the lifespan.
    _steering(_ready(config, read_only))
    # The address only: the token is never printed (terminals are logged and shared); whoever started the
    # dashboard has it already.
    shown = f"[{host}]" if ":" in host else host
    notes = (" (token required)" if token else "") + (" (read-only)" if read_only else "")
    click.echo(f"dashboard: http://{shown}:{port}/{notes}", err=True)
    # No access log: a browser's first visit may carry ?token= in its query string.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


async def _ready(config: Config, read_only: bool) -> None:
    async with WorkflowManager(config, read_only=read_only):
        pass


def _check_can_listen(host: str, port: int) -> None:
    """A port in use (another dashboard, say) is said before the address is printed as served: uvicorn would
    print its own error after the "dashboard: http://..." line, and exit 1."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            raise click.ClickException(
                f"cannot serve the dashboard on {host}:{port}: {error.strerror or error}; choose another --port"
            ) from None


def _steering(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coroutine)
    except SonamuTasksError as error:
        raise click.ClickException(flat(str(error))) from error


def _parent_text(run: RunRecord) -> str:
    return short_id(run.parent_id) if run.parent_id else "-"


def _parent_line(run: RunRecord, parent: RunRecord | None) -> str:
    shown = f"{parent.workflow_name}@{parent.version}, {parent.status.value}" if parent else "no longer stored"
    detached = ", detached" if run.detached else ""
    return f"{run.parent_id} ({shown}; started by its step {run.parent_step!r}{detached})"


def _waiting_lines(run: RunRecord, children: Children) -> list[str]:
    lines = []
    if children.unfinished_count:
        word = "child" if children.unfinished_count == 1 else "children"
        lines.append(f"{children.unfinished_count} unfinished {word}:")
        lines.extend(f"  {row.id} ({row.step}, {row.status.value})" for row in children.unfinished)
        if children.unfinished_count > len(children.unfinished):
            hidden = children.unfinished_count - len(children.unfinished)
            lines.append(f"  and {hidden} more: sonamu-tasks runs --parent {run.id}")
    lines.extend(wait.text(_time) for wait in outside_waits(run))
    lines.extend(other_waits(run))
    sleep = pending_sleep(run)
    if sleep is not None:
        lines.append(f"sleep {sleep.name!r} until {_time(sleep.wake_at)}")
    return lines or ["nothing left unfinished: it is about to wake"]


def _json_option(text: str, option: str) -> Any:
    try:
        return arguments.json_value(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=option) from None


def _child_status(row: ChildRow) -> str:
    return row.status.value + (" (detached)" if row.detached else "")


def _step_detail(step: StepRecord) -> str:
    if step.kind == "sleep":
        return _time(step.wake_at)
    wait = outside_wait(step)
    if wait is not None:
        return wait.text(_time, step=False)
    if step.kind == "child" and step.error is None:
        return child_step_text(step)
    return preview(step.output if step.error is None else step.error.get("message"), 60)


def _status_text(run: RunRecord) -> str:
    return run.status.value + (f" ({run.requested_action} requested)" if run.requested_action else "")


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return datetime.now(UTC) - parse_duration(text, what="--since")
        except SonamuTasksError as error:
            raise click.BadParameter(str(error), param_hint="--since") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _local(moment: datetime, timezone: str) -> str:
    return moment.astimezone(zone(timezone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _moment(text: str | None, option: str) -> datetime | timedelta | None:
    """--start-at / --deadline: an ISO datetime with its timezone, or a duration (10m, 2h)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return parse_duration(text, what=option)
        except SonamuTasksError:
            raise click.BadParameter(
                f"{text!r} is neither a duration (500ms, 10m, 2h, 7d) nor an ISO datetime with a timezone "
                "(2026-01-31T09:00:00+09:00)",
                param_hint=option,
            ) from None
    if moment.tzinfo is None:
        raise click.BadParameter(
            f"{text!r} has no timezone; write it with one (2026-01-31T09:00:00+09:00 or ...Z)", param_hint=option
        )
    return moment


async def _run_or_none(manager: WorkflowManager, run_id: str | None) -> RunRecord | None:
    """Another run, for its name and status (a parent, a schedule's last run): none of its values is read."""
    if run_id is None:
        return None
    try:
        return await manager.get_run(run_id, value_limit=NO_VALUES)
    except RunNotFound:
        return None


from .cli_purge import purge  # noqa: E402 - a command of its own module, registered on the group above

main.add_command(purge)
