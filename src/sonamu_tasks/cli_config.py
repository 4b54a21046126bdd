"""The configuration a CLI command runs with: `--config` and `-v` of the `sonamu-tasks` group, shared by the
commands of `cli.py` and those in modules of their own (`cli_purge.py`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import click

from .config import Config
from .config_loader import load_config
from .errors import ConfigError


@dataclass(frozen=True)
class CliOptions:
    """The group's options, in `context.obj`."""

    config_spec: str | None
    verbose: bool


def command_config(
    context: click.Context, *, enable_worker: bool, announce: bool = False, creates: bool = False
) -> Config:
    """The config; `announce` (or -v) names it and its database on stderr. The one-shot commands (run, runs,
    show, cancel ...) stay quiet unless -v, so that a failure's stderr is its one error line. Only a command
    that `creates` the database (worker, dev, migrate, run, dashboard) may open a SQLite file that is not there:
    a command about stored runs would answer "no runs" for a mistyped path and leave an empty database behind."""
    options: CliOptions = context.obj
    try:
        config, origin = load_config(options.config_spec)
    except ConfigError as error:
        raise click.ClickException(flat(str(error))) from error
    url = config.resolved_database_url()
    if announce or options.verbose:
        click.echo(f"config: {origin}; database: {redact(url)}", err=True)
    path = url.removeprefix("sqlite:///")
    if not creates and path != url and path != ":memory:" and not os.path.exists(path):
        raise click.ClickException(
            f"no database at {path}: nothing has used it yet (a mistyped path? `sonamu-tasks migrate` or a "
            "worker creates it)"
        )
    config.tasks.enable_worker = enable_worker
    return config


def flat(message: str) -> str:
    """`message` on one line (an error line of the CLI)."""
    return " ".join(message.split())


def redact(url: str) -> str:
    """A database URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url
