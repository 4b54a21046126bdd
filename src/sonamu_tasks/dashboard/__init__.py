"""The web dashboard: a small Starlette app over a WorkflowManager (`sonamu-tasks dashboard`)."""

from __future__ import annotations

from .app import Dashboard, check_token

__all__ = ["Dashboard", "check_token"]
