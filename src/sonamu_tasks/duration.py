"""Durations: the seed's DurationString (`"5s"`, `"30m"`, `"1w"`), a timedelta, or seconds.

Every duration is between 0 and 100 years (`limits.MAX_DURATION`): anything longer is surely a mistake,
and a time that far ahead could not be stored and read back on every backend.
"""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import UnusableDuration
from .limits import check_seconds, shown

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
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)\s*$", re.ASCII)
_LONGEST_TEXT = 64  # a DurationString is a few characters; do not run the pattern over a megabyte


def parse_duration(value: Duration, *, what: str = "duration") -> timedelta:
    """Return `value` as a timedelta from 0 to 100 years, or raise InvalidDuration naming `what` (never
    OverflowError, whatever the number)."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise UnusableDuration(f"{what}: expected a duration, got a bool", field=what)
    elif isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float's range
            seconds = float("inf")
    elif isinstance(value, str):
        match = _PATTERN.match(value) if len(value) <= _LONGEST_TEXT else None
        if match is None:
            raise UnusableDuration(
                f"{what}: {shown(value)} is not a duration; write a number and a unit among "
                f"{', '.join(_UNIT_SECONDS)} (e.g. '500ms', '30m', '7d')",
                field=what,
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise UnusableDuration(
            f"{what}: expected a DurationString, timedelta or seconds, got {type(value).__name__}", field=what
        )
    return timedelta(seconds=check_seconds(seconds, what=what, given=value))
