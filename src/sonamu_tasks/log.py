"""The `logger` a workflow receives: a LoggerAdapter that tags every line with run, workflow and step."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

WORKFLOW_LOGGER = logging.getLogger("sonamu_tasks.workflow")


class RunLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`quiet` is set by the attempt while the run replays completed steps, so a line the workflow logs
    between two steps appears once, not once per attempt."""

    def __init__(self, run_id: str, workflow: str, version: str) -> None:
        super().__init__(WORKFLOW_LOGGER, {"run_id": run_id, "workflow": workflow, "version": version})
        self.step: str | None = None
        self.quiet = False

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.quiet:
            return
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra["step"] = self.step
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        where = f"{extra['workflow']} run={extra['run_id']}" + (f" step={self.step}" if self.step else "")
        return f"[{where}] {msg}", kwargs
