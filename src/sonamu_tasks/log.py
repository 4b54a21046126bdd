"""The `logger` a workflow receives: a LoggerAdapter that tags every line with run, workflow and step."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

WORKFLOW_LOGGER = logging.getLogger("sonamu_tasks.workflow")

current_step: ContextVar[str | None] = ContextVar("sonamu_tasks_current_step", default=None)
"""The step executing in this task: a context variable, so steps running at once each tag their own lines."""


class RunLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`quiet` is set by the attempt while the run replays completed steps, so a line the workflow logs
    between two steps appears once, not once per attempt."""

    def __init__(self, run_id: str, workflow: str, version: str) -> None:
        super().__init__(WORKFLOW_LOGGER, {"run_id": run_id, "workflow": workflow, "version": version})
        self.quiet = False

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.quiet:
            return
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        step = extra["step"] = current_step.get()
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        where = f"{extra['workflow']} run={extra['run_id']}" + (f" step={step}" if step else "")
        return f"[{where}] {msg}", kwargs
