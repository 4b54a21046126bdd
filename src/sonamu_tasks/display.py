"""Short human-readable forms of durations and values, shared by the CLI and the dashboard."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


def duration_text(start: datetime | None, end: datetime | None) -> str:
    """`850ms`, `3.2s`, or `-` when either end is unknown."""
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def preview(value: Any, width: int) -> str:
    """A value as JSON, cut to `width` characters with an ellipsis."""
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"
