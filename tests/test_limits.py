"""Limits: what the engine refuses, and that one bad value never breaks anything beyond itself.

Each test is a promise of the README's "Limits and what is refused": a value the database cannot hold
is refused before anything is stored, with an error naming it; inside a workflow it fails that run at
once (a retry would make the same value); and every other run, listing and reader carries on.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pydantic
import pytest

from sonamu_tasks import (
    InvalidDuration,
    NonRetryableError,
    RetryDecision,
    RetryPolicy,
    RunStatus,
    Schedule,
    SerializationError,
    StepStatus,
    WorkflowDefinitionError,
    WorkflowFailed,
    parse_duration,
    workflow,
)
from sonamu_tasks.errors import InvalidName, InvalidValue
from sonamu_tasks.limits import (
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_ERROR_TRACEBACK_LENGTH,
    MAX_KEY_LENGTH,
    MAX_NAME_LENGTH,
    READABLE_TIMES,
    check_idempotency_key,
    check_queue_name,
    check_schedule_name,
    check_step_name,
    check_time,
    check_topic,
    check_version,
    check_workflow_name,
    storable_text,
)
from sonamu_tasks.serde import dumps, encode_error, loads

from .conftest import wait_until

FAST_RETRY = RetryPolicy(max_attempts=2, initial_interval_ms=20, backoff_coefficient=1)
NAME_CHECKS = [check_workflow_name, check_version, check_step_name, check_schedule_name, check_queue_name]
KEY_CHECKS = [check_idempotency_key, check_topic]


async def _echo(value: Any) -> Any:
    return value


@workflow(version="1")
async def plain(input: Any, step: Any) -> Any:
    """The bystander: after every bad input, a normal run still completes."""
    return await step.define("echo", _echo).run(input)


async def assert_others_unaffected(manager: Any) -> None:
    """Listing, reading and a fresh run all still work."""
    handle = await manager.run(plain, {"ok": True})
    assert await handle.result(timeout=15) == {"ok": True}
    page = await manager.list_runs(limit=1000)
    assert handle.id in [run.id for run in page.items]
    for run in page.items:
        await manager.get_run(run.id, with_steps=True)


# durations


@pytest.mark.parametrize("value", ["9000y", "99999999999y", "1e300s", 1e300, 10**400, float("inf"), timedelta.max])
def test_a_duration_beyond_100_years_is_refused_by_name_never_with_overflow(value: Any) -> None:
    with pytest.raises(InvalidDuration, match=r"^start_at: .*(100 years|not a duration)") as refused:
        parse_duration(value, what="start_at")
    assert isinstance(refused.value, NonRetryableError)  # in a workflow: fails the run, no retries


def test_durations_up_to_100_years_are_accepted() -> None:
    assert parse_duration("100y") == timedelta(days=36500)
    assert parse_duration(timedelta(days=36500)) == timedelta(days=36500)
    assert parse_duration(0) == timedelta(0)


def test_times_are_aware_and_at_most_100_years_ahead() -> None:
    now = datetime.now(UTC)
    assert check_time(now + timedelta(days=36000), field="start_at") == now + timedelta(days=36000)
    assert check_time(datetime(2001, 1, 1, tzinfo=UTC), field="deadline")  # the past: "already late"
    for bad in (datetime(9000, 1, 1, tzinfo=UTC), datetime.max.replace(tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC)):
        with pytest.raises(InvalidValue, match=r"start_at .* out of range"):
            check_time(bad, field="start_at")
    with pytest.raises(InvalidValue, match="timezone-aware"):
        check_time(datetime(2030, 1, 1), field="deadline")


# names and keys


@pytest.mark.parametrize("check", NAME_CHECKS + KEY_CHECKS)
def test_names_and_keys_refuse_blank_long_and_unstorable_values_naming_the_field(check: Any) -> None:
    limit = MAX_KEY_LENGTH if check in KEY_CHECKS else MAX_NAME_LENGTH
    assert check("x" * limit) == "x" * limit
    for good in ("charge[3]", "load-order", "주문 1", "emoji 🎉", "a.b/c:d@e"):
        assert check(good) == good
    for bad in ("", "   ", "x" * (limit + 1), "a\x00b", "line\nbreak", "tab\t", "\ud800", "\x7f", 7, None, b"bytes"):
        with pytest.raises(InvalidName) as refused:
            check(bad)
        assert refused.value.field and refused.value.field in str(refused.value)
        assert isinstance(refused.value, ValueError)
        assert len(str(refused.value)) < 400  # a 100 kB value is quoted, not copied


def test_workflow_names_and_versions_are_checked_at_definition() -> None:
    async def fn(input: Any) -> None: ...

    with pytest.raises(WorkflowDefinitionError, match="workflow name is 201 characters long"):
        workflow(fn, version="1", name="w" * 201)
    with pytest.raises(WorkflowDefinitionError, match="workflow version holds the character '\\\\x00'"):
        workflow(fn, version="1\x00")
    with pytest.raises(WorkflowDefinitionError, match="schedule name"):
        workflow(fn, version="1", schedules=[Schedule("0 9 * * *", name="s\n")])
    with pytest.raises(WorkflowDefinitionError, match="give it a shorter name"):
        workflow(fn, version="1", name="w" * 195, schedules=["0 9 * * *"])


# cron and retry policies at definition


@pytest.mark.parametrize("expression", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *"])
def test_a_cron_expression_that_never_fires_is_refused_at_definition_naming_it(expression: str) -> None:
    async def fn() -> None: ...

    with pytest.raises(WorkflowDefinitionError, match=re.escape(f"'{expression}' never fires")):
        workflow(fn, version="1", schedules=[expression])


def test_a_rare_but_real_cron_expression_is_accepted() -> None:
    async def fn() -> None: ...

    assert workflow(fn, version="1", schedules=["0 0 29 2 *"]).schedules[0].expression == "0 0 29 2 *"


def test_schedule_static_input_must_be_storable_at_definition() -> None:
    async def fn() -> None: ...

    with pytest.raises(WorkflowDefinitionError, match=r"input of schedule .* NUL"):
        workflow(fn, version="1", schedules=[{"expression": "0 9 * * *", "input": {"a": "\x00"}}])


def test_the_seeds_plain_dict_retry_policy_is_accepted() -> None:
    async def fn() -> None: ...

    definition = workflow(fn, version="1", retry_policy={"max_attempts": 3, "initial_interval_ms": 500})
    assert definition.retry_policy == RetryPolicy(max_attempts=3, initial_interval_ms=500)
    with pytest.raises(WorkflowDefinitionError, match=r"unknown field.*'max_retries'"):
        workflow(fn, version="1", retry_policy={"max_retries": 3})
    with pytest.raises(WorkflowDefinitionError, match="max_attempts must be at least 1"):
        workflow(fn, version="1", retry_policy={"max_attempts": 0})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"max_attempts": 2.5}, "max_attempts must be an int"),
        ({"initial_interval_ms": -1}, "initial_interval_ms must be a finite number >= 0"),
        ({"initial_interval_ms": float("nan")}, "initial_interval_ms must be a finite number"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient must be a finite number >= 1"),
        ({"jitter": 1.5}, "jitter must be a fraction from 0 to 1"),
        ({"jitter": -0.1}, "jitter must be a finite number >= 0"),
        ({"jitter": float("nan")}, "jitter must be a finite number"),
        ({"jitter": True}, "jitter must be a number"),
        ({"maximum_interval_ms": float("inf")}, "maximum_interval_ms must be a finite number"),
        ({"initial_interval_ms": "1s"}, "initial_interval_ms must be a number"),
    ],
)
def test_retry_policy_fields_are_validated_with_the_field_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        RetryPolicy(**fields)


def test_a_retry_delay_is_capped_at_100_years_never_overflowing() -> None:
    unbounded = RetryPolicy(max_attempts=10_000, backoff_coefficient=10, maximum_interval_ms=None)
    assert unbounded.decide(RuntimeError(), 5_000).delay_ms == 100 * 365 * 86_400_000
    huge = RetryPolicy(max_attempts=5, should_retry=lambda error, attempt: RetryDecision(True, 10**400))
    assert huge.decide(RuntimeError(), 1).delay_ms == 100 * 365 * 86_400_000


# stored values


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("a\x00b", r"the string at \$ "),
        ({"order": {"note": "x\x00"}}, r'the string at \$\["order"\]\["note"\]'),
        ([1, {"k\x00": 2}], r"a key at \$\[1\]"),
        ({"text": "lone \udc80 surrogate"}, r'the string at \$\["text"\] .* lone surrogate'),
    ],
)
def test_values_postgres_cannot_store_are_refused_on_every_backend_naming_where(value: Any, where: str) -> None:
    with pytest.raises(SerializationError, match=rf"^the result of step 'load' cannot be stored: {where}"):
        dumps(value, what="the result of step 'load'")


def test_text_that_only_looks_like_an_escape_and_characters_beyond_the_bmp_are_stored() -> None:
    for value in ["\\u0000", "\\ud800", "C:\\\\udata", "🎉 party", {"😀": ["ok", "\\\\u0000"]}, "é\u2028"]:
        assert loads(dumps(value, what="v")) == value


def test_a_pydantic_model_is_stored_by_alias_so_it_validates_back() -> None:
    class Order(pydantic.BaseModel):
        order_id: int = pydantic.Field(alias="orderId")

    stored = loads(dumps(Order(orderId=7), what="the input"))
    assert stored == {"orderId": 7}
    assert Order.model_validate(stored) == Order(orderId=7)


def test_an_error_is_always_storable_replaced_and_cut_with_a_marker() -> None:
    class Odd(Exception):
        pass

    stored = encode_error(Odd("bad\x00value \udc80" + "x" * 20_000), step="charge")
    assert stored["type"] == "test_an_error_is_always_storable_replaced_and_cut_with_a_marker.<locals>.Odd"
    assert stored["message"].startswith("bad\\x00value \\udc80xxx")
    assert len(stored["message"]) == MAX_ERROR_MESSAGE_LENGTH and "characters cut" in stored["message"]
    assert stored["step"] == "charge"
    dumps(stored, what="the error")  # no SerializationError: storable on PostgreSQL too
    assert json.loads(json.dumps(stored)) == stored


def test_an_error_whose_message_cannot_be_read_is_still_recorded() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    stored = encode_error(Broken())
    assert stored["message"] == "<the error's message could not be read: RuntimeError>"
    assert "Broken" in stored["traceback"]


def test_a_long_traceback_keeps_its_end_where_the_error_is_named() -> None:
    def recurse(depth: int) -> None:
        if depth == 0:
            raise ValueError("the bottom\x00")
        recurse(depth - 1)

    try:
        recurse(900)
    except ValueError as error:
        stored = encode_error(error)
    assert len(stored["traceback"]) <= MAX_ERROR_TRACEBACK_LENGTH
    assert stored["traceback"].rstrip().endswith("ValueError: the bottom\\x00")
    assert stored["traceback"].startswith("Traceback (most recent call last)")
    assert storable_text("abc", 10) == "abc"


@pytest.mark.parametrize(
    ("loader", "data", "expected"),
    [
        ("text", b"12026-01-01 00:00:00+00", READABLE_TIMES[1]),
        ("text", b"infinity", READABLE_TIMES[1]),
        ("text", b"-infinity", READABLE_TIMES[0]),
        ("text", b"0044-03-15 00:00:00+00 BC", READABLE_TIMES[0]),
        ("text", b"2026-12-01 09:00:00+00", datetime(2026, 12, 1, 9, tzinfo=UTC)),
        ("binary", (2**62).to_bytes(8, "big", signed=True), READABLE_TIMES[1]),
        ("binary", (-(2**62)).to_bytes(8, "big", signed=True), READABLE_TIMES[0]),
        ("binary", (0).to_bytes(8, "big", signed=True), datetime(2000, 1, 1, tzinfo=UTC)),
    ],
)
def test_the_postgres_loader_clamps_times_python_cannot_hold(loader: str, data: bytes, expected: datetime) -> None:
    from sonamu_tasks.backends.postgres import types

    oid = psycopg.adapters.types["timestamptz"].oid
    load = (types._ClampedTimestamptzTextLoader if loader == "text" else types._ClampedTimestamptzBinaryLoader)(oid)
    assert load.load(data) == expected


# in the engine, on every backend


async def test_a_far_future_start_is_refused_at_run_and_nothing_is_stored(manager_for: Any) -> None:
    manager = await manager_for([plain])
    for start_at in ("9000y", "99999999999y", 1e300, datetime(9000, 1, 1, tzinfo=UTC)):
        with pytest.raises(InvalidValue, match="start_at"):
            await manager.run(plain, {}, start_at=start_at)
    with pytest.raises(InvalidValue, match="deadline"):
        await manager.run(plain, {}, deadline="200y")
    assert (await manager.list_runs()).items == []
    far = await manager.run(plain, {}, start_at="100y")  # the limit itself is fine, and lists
    assert (await far.info()).available_at > datetime.now(UTC) + timedelta(days=36000)
    await assert_others_unaffected(manager)


async def test_a_far_future_sleep_fails_its_run_at_once_and_nothing_else(manager_for: Any) -> None:
    @workflow(version="1", retry_policy=FAST_RETRY)
    async def sleeps_forever(step: Any) -> None:
        await step.sleep("nap", "9000y")

    manager = await manager_for([sleeps_forever, plain])
    handle = await manager.run(sleeps_forever)
    with pytest.raises(WorkflowFailed, match=r"step.sleep\('nap'\).*longer than the limit of 100 years"):
        await handle.result(timeout=15)
    assert (await handle.info()).attempts == 1  # not retried: it would fail the same way
    await assert_others_unaffected(manager)


async def test_a_stored_time_beyond_the_year_9999_still_reads_and_lists(
    manager_for: Any, backend_name: str, database_url: str, schema: str
) -> None:
    """A database written before these checks may hold such a time: one row must not break every reader."""
    manager = await manager_for([plain])
    parked = await manager.run(plain, {}, start_at="1h")
    if backend_name == "postgres":
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{schema}".runs SET available_at = %s::timestamptz, deadline_at = %s::timestamptz '
                "WHERE id = %s",
                ["12026-01-01 00:00:00+00", "infinity", parked.id],
            )
    else:
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.execute("UPDATE runs SET available_at = ?, deadline_at = ? WHERE id = ?", [2**62, -(2**62), parked.id])
    record = await manager.get_run(parked.id)
    assert record.available_at == READABLE_TIMES[1]
    assert record.deadline_at in READABLE_TIMES
    assert parked.id in [run.id for run in (await manager.list_runs()).items]
    await manager.cancel(parked.id)
    assert (await manager.get_run(parked.id)).status is RunStatus.CANCELED
    await assert_others_unaffected(manager)


async def test_a_step_result_holding_nul_fails_its_run_naming_the_step_and_keeps_earlier_checkpoints(
    manager_for: Any,
) -> None:
    async def nul() -> str:
        return "a\x00b"

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def returns_nul(step: Any) -> None:
        await step.define("fine", _echo).run("kept")
        await step.define("nul", nul).run()

    manager = await manager_for([returns_nul, plain])
    handle = await manager.run(returns_nul)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    assert failure.value.error["type"] == "SerializationError"
    assert failure.value.error["step"] == "nul"
    assert "the result of step 'nul'" in failure.value.error["message"]
    assert "NUL" in failure.value.error["message"]
    run = await handle.info(with_steps=True)
    assert run.attempts == 1
    assert [(s.name, s.status, s.output) for s in run.steps if s.status is StepStatus.COMPLETED] == [
        ("fine", StepStatus.COMPLETED, "kept")
    ]
    await assert_others_unaffected(manager)


@pytest.mark.parametrize("name", ["s" * 10_000, "lone \udc80", "nul\x00", "", "line\nbreak"])
async def test_an_unstorable_step_name_fails_its_run_at_once_naming_it(manager_for: Any, name: str) -> None:
    @workflow(version="1", retry_policy=FAST_RETRY)
    async def badly_named(step: Any) -> None:
        await step.define(name, _echo).run(1)

    manager = await manager_for([badly_named, plain])
    handle = await manager.run(badly_named)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    assert failure.value.error["type"] == "InvalidName"
    assert failure.value.error["message"].startswith("step name ")
    assert (await handle.info()).attempts == 1
    await assert_others_unaffected(manager)


async def test_huge_or_unstorable_names_and_keys_are_refused_at_run_quickly(manager_for: Any) -> None:
    manager = await manager_for([plain])
    started = time.monotonic()
    with pytest.raises(InvalidName, match="idempotency_key is 100,000 characters long; the limit is 255"):
        await manager.run(plain, {}, idempotency_key="k" * 100_000)
    with pytest.raises(InvalidName, match="idempotency_key holds the character"):
        await manager.run(plain, {}, idempotency_key="order\x00-7")
    with pytest.raises(InvalidName, match="workflow name is 10,000 characters long"):
        await manager.run({"name": "w" * 10_000, "version": "1"}, {})
    with pytest.raises(InvalidName, match="workflow version"):
        await manager.run({"name": "plain", "version": "1\udc80"}, {})
    with pytest.raises(SerializationError, match="the input of workflow 'plain' cannot be stored"):
        await manager.run(plain, {"note": "a\x00b"})
    assert time.monotonic() - started < 2  # refused before the database, not retried as an outage
    assert (await manager.list_runs()).items == []
    await assert_others_unaffected(manager)


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"parent_id": 5}, "parent_id"),
        ({"parent_id": "not-a-uuid"}, "parent_id"),
        ({"cursor": 5}, "cursor"),
        ({"cursor": "not-a-uuid"}, "cursor"),
        ({"workflow": ["plain"]}, "workflow"),
        ({"version": 1}, "version"),
        ({"queue": "a\x00b"}, "queue"),
        ({"status": 5}, "status"),
        ({"status": ["done"]}, "status"),
        ({"created_after": "2024-01-01"}, "created_after"),
        ({"created_before": datetime(2024, 1, 1)}, "created_before"),
        ({"limit": "50"}, "limit"),
        ({"limit": 0}, "limit"),
    ],
)
async def test_a_bad_list_runs_filter_is_refused_naming_it(
    manager_for: Any, filters: dict[str, Any], field: str
) -> None:
    manager = await manager_for([plain])
    with pytest.raises(InvalidValue, match=f"^list_runs {field}") as refused:
        await manager.list_runs(**filters)
    assert refused.value.field == field
    await assert_others_unaffected(manager)


async def test_an_error_message_holding_nul_is_recorded_and_the_run_fails_normally(manager_for: Any) -> None:
    async def explode() -> None:
        raise ValueError("card\x00declined \udc80" + "!" * 50_000)

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def fails_oddly(step: Any) -> None:
        await step.define("charge", explode).run()

    manager = await manager_for([fails_oddly, plain])
    handle = await manager.run(fails_oddly)
    with pytest.raises(WorkflowFailed) as failure:
        await handle.result(timeout=15)
    error = failure.value.error
    assert error["type"] == "ValueError" and error["step"] == "charge"
    assert error["message"].startswith("card\\x00declined \\udc80!!!")
    assert len(error["message"]) == MAX_ERROR_MESSAGE_LENGTH
    run = await handle.info()
    assert (run.status, run.attempts, run.recoveries) == (RunStatus.FAILED, 2, 0)  # retried, not taken over
    await assert_others_unaffected(manager)


async def test_a_run_failing_on_a_bad_value_does_not_hold_up_the_worker(manager_for: Any) -> None:
    """Several bad runs at once, then good ones: every good one completes, every bad one fails once."""

    async def nul() -> str:
        return "\x00"

    @workflow(version="1", retry_policy=FAST_RETRY)
    async def bad(step: Any) -> None:
        await step.define("nul", nul).run()

    manager = await manager_for([bad, plain])
    bad_runs = [await manager.run(bad) for _ in range(5)]
    good_runs = [await manager.run(plain, i) for i in range(5)]
    assert [await handle.result(timeout=15) for handle in good_runs] == list(range(5))

    async def all_failed() -> bool:
        statuses = [await handle.status() for handle in bad_runs]
        return all(status is RunStatus.FAILED for status in statuses)

    await wait_until(all_failed, what="the bad runs to fail")
