"""The web dashboard: a small ASGI app over a WorkflowManager (`sonamu-tasks dashboard`)."""

from __future__ import annotations

from .app import Dashboard

__all__ = ["Dashboard"]
