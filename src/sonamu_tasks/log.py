"""The `logger` a workflow receives, and the engine's lines about a run: LoggerAdapters that tag every line with
run, workflow and step."""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

WORKFLOW_LOGGER = logging.getLogger("sonamu_tasks.workflow")
# The engine's own lines about a run (its failures, retries, parks, lost leases) under another name than the
# workflow's lines, so a filter or a level can tell the two apart.
ATTEMPT_LOGGER = logging.getLogger("sonamu_tasks.attempt")

current_step: ContextVar[str | None] = ContextVar("sonamu_tasks_current_step", default=None)
"""The step executing in this task: a context variable, so steps running at once each tag their own lines."""


class RunLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`quiet` is set by the attempt while the run replays completed steps, so a line the workflow logs
    between two steps appears once, not once per attempt."""

    def __init__(self, run_id: str, workflow: str, version: str, logger: logging.Logger = WORKFLOW_LOGGER) -> None:
        super().__init__(logger, {"run_id": run_id, "workflow": workflow, "version": version})
        self.quiet = False

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.quiet:
            return
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = {**(self.extra or {}), "step": current_step.get(), **kwargs.get("extra", {})}
        step = extra["step"]
        kwargs["extra"] = extra
        where = f"{extra['workflow']} run={extra['run_id']}" + (f" step={step}" if step else "")
        return f"[{where}] {msg}", kwargs


class FailureEpisodes:
    """Failures of something tried again and again (heartbeats, claims, the LISTEN connection): an outage fails
    every try, so one warning says it when it starts (`failed`, a %s for the reason), one when a try goes
    through again (`recovered`, a %.1f for how long it failed), and the tries between are logged at DEBUG."""

    def __init__(self, logger: logging.Logger, failed: str, recovered: str) -> None:
        self._logger = logger
        self._failed = failed
        self._recovered = recovered
        self._since: float | None = None

    def failed(self, reason: str, *, exc_info: bool = False) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self._logger.warning(self._failed, reason, exc_info=exc_info)
        else:
            self._logger.debug("again: " + self._failed, reason)

    def succeeded(self) -> None:
        if self._since is not None:
            self._logger.warning(self._recovered, time.monotonic() - self._since)
            self._since = None
