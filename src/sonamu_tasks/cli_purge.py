"""`sonamu-tasks purge`: delete finished runs older than a duration, then the broadcast events no run can read any
more, with a progress bar and a summary line.

    sonamu-tasks purge --older-than 30d [--status completed ...] [--workflow W] [--dry-run] [--json]

Registered on the `sonamu-tasks` group by `cli.py`; its failures are reported there (one line on stderr, exit 2
for a bad argument, 1 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from .backends.base import FINISHED_STATUSES
from .cli_config import command_config
from .duration import parse_duration
from .errors import InvalidValue
from .limits import check_workflow_name
from .manager import WorkflowManager
from .retention import BATCH_SIZE, MAX_BATCH_SIZE


def _duration(context: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_duration(value, what="--older-than")
        except InvalidValue as error:
            raise click.BadParameter(str(error)) from None
    return value


def _workflow(context: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else check_workflow_name(value)
    except InvalidValue as error:
        raise click.BadParameter(str(error)) from None


@click.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="DURATION",
    callback=_duration,
    help="Delete runs that finished more than DURATION ago (30d, 12h, 2w).",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(FINISHED_STATUSES),
    help="Only runs in this status (repeatable; default: completed, failed and canceled).",
)
@click.option("--workflow", callback=_workflow, help="Only runs of this workflow.")
@click.option("--dry-run", is_flag=True, help="Count the runs that would be deleted; delete nothing.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH_SIZE),
    default=BATCH_SIZE,
    show_default=True,
    help="Runs deleted per transaction.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (no progress bar).")
@click.pass_context
def purge(
    context: click.Context,
    older_than: str,
    statuses: tuple[str, ...],
    workflow: str | None,
    dry_run: bool,
    batch_size: int,
    as_json: bool,
) -> None:
    """Delete finished runs older than --older-than, with their steps, messages and events, whatever their
    workflow's retention. Never an unfinished run, nor a child whose parent is unfinished. Then the broadcast
    events (emit) no stored run can read any more, as the workers' retention pass does. In batches, one short
    transaction each, with a progress bar on stderr; then one summary line (and one for the events, if any)."""
    config = command_config(context, enable_worker=False)
    chosen = [status for status in FINISHED_STATUSES if status in statuses] or list(FINISHED_STATUSES)
    bar = _Bar(enabled=not as_json and not dry_run)
    events_bar = _Bar(enabled=bar.enabled, label="purging events")

    async def work() -> tuple[int, int]:
        async with WorkflowManager(config, read_only=dry_run) as manager:  # a dry run only counts
            runs = await manager.purge(
                older_than,
                statuses=chosen,
                workflow=workflow,
                dry_run=dry_run,
                batch_size=batch_size,
                progress=bar.update if bar.enabled else None,
            )
            bar.close()
            # After the runs: a failed run deleted no longer keeps the events emitted since its creation.
            events = await manager.purge_events(
                dry_run=dry_run, progress=events_bar.update if events_bar.enabled else None
            )
            return runs, events

    try:
        count, events = asyncio.run(work())
    finally:
        bar.close()
        events_bar.close()
    if as_json:
        summary: dict[str, Any] = {
            "dry_run": dry_run,
            "runs": count,
            "older_than": older_than,
            "statuses": chosen,
            "workflow": workflow,
            "events": events,  # always there: a script reads one shape
        }
        click.echo(json.dumps(summary))
        return
    verb = "would delete" if dry_run else "deleted"
    plural = "run" if count == 1 else "runs"
    scope = f" of workflow {workflow}" if workflow else ""
    click.echo(
        f"{verb} {count} finished {plural}{scope} ({', '.join(chosen)}) that finished more than {older_than} ago"
    )
    if events:
        plural = "event" if events == 1 else "events"
        click.echo(f"{verb} {events} broadcast {plural} no run can read any more")
    if dry_run and count and {"failed", "canceled"} & set(chosen):
        # Counted against the runs stored now: a failed run the purge deletes keeps back the events emitted
        # since its creation, which the real purge then deletes too.
        click.echo("(deleting those runs may make more broadcast events unreadable, which the purge deletes too)")


class _Bar:
    """click's progress bar on stderr, made once the total is known (the first report)."""

    def __init__(self, *, enabled: bool, label: str = "purging") -> None:
        self.enabled = enabled
        self.label = label
        self._bar: Any = None
        self._shown = 0

    def update(self, deleted: int, total: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=max(total, 1), label=self.label, file=sys.stderr, show_pos=True)
            self._bar.__enter__()
        if total > self._bar.length:
            self._bar.length = total
        self._bar.update(deleted - self._shown)
        self._shown = deleted

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
