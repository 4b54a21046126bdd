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

from croniter import CroniterBadDateError, croniter

from .errors import ConfigError, InvalidName, WorkflowDefinitionError
from .limits import MAX_NAME_LENGTH, check_schedule_name, shown


@dataclass(frozen=True)
class Schedule:
    """Standard 5-field cron (`"0 9 * * *"`) or 6 fields with a leading seconds field (`"*/10 * * * * *"`).

    `input` is a value, or a zero-argument callable evaluated at each fire.
    """

    expression: str
    name: str | None = None
    input: Any = None

    def __post_init__(self) -> None:
        if self.name is not None:
            try:
                check_schedule_name(self.name)
            except InvalidName as error:
                raise WorkflowDefinitionError(str(error)) from error
        _check_expression(self.expression, self.name)

    def name_for(self, workflow_name: str) -> str:
        return self.name or f"{workflow_name}[{self.expression}]"

    def evaluate_input(self) -> Any:
        value: Any = self.input
        if callable(value):
            value = value()
        return value


def _check_expression(expression: object, name: str | None) -> None:
    """Refuse at definition what would otherwise stop the scheduler at start-up: a string that is not a
    5- or 6-field cron expression, and one that never fires (`0 0 31 2 *`: February has no 31st)."""
    label = f"schedule {shown(name or expression)}"
    if not isinstance(expression, str):
        raise WorkflowDefinitionError(f"{label}: the cron expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_NAME_LENGTH:
        raise WorkflowDefinitionError(
            f"{label}: the cron expression is {len(expression):,} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    fields = expression.split()
    six = len(fields) == 6
    try:
        valid = len(fields) in (5, 6) and expression.isascii()
        valid = valid and croniter.is_valid(expression, second_at_beginning=six)
    except Exception:  # croniter raises a few things of its own on odd input: all mean "not valid"
        valid = False
    if not valid:
        raise WorkflowDefinitionError(
            f"{label}: {shown(expression)} is not a cron expression; "
            "write 5 fields (minute hour day month weekday) or 6 with leading seconds"
        )
    try:
        # croniter searches a bounded number of years for a match: one that never fires fails here.
        cron = croniter(expression, datetime.now(UTC).replace(tzinfo=None), second_at_beginning=six)
        cron.get_next(datetime)
    except CroniterBadDateError as error:
        raise WorkflowDefinitionError(
            f"{label}: {expression!r} never fires: no date matches it (a day the month does not have, "
            "like February 31st?)"
        ) from error
    except Exception as error:
        raise WorkflowDefinitionError(f"{label}: {expression!r} cannot be evaluated: {error}") from error


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
