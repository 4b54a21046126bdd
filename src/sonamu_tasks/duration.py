"""Durations: the seed's DurationString (`"5s"`, `"30m"`, `"1w"`), a timedelta, or seconds."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from .errors import InvalidDuration

Duration = str | timedelta | int | float
"""What every `duration` argument accepts."""

_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3_600,
    "d": 86_400,
    "w": 604_800,
    "y": 31_536_000,  # 365 days: calendar years are not a fixed length, and durations must be
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)\s*$")


def parse_duration(value: Duration, *, what: str = "duration") -> timedelta:
    """Return `value` as a non-negative timedelta, or raise InvalidDuration naming `what`."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise InvalidDuration(f"{what}: expected a duration, got a bool")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise InvalidDuration(
                f"{what}: {value!r} is not a duration; write a number and a unit among "
                f"{', '.join(_UNIT_SECONDS)} (e.g. '500ms', '30m', '7d')"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise InvalidDuration(f"{what}: expected a DurationString, timedelta or seconds, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidDuration(f"{what}: {value!r} must be a finite, non-negative duration")
    return timedelta(seconds=seconds)
