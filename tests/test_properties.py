"""Properties: whatever a caller hands the engine, it gets a stored run that completes or one of the
documented errors, never a crash, a hang or a database error; and the engine goes on working after.

Pure functions (durations, names, JSON, stored errors, cron) get many examples. The engine-level ones run
on SQLite with a few dozen examples each: an engine in a thread of its own, its own event loop, so that
hypothesis can drive it from a plain test function and shrink a failing example.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sonamu_tasks import (
    InvalidDuration,
    RetryPolicy,
    RunStatus,
    Schedule,
    SerializationError,
    WorkflowDefinitionError,
    WorkflowFailed,
    WorkflowManager,
    define_config,
    ids,
    parse_duration,
    workflow,
)
from sonamu_tasks.errors import InvalidName, InvalidValue
from sonamu_tasks.limits import (
    MAX_DURATION,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_ERROR_TRACEBACK_LENGTH,
    MAX_NAME_LENGTH,
    check_step_name,
    has_unstorable_text,
)
from sonamu_tasks.schedule import latest_fire_at_or_before, next_fire_after
from sonamu_tasks.serde import dumps, encode_error, loads

T = TypeVar("T")

ENGINE = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
PURE = settings(max_examples=300, deadline=None, database=None)

# Strings a caller might really send, and the ones that break storage: NUL, lone and paired surrogates,
# text that looks like a JSON escape, line separators, quotes.
PIECES = ["\x00", "\ud800", "\udc80", "\ud83d", "\ude00", "\\", "u0000", "😀", "é", "\n", "\u2028", '"', "a"]
STRINGS = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(PIECES), max_size=8).map("".join),
    st.text(alphabet=st.characters(), max_size=30),  # every category, surrogates included
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | STRINGS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(STRINGS, children, max_size=4),
    max_leaves=12,
)
DURATION_VALUES = st.one_of(  # what a caller may pass as a duration, besides a timedelta
    st.from_regex(r"\A[0-9]{1,3}(ms|s|m|h|d|w|y)\Z"),
    st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{1,3})?(ms|s|m|h|d|w|y)\Z"),
    st.text(max_size=12),
    st.integers(min_value=0, max_value=4 * 10**9),
    st.integers(min_value=-(10**20), max_value=10**400),
    st.floats(),
)
DURATIONS = DURATION_VALUES | st.timedeltas()
CRON_FIELD = st.one_of(
    st.just("*"),
    st.integers(min_value=0, max_value=70).map(str),
    st.sampled_from(["*/5", "1-5", "1,15,31", "30", "31", "29", "jan", "FEB", "mon-fri", "L", "?", "-1", "5/0"]),
)
# Plausible expressions, field by field: mostly valid, some that never fire (the 31st of February).
PLAUSIBLE_CRON = st.tuples(
    st.lists(st.sampled_from(["*/10", "0", "59"]), max_size=1),  # an optional leading seconds field
    st.sampled_from(["*", "*/5", "0", "30", "59"]),
    st.sampled_from(["*", "9", "0-23/2", "23"]),
    st.sampled_from(["*", "1", "15", "29", "30", "31", "L"]),
    st.sampled_from(["*", "1", "2", "feb", "4,6", "12"]),
    st.sampled_from(["*", "mon-fri", "0", "sun", "6"]),
).map(lambda fields: " ".join([*fields[0], *fields[1:]]))
CRONS = st.one_of(
    PLAUSIBLE_CRON,
    st.lists(CRON_FIELD, min_size=4, max_size=7).map(" ".join),
    st.text(max_size=20),
)


def _storable(value: Any) -> bool:
    """What serde promises to store: finite numbers, no NUL, no lone surrogate (pairs are fine)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not _has_lone_surrogate_or_nul(value)
    if isinstance(value, list):
        return all(_storable(item) for item in value)
    if isinstance(value, dict):
        return all(_storable(key) and _storable(item) for key, item in value.items())
    return True


def _has_lone_surrogate_or_nul(text: str) -> bool:
    # A high surrogate directly followed by a low one is stored as the character they encode.
    combined = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return has_unstorable_text(combined)


def _combined(value: Any) -> Any:
    """`value` as it reads back: surrogate pairs as one character, floats as jsonb's decimals give them (1e16
    and up as the integer their shortest form writes, -0.0 as 0.0)."""
    if isinstance(value, float):
        return 0.0 if value == 0 else int(Decimal(repr(value))) if "e+" in repr(value) else value
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    if isinstance(value, list):
        return [_combined(item) for item in value]
    if isinstance(value, dict):
        return {_combined(key): _combined(item) for key, item in value.items()}
    return value


# pure functions


@PURE
@given(DURATIONS)
def test_a_duration_parses_within_100_years_or_is_refused_as_invalid(value: Any) -> None:
    try:
        parsed = parse_duration(value, what="the duration")
    except InvalidDuration as error:
        assert str(error).startswith("the duration: ")
        assert isinstance(error, InvalidValue)
    else:
        assert timedelta(0) <= parsed <= MAX_DURATION


@PURE
@given(st.one_of(STRINGS, st.text(min_size=190, max_size=260), st.integers(), st.none()))
def test_a_step_name_is_accepted_as_is_or_refused_by_name(value: Any) -> None:
    try:
        name = check_step_name(value)
    except InvalidName as error:
        assert str(error).startswith("step name ") and len(str(error)) < 400
    else:
        assert name == value and 1 <= len(name) <= MAX_NAME_LENGTH and name.strip()
        name.encode("utf-8")  # storable in a text column (no surrogates)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)


@PURE
@given(JSONISH)
def test_a_value_is_stored_as_json_that_reads_back_or_refused_as_unserializable(value: Any) -> None:
    try:
        text = dumps(value, what="the value")
    except SerializationError as error:
        assert str(error).startswith("the value cannot be stored")
        assert "at $" in str(error)  # where in the value: NaN, a lone surrogate, NUL, an object...
        assert not _storable(value)
    else:
        assert _storable(value)
        assert "\\u0000" not in text.replace("\\\\", "")
        assert loads(text) == _combined(value)


@pytest.fixture(scope="module")
def jsonb_reader(postgres_url: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        yield lambda text: connection.execute("SELECT %s::jsonb", (text,)).fetchone()[0]  # type: ignore[index]


def _typed(value: Any) -> Any:
    """A value with its dicts' key order and its numbers' types made visible, for an exact comparison."""
    if isinstance(value, dict):
        return ["dict", [(key, _typed(item)) for key, item in value.items()]]
    if isinstance(value, list):
        return ["list", [_typed(item) for item in value]]
    return [type(value).__name__, value]


@PURE
@given(
    st.floats(0, 1e7),
    st.floats(1, 10),
    st.none() | st.floats(0, 1e8),
    st.floats(0, 1),
    st.integers(1, 2_000),
)
def test_a_jittered_retry_delay_lies_between_the_fraction_below_the_plain_delay_and_the_plain_delay(
    initial: float, coefficient: float, maximum: float | None, jitter: float, attempt: int
) -> None:
    """Jitter only shortens: the cap stays the longest wait, and a delay is never shorter than its fraction
    allows."""
    fields = {"max_attempts": 5_000, "initial_interval_ms": initial, "backoff_coefficient": coefficient}
    plain = RetryPolicy(**fields, maximum_interval_ms=maximum).decide(RuntimeError(), attempt).delay_ms
    jittered = RetryPolicy(**fields, maximum_interval_ms=maximum, jitter=jitter).decide(RuntimeError(), attempt)
    assert jittered.should_retry
    if plain == 100 * 365 * 86_400_000:  # past the 100-year cap, the cap it is
        assert jittered.delay_ms <= plain
    else:
        assert plain * (1 - jitter) * (1 - 1e-12) <= jittered.delay_ms <= plain


NUMBERS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e16, -1e16, 2.5e20, -0.0, 1.5e-07])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | NUMBERS | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=16,
)


@settings(max_examples=200, deadline=None, database=None)
@given(JSON_VALUES)
def test_a_value_reads_back_on_every_backend_exactly_as_postgresqls_jsonb_gives_it(
    jsonb_reader: Any, value: Any
) -> None:
    """SQLite keeps the text; PostgreSQL's jsonb reorders keys and stores numbers as decimals. serde.loads
    (SQLite's reads, and a step's first execution) must give what jsonb gives, key order and types included."""
    try:
        text = dumps(value, what="the value")
    except SerializationError:
        assert not _storable(value)
        return
    assert _typed(loads(text)) == _typed(jsonb_reader(text))


@PURE
@given(STRINGS, st.text(max_size=3).map(lambda s: s * 5000))
def test_an_error_is_always_storable_and_within_its_limits(message: str, padding: str) -> None:
    stored = encode_error(ValueError(message + padding), step="step")
    assert len(stored["message"]) <= MAX_ERROR_MESSAGE_LENGTH
    assert len(stored["traceback"]) <= MAX_ERROR_TRACEBACK_LENGTH
    assert loads(dumps(stored, what="the error")) == stored


@settings(max_examples=200, deadline=None, database=None)
@given(CRONS)
def test_a_cron_expression_is_refused_at_definition_or_has_fire_times(expression: str) -> None:
    async def report() -> None: ...

    try:
        (schedule,) = workflow(report, version="1", schedules=[Schedule(expression)]).schedules
    except WorkflowDefinitionError as error:
        assert "workflow 'report': schedule " in str(error)
        event("refused")
        return
    event("accepted")
    now = datetime.now(UTC)
    assert next_fire_after(schedule.expression, "Asia/Seoul", now) > now
    assert latest_fire_at_or_before(schedule.expression, "UTC", now) <= now


# Fire times around DST changes: the fast walk (schedule._nearest_fire) against the plain one it replaced, which
# stepped through every match from an hour before the moment: the same answer, to the microsecond, in zones
# whose clocks jump by an hour, half an hour (Lord Howe), 45 minutes' offset (Chatham), a whole day (Samoa,
# 2011), or not at all.
DST_ZONES = (
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/Santiago",
    "America/St_Johns",
    "Pacific/Apia",
    "Asia/Seoul",
)
DST_CRONS = (
    "* * * * * *",
    "*/7 * * * * *",
    "30 * * * * *",
    "* * * * *",
    "*/15 * * * *",
    "0 * * * *",
    "30 2 * * *",
    "59 1 * * *",
    "0,30 1-3 * * *",
    "15 2 * * * *",
    "0 0 * * *",
    "30 1 * * sun",
)


def _offset_changes(zone_name: str) -> list[datetime]:
    """The moments (to the second) the zone's UTC offset changed, 2011 to 2012 and 2025 to 2027; one for a zone
    without DST (Seoul), so that it is sampled too."""
    tz = ZoneInfo(zone_name)
    changes = []
    for start in (datetime(2011, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)):
        day = start
        while day < start.replace(year=start.year + 2):
            after = day + timedelta(days=1)
            if day.astimezone(tz).utcoffset() != after.astimezone(tz).utcoffset():
                low, high = day, after
                while high - low > timedelta(seconds=1):
                    middle = low + (high - low) / 2
                    same = middle.astimezone(tz).utcoffset() == low.astimezone(tz).utcoffset()
                    low, high = (middle, high) if same else (low, middle)
                changes.append(high.replace(microsecond=0))
            day = after
    return changes or [datetime(2026, 3, 8, 7, tzinfo=UTC)]


DST_CHANGES = [(zone, change) for zone in DST_ZONES for change in _offset_changes(zone)]


def _plain_wall_times(expression: str, timezone: str, moment: datetime, *, backwards: bool) -> Iterator[datetime]:
    """The walk before: every match from an hour to the near side of `moment`, each at its first occurrence."""
    tz = ZoneInfo(timezone)
    local = moment.astimezone(tz).replace(tzinfo=None)
    local += timedelta(hours=1) if backwards else -timedelta(hours=1)
    cron = croniter(expression, local, second_at_beginning=len(expression.split()) == 6)
    while True:
        wall: datetime = cron.get_prev(datetime) if backwards else cron.get_next(datetime)
        yield wall.replace(tzinfo=tz, fold=0).astimezone(UTC)


@settings(max_examples=400, deadline=None, database=None)
@given(
    st.sampled_from(DST_CHANGES),
    st.sampled_from(DST_CRONS),
    st.integers(min_value=-3 * 3600, max_value=3 * 3600),
    st.sampled_from([0, 0, 1, 500_000, 999_999]),
)
def test_fire_times_around_a_dst_change_are_those_of_the_plain_walk(
    change: tuple[str, datetime], expression: str, seconds: int, microseconds: int
) -> None:
    zone_name, moment = change
    moment += timedelta(seconds=seconds, microseconds=microseconds)
    plain_next = next(f for f in _plain_wall_times(expression, zone_name, moment, backwards=False) if f > moment)
    after = moment + timedelta(microseconds=1)
    plain_latest = next(f for f in _plain_wall_times(expression, zone_name, after, backwards=True) if f <= moment)
    assert next_fire_after(expression, zone_name, moment) == plain_next
    assert latest_fire_at_or_before(expression, zone_name, moment) == plain_latest


# The last id a process made: its millisecond (a moment ago, now, or ahead of the clock, which was set back)
# and its 74 counter bits, random or at the edges where they carry into the next group or run out.
LAST_ID = st.tuples(
    st.integers(min_value=-3, max_value=3),
    st.integers(min_value=0, max_value=2**74 - 1)
    | st.sampled_from([0, 2**48 - 2, 2**62 - 1, 2**74 - 2**33, 2**74 - 1])
    | st.integers(min_value=2**74 - 2**40, max_value=2**74 - 1),
)


@PURE
@given(LAST_ID, st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=4))
def test_run_ids_are_uuidv7_each_greater_than_the_one_made_before(last: tuple[int, int], counts: list[int]) -> None:
    offset, counter = last
    clock = ids._Clock()
    clock.millis = time.time_ns() // 1_000_000 + offset
    clock.counter = counter
    before = uuid.UUID(int=clock.millis << 80 | 0x7 << 76 | (counter >> 62) << 64 | 0b10 << 62 | counter % 2**62)
    kept, ids._clock = ids._clock, clock
    try:
        made = [run_id for count in counts for run_id in ids.new_run_ids(count)]
        made.append(ids.new_run_id())
        after = time.time_ns() // 1_000_000
    finally:
        ids._clock = kept
    assert made == sorted(set(made)) and str(before) < made[0]  # strictly increasing, within a batch and across
    for run_id in made:
        parsed = uuid.UUID(run_id)
        assert str(parsed) == run_id and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        # its millisecond: the clock's (or the last id's, ahead of it), one more if the counter ran out
        assert before.int >> 80 <= parsed.int >> 80 <= max(after, before.int >> 80) + 1


# the engine


class Engine:
    """A started WorkflowManager on SQLite, in a thread with its own event loop."""

    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine", daemon=True)
        self.thread.start()
        config = define_config(
            database_url=f"sqlite:///{path}",
            tasks={"worker_options": {"concurrency": 4, "lease_ms": 2000, "listen_delay": 0}},
        )
        self.manager = WorkflowManager(config, workflows=[echo, named_step, sleeper, plain])
        self.call(self.manager.start())

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.manager.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def assert_still_works(self) -> None:
        handle = self.call(self.manager.run(plain, {"ok": True}))
        assert self.call(handle.result(timeout=15)) == {"ok": True}
        self.call(self.manager.list_runs(limit=1000))


async def _echo(value: Any) -> Any:
    return value


@workflow(version="1")
async def echo(input: Any, step: Any) -> Any:
    return await step.define("echo", _echo).run(input)


@workflow(version="1")
async def plain(input: Any) -> Any:
    return input


@workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=10))
async def named_step(input: list[int], step: Any) -> Any:
    # The name travels as code points: a name the input could not hold is still tried as a step name.
    return await step.define("".join(map(chr, input)), _echo).run(1)


@workflow(version="1", retry_policy=RetryPolicy(max_attempts=2, initial_interval_ms=10))
async def sleeper(input: Any, step: Any) -> None:
    await step.sleep("nap", input["duration"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    running = Engine(tmp_path_factory.mktemp("engine") / "sonamu_tasks.db")
    yield running
    running.close()


@ENGINE
@given(JSONISH)
def test_any_input_completes_as_its_json_or_is_refused_at_run(engine: Engine, value: Any) -> None:
    try:
        handle = engine.call(engine.manager.run(echo, value))
    except SerializationError:
        event("refused at run()")
        assert not _storable(value)
    else:
        event("completed")
        assert _storable(value)
        assert engine.call(handle.result(timeout=15)) == _combined(value)
    engine.assert_still_works()


@ENGINE
@given(STRINGS.filter(bool) | st.text(min_size=195, max_size=210))
def test_any_step_name_runs_or_fails_its_run_at_once_naming_it(engine: Engine, name: str) -> None:
    handle = engine.call(engine.manager.run(named_step, [ord(c) for c in name]))
    try:
        check_step_name(name)
    except InvalidName:
        event("run failed")
        with pytest.raises(WorkflowFailed) as failure:
            engine.call(handle.result(timeout=15))
        assert failure.value.error["type"] == "InvalidName"
        assert engine.call(handle.info()).attempts == 1
    else:
        event("completed")
        assert engine.call(handle.result(timeout=15)) == 1
        steps = engine.call(handle.info(with_steps=True)).steps
        assert [step.name for step in steps] == [name]
    engine.assert_still_works()


@ENGINE
@given(DURATION_VALUES)
def test_any_start_at_or_sleep_is_stored_or_refused_by_name(engine: Engine, duration: Any) -> None:
    try:
        expected = parse_duration(duration)
    except InvalidDuration:
        event("refused")
        with pytest.raises(InvalidDuration, match=r"^start_at: "):
            engine.call(engine.manager.run(plain, None, start_at=duration))
        if _storable(duration):  # the same value as a sleep (one with NUL cannot even be the input)
            handle = engine.call(engine.manager.run(sleeper, {"duration": duration}))
            with pytest.raises(WorkflowFailed, match=r"step.sleep\('nap'\)"):
                engine.call(handle.result(timeout=15))
            assert engine.call(handle.info()).attempts == 1
    else:
        event("stored")
        before = datetime.now(UTC)
        delayed = engine.call(engine.manager.run(plain, None, start_at=duration))
        record = engine.call(delayed.info())
        assert record.available_at >= before + expected - timedelta(seconds=1)
        engine.call(engine.manager.cancel(delayed.id))
        handle = engine.call(engine.manager.run(sleeper, {"duration": duration}))

        def parked_or_done() -> RunStatus:
            return engine.call(handle.status())

        status = _wait_for(parked_or_done, {RunStatus.SLEEPING, RunStatus.COMPLETED})
        if status is RunStatus.SLEEPING:
            engine.call(engine.manager.cancel(handle.id))
    engine.assert_still_works()


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(CRONS)
def test_any_cron_is_refused_at_definition_or_scheduled(engine: Engine, expression: str) -> None:
    try:

        @workflow(version="1", name="cron_property", schedules=[expression])
        async def scheduled() -> None: ...

    except WorkflowDefinitionError:
        event("refused")
        return
    event("accepted")
    try:
        engine.call(engine.manager.synchronize([echo, named_step, sleeper, plain, scheduled]))
        schedules = engine.call(engine.manager.list_schedules())
        assert [s.expression for s in schedules if s.workflow_name == "cron_property"] == [expression]
    finally:
        engine.call(engine.manager.synchronize([echo, named_step, sleeper, plain]))
    engine.assert_still_works()


def _wait_for(read: Any, wanted: set[Any], timeout: float = 15) -> Any:
    """Read until the value is one of `wanted`; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value in wanted:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for one of {wanted}; last {value}")
        time.sleep(0.02)


def test_json_of_a_combined_pair_is_the_character() -> None:
    """The helper above agrees with serde: a surrogate pair in a str reads back as one character."""
    assert loads(dumps("\ud83d\ude00", what="v")) == "😀" == _combined("\ud83d\ude00")
    assert json.loads(json.dumps("😀")) == "😀"
