"""The limits on what the engine accepts, and the checks that enforce them before any database call.

Why limits at all: a value the database cannot hold fails inside the database, where it looks like an
outage. A 10 kB step name overflows PostgreSQL's index row, a time past the year 9999 cannot be read
back into a Python datetime, a NUL character cannot go into jsonb or a text column. Each of those used to
be retried as if the database were down, or was stored and then broke every listing. Checked here
first, the same value gets an error that names it, on both backends, and nothing is stored.

The limits (README, "Limits and what is refused"):

- names (workflow, step, schedule, queue) and versions: 1 to MAX_NAME_LENGTH characters, not blank;
- idempotency keys and message topics: 1 to MAX_KEY_LENGTH characters, not blank;
- in all of them no control characters (NUL, newline, tab ...) and no surrogate code points (which no
  UTF-8 text column can hold);
- durations: 0 to MAX_DURATION (100 years of 365 days, written "100y");
- times given as datetimes (start_at, deadline): timezone-aware, from EARLIEST_TIME to MAX_DURATION
  after now;
- a stored error: type, message and traceback cut to their MAX_ERROR_* lengths, NUL and lone surrogates
  replaced (see `storable_text`).

Times read back from the database are clamped into READABLE_TIMES instead of failing (a row written
before these checks existed must not break every listing).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from .errors import InvalidName, InvalidValue, UnusableDuration

MAX_NAME_LENGTH = 200
"""Workflow, step, schedule and queue names and versions, in characters. Well inside PostgreSQL's index
row limit (about 2,700 bytes) even at 4 bytes a character and two names in one index. A step name made
by `step.map` counts with its index: `charge[41]`."""

MAX_KEY_LENGTH = 255
"""Idempotency keys and message topics, in characters (room for a schedule's key
`schedule:{name}@{fire time}` around a name of MAX_NAME_LENGTH)."""

MAX_DURATION = timedelta(days=100 * 365)
"""The longest duration anywhere (sleep, start_at, deadline, retry delays): "100y"."""

EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
"""The earliest datetime accepted as start_at or deadline (a past one means "now" or "already late")."""

READABLE_TIMES = (datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, tzinfo=UTC))
"""Stored times outside this range read as its ends. A day inside datetime's own range, so converting
a clamped time to any timezone for display cannot overflow."""

MAX_ERROR_TYPE_LENGTH = 200
MAX_ERROR_MESSAGE_LENGTH = 8_192
MAX_ERROR_TRACEBACK_LENGTH = 32_768
"""A stored error's parts, in characters; longer ones are cut with a marker saying how much was cut."""

_SHOWN = 60  # characters of a refused value quoted in an error message

# Control characters (C0, DEL, C1) and surrogate code points. A surrogate in a Python str is always
# unstorable in a text column: UTF-8 cannot encode it, paired or not.
_UNSTORABLE_IN_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What a stored string cannot hold: NUL (PostgreSQL text and jsonb refuse it) and surrogates.
_UNSTORABLE_IN_TEXT = re.compile(r"[\x00\ud800-\udfff]")


# names and keys


def check_name(value: object, *, field: str, limit: int = MAX_NAME_LENGTH) -> str:
    """Return `value` if it is a storable name of at most `limit` characters; raise InvalidName naming
    `field` otherwise."""
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be a string, got {type(value).__name__}: {shown(value)}", field=field)
    if not value or value.isspace():
        raise InvalidName(f"{field} must not be blank, got {value!r}", field=field)
    if len(value) > limit:
        raise InvalidName(
            f"{field} is {len(value):,} characters long; the limit is {limit}: {shown(value)}", field=field
        )
    if not (value.isascii() and value.isprintable()):  # the common case skips the search
        bad = _UNSTORABLE_IN_NAME.search(value)
        if bad is not None:
            raise InvalidName(
                f"{field} holds the character {bad.group()!r} at position {bad.start()}, which cannot be "
                f"stored or shown (no control characters, NUL or lone surrogates): {shown(value)}",
                field=field,
            )
    return value


def check_workflow_name(value: object) -> str:
    return check_name(value, field="workflow name")


def check_version(value: object) -> str:
    return check_name(value, field="workflow version")


def check_step_name(value: object) -> str:
    return check_name(value, field="step name")


def check_schedule_name(value: object) -> str:
    return check_name(value, field="schedule name")


def check_queue_name(value: object) -> str:
    return check_name(value, field="queue name")


def check_idempotency_key(value: object) -> str:
    return check_name(value, field="idempotency_key", limit=MAX_KEY_LENGTH)


def check_topic(value: object) -> str:
    return check_name(value, field="topic", limit=MAX_KEY_LENGTH)


# durations and times


def check_seconds(seconds: float, *, what: str, given: object) -> float:
    """Return `seconds` if it is a duration the engine accepts (0 to MAX_DURATION); raise
    UnusableDuration naming `what` otherwise. Checked on a float, before any timedelta is built: a huge
    one would raise OverflowError instead."""
    if math.isnan(seconds) or seconds < 0:
        raise UnusableDuration(f"{what}: {shown(given)} must be a non-negative duration", field=what)
    if seconds > MAX_DURATION.total_seconds():
        raise UnusableDuration(f"{what}: {shown(given)} is longer than the limit of 100 years ('100y')", field=what)
    return seconds


def check_time(moment: datetime, *, field: str, now: datetime | None = None) -> datetime:
    """Return `moment` if it is timezone-aware and between EARLIEST_TIME and MAX_DURATION after `now`."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidValue(f"{field} must be a timezone-aware datetime, got {moment!r}", field=field)
    now = now or datetime.now(UTC)
    try:
        too_late = moment - now > MAX_DURATION
        too_early = moment < EARLIEST_TIME
    except OverflowError:  # an offset pushed it past datetime's own range
        too_late = too_early = True
    if too_late or too_early:
        raise InvalidValue(
            f"{field} {moment.isoformat()} is out of range: give a time from "
            f"{EARLIEST_TIME.date().isoformat()} to 100 years from now",
            field=field,
        )
    return moment


def clamp_time(moment: datetime) -> datetime:
    """`moment` moved into READABLE_TIMES (for times read back from storage)."""
    earliest, latest = READABLE_TIMES
    return earliest if moment < earliest else latest if moment > latest else moment


# stored text


def has_unstorable_text(text: str) -> bool:
    """True when `text` holds NUL or a surrogate code point (which no backend can store as text)."""
    return not (text.isascii() and "\x00" not in text) and _UNSTORABLE_IN_TEXT.search(text) is not None


def storable_text(text: str, limit: int, *, keep_end: bool = False) -> str:
    """`text` with NUL and surrogates replaced by their escapes (`\\x00`, `\\udc80`), cut to `limit`
    characters with a marker saying how much was cut. `keep_end` keeps the last three quarters (a
    traceback's end names the error) and cuts from the middle; otherwise the beginning is kept."""
    if not (text.isascii() and "\x00" not in text):
        text = _UNSTORABLE_IN_TEXT.sub(_escape, text)
    if len(text) <= limit:
        return text
    marker = f" [... {len(text) - limit:,} characters cut ...] "
    room = max(0, limit - len(marker))
    if keep_end:
        head = room // 4
        return text[:head] + marker + text[len(text) - (room - head) :]
    return text[:room] + marker


def shown(value: object) -> str:
    """A value quoted in an error message: its repr (which escapes control characters and surrogates),
    cut to a few dozen characters with its length, so the message itself stays small and storable."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__name__}>"
    if len(text) <= _SHOWN:
        return text
    length = f", {len(value):,} characters" if isinstance(value, str) else ""
    return f"{text[:_SHOWN]}... ({type(value).__name__}{length})"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\\x00" if code == 0 else f"\\u{code:04x}"
