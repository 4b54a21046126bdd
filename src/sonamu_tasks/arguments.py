"""Checks of values a person typed (command-line arguments, dashboard query parameters) before they reach the
database, so that a typo is an error naming the value instead of a database error or a traceback.

Each check raises ValueError with a message fit for a user; the CLI turns it into a usage error, the
dashboard into a 400 or 404.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from . import ids, limits, serde
from .errors import SerializationError
from .status import RunStatus

MAX_LIMIT = 1000


def run_id(text: str) -> str:
    """A run id in its canonical form (lowercase UUID with dashes), as the backends store it."""
    canonical = ids.canonical_run_id(text)
    if canonical is None:
        raise ValueError(f"{_shown(text)} is not a run id (a UUID like 0190b7e2-5c3a-7d1e-8f00-1234567890ab)")
    return canonical


def plain_text(text: str) -> str:
    """Text for a filter or a name: PostgreSQL refuses NUL in text, so it is refused here first."""
    if "\x00" in text:
        raise ValueError(f"{_shown(text)} contains a NUL character")
    return text


def workflow_name(text: str) -> str:
    """A workflow name, as one can be stored (for an action on many runs: `cancel --workflow`)."""
    return limits.check_workflow_name(text)


def version(text: str) -> str:
    """A workflow version, as one can be stored: not blank, not too long, no control characters."""
    return limits.check_version(text)  # InvalidName is a ValueError with a message fit for a user


def queue_name(text: str) -> str:
    return limits.check_queue_name(text)


def step_name(text: str) -> str:
    """A step name (`fork --from-step`), as one is stored."""
    return limits.check_step_name(text)


def limit(text: str) -> int:
    """A page size between 1 and MAX_LIMIT."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{_shown(text)} is not a whole number") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"{value} is out of range; give 1 to {MAX_LIMIT}")
    return value


def statuses(texts: Iterable[str]) -> tuple[RunStatus, ...]:
    """Run statuses by name; an unknown one names the known ones."""
    found = []
    for text in texts:
        try:
            found.append(RunStatus(text))
        except ValueError:
            known = ", ".join(s.value for s in RunStatus)
            raise ValueError(f"{_shown(text)} is not a status; one of {known}") from None
    return tuple(found)


def topic(text: str) -> str:
    """A message topic: 1 to 255 characters, no control characters."""
    return limits.check_topic(text)  # InvalidName is a ValueError with a message fit for a user


def idempotency_key(text: str) -> str:
    return limits.check_idempotency_key(text)


def event_name(text: str) -> str:
    """The name of a broadcast event (`emit`)."""
    return limits.check_name(text, field="event name")


def emit_key(text: str) -> str:
    """The key of a broadcast event (`emit --key`)."""
    return limits.check_name(text, field="event key", limit=limits.MAX_KEY_LENGTH)


def event_key(text: str) -> str:
    """The key of an event a run publishes (`get-event`)."""
    return limits.check_name(text, field="event key")


def json_value(text: str) -> Any:
    """A JSON value the engine can store: valid JSON, without NaN or Infinity, without NUL in a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error} in {_shown(text)}") from None
    except RecursionError:
        raise ValueError("not storable JSON: nested too deeply") from None
    try:
        serde.dumps(value, what="the value")
    except SerializationError as error:
        raise ValueError(str(error)) from None  # "the value cannot be stored as JSON: ..." (NaN, NUL)
    return value


def _shown(text: str) -> str:
    """The value as Python writes it (control characters escaped), cut short."""
    return repr(text if len(text) <= 60 else text[:57] + "...")
