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
    text, cut = json_excerpt(value, width)
    return text[: width - 1] + "…" if cut else text


def json_excerpt(value: Any, limit: int, *, indent: int | None = None) -> tuple[str, bool]:
    """The first `limit` characters of `value` as JSON, and whether there was more.

    Encoded piece by piece and stopped at the limit, so a 50 MB list of values is not serialized whole to
    show a line of it (one huge string is still encoded in one piece, at C speed).
    """
    pieces: list[str] = []
    size = 0
    for piece in json.JSONEncoder(indent=indent, default=str).iterencode(value):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            return "".join(pieces)[:limit], True
    return "".join(pieces), False
