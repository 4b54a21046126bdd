"""Cron schedules: `Schedule(expression, name=None, input=None)` and their fire times in a timezone.

Fire times are computed in local wall-clock time of the configured timezone, then placed on the real
time line. Across daylight-saving changes:
- a wall time that does not exist (the hour skipped in spring) fires when the clock jumps past it
  (`30 2 * * *` in New York fires at 03:30 EDT on the spring-forward day);
- a wall time that happens twice (the hour repeated in autumn) fires once, at its first occurrence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from .errors import ConfigError, InvalidName, WorkflowDefinitionError
from .limits import MAX_NAME_LENGTH, check_schedule_name, shown


@dataclass(frozen=True)
class Schedule:
    """Standard 5-field cron (`"0 9 * * *"`) or 6 fields with a leading seconds field (`"*/10 * * * * *"`).

    `input` is a value, or a zero-argument callable (plain or async) evaluated at each fire. The expression
    and the name are checked when a workflow declares the schedule (`check`), so that an error names both.
    """

    expression: str
    name: str | None = None
    input: Any = None

    def name_for(self, workflow_name: str) -> str:
        return self.name or f"{workflow_name}[{self.expression}]"

    def check(self, workflow_name: str) -> None:
        """WorkflowDefinitionError, naming the workflow and the schedule, for what would otherwise stop the
        scheduler at start-up or never fire: a bad name, a string that is not a 5- or 6-field cron
        expression, a range that runs backwards (`5-1`), an expression no date matches (`0 0 31 2 *`)."""
        label = f"workflow {workflow_name!r}: schedule {shown(self.name or self.expression)}"
        if self.name is not None and isinstance(self.expression, str):
            label += f" ({shown(self.expression)})"
        if self.name is not None:
            try:
                check_schedule_name(self.name)
            except InvalidName as error:
                raise WorkflowDefinitionError(f"workflow {workflow_name!r}: {error}") from error
        _check_expression(self.expression, label)

    async def evaluate_input(self) -> Any:
        """The input of a fire: the value, or what the callable returns (awaited when it is async)."""
        value: Any = self.input
        if callable(value):
            value = value()
            if inspect.isawaitable(value):
                value = await value
        return value


_FIELDS = {
    5: ("minute", "hour", "day-of-month", "month", "day-of-week"),
    6: ("second", "minute", "hour", "day-of-month", "month", "day-of-week"),
}
_BOUNDS = {"second": (0, 59), "minute": (0, 59), "hour": (0, 23), "day-of-month": (1, 31), "month": (1, 12)}
_BOUNDS["day-of-week"] = (0, 6)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_NAMED = {
    "month": {month: number for number, month in enumerate(_MONTHS, 1)},
    "day-of-week": {day: number for number, day in enumerate(_WEEKDAYS)},
}


def _check_expression(expression: object, label: str) -> None:
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
            f"{label} is not a cron expression; "
            "write 5 fields (minute hour day month weekday) or 6 with leading seconds"
        )
    backwards = _backward_range(fields)
    if backwards is not None:
        raise WorkflowDefinitionError(f"{label}: {backwards}")
    try:
        # croniter searches a bounded number of years for a match: one that never fires fails here.
        cron = croniter(expression, datetime.now(UTC).replace(tzinfo=None), second_at_beginning=six)
        cron.get_next(datetime)
    except CroniterBadDateError as error:
        raise WorkflowDefinitionError(
            f"{label} never fires: no date matches it (a day the month does not have, like February 31st?)"
        ) from error
    except Exception as error:
        raise WorkflowDefinitionError(f"{label} cannot be evaluated: {error}") from error


def _backward_range(fields: list[str]) -> str | None:
    """What is wrong with the first range whose start is after its end (`5-1`), or None. croniter reads
    `5-1` as wrapping round (minutes 5 to 59, then 0 and 1) but `5-1/2` as not wrapping, and cron itself
    refuses both: refused here, with the wrap written out. `mon-sun` and `5-0` end on Sunday as 7."""
    for field, text in zip(_FIELDS[len(fields)], fields, strict=True):
        for part in text.split(","):
            span = part.split("/", 1)[0]
            start, dash, end = span.partition("-")
            low, high = _field_value(start, field), _field_value(end, field)
            if not dash or low is None or high is None:
                continue
            if field == "day-of-week" and high == 0:
                high = 7
            if low > high:
                first, last = _BOUNDS[field]
                return (
                    f"the {field} range {span!r} runs backwards ({low} is after {high}); a range goes from low to "
                    f"high: write {low}-{last},{first}-{high} for one that wraps round"
                )
    return None


def _field_value(text: str, field: str) -> int | None:
    if text.isdigit():
        return int(text)
    return _NAMED.get(field, {}).get(text.lower())


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ConfigError(f"timezone {name!r} is not an IANA time zone name (e.g. 'Asia/Seoul', 'UTC')") from error


def next_fire_after(expression: str, timezone: str, moment: datetime) -> datetime:
    """The first fire time strictly after `moment` (UTC)."""
    return _nearest_fire(expression, zone(timezone), moment, forward=True)


def latest_fire_at_or_before(expression: str, timezone: str, moment: datetime) -> datetime:
    """The last fire time at or before `moment` (UTC)."""
    return _nearest_fire(expression, zone(timezone), moment, forward=False)


_LOOKAROUND = timedelta(hours=1)
_SECOND = timedelta(seconds=1)


def _nearest_fire(expression: str, tz: tzinfo, moment: datetime, *, forward: bool) -> datetime:
    """The fire nearest `moment` on its far side (forward: the first strictly after; backwards: the last at or
    before). What a fire time is, and so the DST behaviour in the module's docstring:

    Walk the cron's matches in wall-clock time, from an hour before `moment`'s wall time (forward; an hour after,
    backwards) so that a skipped or repeated hour is not missed; place each match `w` on the real time line at
    its first occurrence, `w - offset(w)` where offset(w) is the UTC offset at fold=0 (in a skipped hour, the
    offset before the jump: 02:30 lands at 03:30 after it); the answer is the first match, in walking order, that
    lands on the far side of `moment`.

    That walk, one match at a time, took 3,600 croniter steps for a per-second cron (70 ms, on every fire). This
    one jumps: a match `w` that lands on the near side, at offset `o`, shows that every match between it and
    `bound = moment + o` (the wall time that lands on `moment` at that offset) lands on the near side too, as
    long as the offset stays `o`. So the walk resumes at `bound`, or, when the offset at `bound` differs, at the
    second where it changes (bisection). It returns what the plain walk returns, for any zone (a property test
    compares the two across DST days): equal offsets at both ends of a span mean one offset throughout, as the
    spans are under a day and no zone's offset changes twice within four days (tzdata 2025, Africa/Freetown's
    95 hours the closest pair). Wall times are whole seconds, and so are offset changes in wall time."""
    utc_moment = moment.astimezone(UTC).replace(tzinfo=None)
    if forward:
        start = moment.astimezone(tz).replace(tzinfo=None) - _LOOKAROUND
    else:
        start = (moment + timedelta(microseconds=1)).astimezone(tz).replace(tzinfo=None) + _LOOKAROUND
    cron = croniter(expression, start, second_at_beginning=len(expression.split()) == 6)
    while True:
        wall: datetime = cron.get_next(datetime) if forward else cron.get_prev(datetime)
        offset = _offset(wall, tz)
        real = wall - offset
        if (real > utc_moment) if forward else (real <= utc_moment):
            return real.replace(tzinfo=UTC)
        bound = utc_moment + offset
        if _offset(bound, tz) == offset:
            # Forward: the next match after `bound`. Backwards: the last at or before it (croniter walks back
            # from strictly before its start; matches are whole seconds).
            resume = _whole(bound) if forward else _whole(bound) + _SECOND
        else:
            near, far = wall, _whole(bound)
            while abs(far - near) > _SECOND:  # near keeps the offset `o`, far does not
                middle = _whole(near + (far - near) / 2)
                near, far = (middle, far) if _offset(middle, tz) == offset else (near, middle)
            # Forward: matches up to `near` land before moment; backwards: from `near` on they land after it.
            resume = near
        cron.set_current(resume, force=True)


def _offset(wall: datetime, tz: tzinfo) -> timedelta:
    """The UTC offset of a wall time at its first occurrence (fold=0)."""
    offset = wall.replace(tzinfo=tz, fold=0).utcoffset()
    assert offset is not None  # a ZoneInfo has an offset for every wall time
    return offset


def _whole(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)
