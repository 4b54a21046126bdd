"""Cron schedules: `Schedule(expression, name=None, input=None)` and their fire times in a timezone.

Fire times are computed in local wall-clock time of the configured timezone, then placed on the real
time line. Across daylight-saving changes:
- a wall time that does not exist (the hour skipped in spring) fires when the clock jumps past it
  (`30 2 * * *` in New York fires at 03:30 EDT on the spring-forward day);
- a wall time that happens twice (the hour repeated in autumn) fires once, at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .errors import ConfigError, WorkflowDefinitionError


@dataclass(frozen=True)
class Schedule:
    """Standard 5-field cron (`"0 9 * * *"`) or 6 fields with a leading seconds field (`"*/10 * * * * *"`).

    `input` is a value, or a zero-argument callable evaluated at each fire.
    """

    expression: str
    name: str | None = None
    input: Any = None

    def __post_init__(self) -> None:
        fields = self.expression.split()
        if len(fields) not in (5, 6) or not croniter.is_valid(self.expression, second_at_beginning=len(fields) == 6):
            raise WorkflowDefinitionError(
                f"schedule {self.name or self.expression!r}: {self.expression!r} is not a cron expression; "
                "write 5 fields (minute hour day month weekday) or 6 with leading seconds"
            )

    def name_for(self, workflow_name: str) -> str:
        return self.name or f"{workflow_name}[{self.expression}]"

    def evaluate_input(self) -> Any:
        value: Any = self.input
        if callable(value):
            value = value()
        return value


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ConfigError(f"timezone {name!r} is not an IANA time zone name (e.g. 'Asia/Seoul', 'UTC')") from error


def next_fire_after(expression: str, timezone: str, moment: datetime) -> datetime:
    """The first fire time strictly after `moment` (UTC)."""
    fires = _wall_times(expression, timezone, moment, backwards=False)
    return next(fire for fire in fires if fire > moment)


def latest_fire_at_or_before(expression: str, timezone: str, moment: datetime) -> datetime:
    """The last fire time at or before `moment` (UTC)."""
    fires = _wall_times(expression, timezone, moment + timedelta(microseconds=1), backwards=True)
    return next(fire for fire in fires if fire <= moment)


def _wall_times(expression: str, timezone: str, moment: datetime, *, backwards: bool) -> Iterator[datetime]:
    tz = zone(timezone)
    local = moment.astimezone(tz).replace(tzinfo=None)
    # Start an hour to the far side so a repeated wall hour is not missed, then filter on real time.
    local += timedelta(hours=1) if backwards else -timedelta(hours=1)
    cron = croniter(expression, local, second_at_beginning=len(expression.split()) == 6)
    while True:
        wall: datetime = cron.get_prev(datetime) if backwards else cron.get_next(datetime)
        yield wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
