"""The `sonamu-tasks` command: run workers, see schedules, start runs."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from .config import Config
from .config_loader import load_config
from .errors import ConfigError, SonamuTasksError, WorkflowFailed
from .manager import WorkflowManager, until_signal
from .schedule import zone


@click.group()
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
    context.obj = config_spec


def _config(context: click.Context, *, enable_worker: bool) -> Config:
    try:
        config, origin = load_config(context.obj)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"config: {origin}; database: {_redact(config.resolved_database_url())}", err=True)
    config.tasks.enable_worker = enable_worker
    return config


@main.command()
@click.pass_context
def worker(context: click.Context) -> None:
    """Run a worker and the cron scheduler until SIGTERM/SIGINT (graceful shutdown)."""
    config = _config(context, enable_worker=True)
    asyncio.run(_serve(config, reload=False))


@main.command()
@click.pass_context
def dev(context: click.Context) -> None:
    """Like `worker`, and re-register workflows when their files change (runs in flight keep going)."""
    config = _config(context, enable_worker=True)
    asyncio.run(_serve(config, reload=True))


async def _serve(config: Config, *, reload: bool) -> None:
    manager = WorkflowManager(config)
    async with manager:
        _report_discovery(manager)
        watcher = asyncio.create_task(_watch(manager)) if reload else None
        await until_signal()
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


@main.command()
@click.pass_context
def migrate(context: click.Context) -> None:
    """Create or upgrade the database schema (safe to run from many processes at once)."""
    config = _config(context, enable_worker=False)

    async def run() -> list[str]:
        manager = WorkflowManager(config)
        await manager.backend.open()
        try:
            return await manager.backend.migrate()
        finally:
            await manager.backend.close()

    applied = asyncio.run(run())
    click.echo(f"applied: {', '.join(applied)}" if applied else "already up to date")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def schedules(context: click.Context, as_json: bool) -> None:
    """List cron schedules: name, expression, timezone, next fire, last run."""
    config = _config(context, enable_worker=False)

    async def collect() -> list[dict[str, Any]]:
        async with WorkflowManager(config) as manager:
            store = manager.backend
            records = await store.list_schedules()  # type: ignore[attr-defined]
            rows = []
            for record in records:
                last = await store.get_run(record.last_run_id) if record.last_run_id else None
                rows.append(
                    {
                        "name": record.name,
                        "workflow": f"{record.workflow_name}@{record.version}",
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

    rows = asyncio.run(collect())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no schedules")
        return
    headers = ["NAME", "WORKFLOW", "EXPRESSION", "TIMEZONE", "NEXT FIRE (LOCAL)", "LAST RUN"]
    table = [
        [
            r["name"],
            r["workflow"],
            r["expression"],
            r["timezone"],
            r["next_fire_local"],
            f"{r['last_run_id']} {r['last_run_status']}" if r["last_run_id"] else "-",
        ]
        for r in rows
    ]
    click.echo(format_table(headers, table))


@main.command("run")
@click.argument("name")
@click.option("--version", "version", help="Workflow version (needed when this process does not register it).")
@click.option("--input", "input_json", default="null", help="Input as JSON.")
@click.option("--idempotency-key", help="A repeated key returns the existing run.")
@click.option("--start-at", help="Delay as a duration (10m) or an ISO datetime with timezone.")
@click.option("--deadline", help="Duration (1h) or ISO datetime after which the run fails instead of running.")
@click.option("--wait", is_flag=True, help="Wait for the result; exit 1 if the run fails.")
@click.option("--timeout", type=float, default=None, help="With --wait: seconds to wait.")
@click.pass_context
def run_command(
    context: click.Context,
    name: str,
    version: str | None,
    input_json: str,
    idempotency_key: str | None,
    start_at: str | None,
    deadline: str | None,
    wait: bool,
    timeout: float | None,
) -> None:
    """Start a run of workflow NAME."""
    try:
        value = json.loads(input_json)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint="--input") from error
    config = _config(context, enable_worker=False)

    async def start() -> int:
        async with WorkflowManager(config) as manager:
            spec = {"name": name, "version": version} if version else {"name": name}
            handle = await manager.run(
                spec,
                value,
                idempotency_key=idempotency_key,
                start_at=_moment(start_at),
                deadline=_moment(deadline),
            )
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

    try:
        code = asyncio.run(start())
    except SonamuTasksError as error:
        raise click.ClickException(str(error)) from error
    sys.exit(code)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell: readable in a terminal, stable for eyes and diffs."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def _local(moment: datetime, timezone: str) -> str:
    return moment.astimezone(zone(timezone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _moment(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return text  # a duration: run() parses it and names the option if it is wrong


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url
