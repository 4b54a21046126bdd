"""Declaring workflows, durations and retry policies: errors at definition time, not at run time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from sonamu_tasks import (
    InvalidDuration,
    RetryDecision,
    RetryPolicy,
    SerializationError,
    WorkflowDefinitionError,
    define_config,
    parse_duration,
    workflow,
)
from sonamu_tasks.config import ConfigError
from sonamu_tasks.definition import underscore_case
from sonamu_tasks.serde import dumps


def test_version_is_required_with_a_message_that_says_how() -> None:
    with pytest.raises(WorkflowDefinitionError, match='version="1"'):

        @workflow()  # type: ignore[call-overload]
        async def no_version(input: Any) -> None: ...


def test_name_defaults_to_underscore_case_and_both_forms_work() -> None:
    @workflow(version="1")
    async def sendInvoice(input: Any) -> None: ...

    async def cleanup(step: Any) -> None: ...

    inline = workflow(cleanup, version="2", name="cleanup_task")
    assert (sendInvoice.name, sendInvoice.version) == ("send_invoice", "1")
    assert (inline.name, inline.version) == ("cleanup_task", "2")
    assert [underscore_case(n) for n in ("HTTPFetch", "loadOrder", "load-order", "v2Items")] == [
        "http_fetch",
        "load_order",
        "load-order",
        "v2_items",
    ]


async def test_the_definition_stays_callable_as_the_plain_function() -> None:
    @workflow(version="1")
    async def add_one(input: int) -> int:
        return input + 1

    assert await add_one(input=1) == 2


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"version": "1", "retention": "forever"}, "retention"),
        ({"version": "1", "queue": 5}, "queue"),
        ({"version": "1", "retry_policy": {"max_retries": 3}}, "retry_policy"),
        ({"version": 1.5}, "version"),
        ({}, "needs a version"),
    ],
)
def test_a_bad_decorator_argument_names_the_workflow(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(WorkflowDefinitionError, match=f"workflow 'send_invoice'.*{problem}"):

        @workflow(**options)
        async def sendInvoice(input: Any) -> None: ...

    async def cleanup(step: Any) -> None: ...

    with pytest.raises(WorkflowDefinitionError, match=f"workflow 'cleanup_task'.*{problem}"):
        workflow(cleanup, name="cleanup_task", **options)


def test_unknown_parameter_names_are_refused_at_definition() -> None:
    with pytest.raises(WorkflowDefinitionError, match=r"unknown parameter 'payload'.*input, step, logger"):

        @workflow(version="1")
        async def bad(payload: Any) -> None: ...


def test_workflow_functions_must_be_async() -> None:
    def sync_flow(input: Any) -> None: ...

    with pytest.raises(WorkflowDefinitionError, match="must be an async def"):
        workflow(sync_flow, version="1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5),
        ("30m", 1800),
        ("2h", 7200),
        ("7d", 604800),
        ("1w", 604800),
        ("1y", 31536000),
    ],
)
def test_duration_strings(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_durations_accept_timedelta_and_seconds_and_refuse_nonsense() -> None:
    assert parse_duration(timedelta(minutes=1)) == timedelta(seconds=60)
    assert parse_duration(1.5) == timedelta(seconds=1.5)
    for bad in ("5 parsecs", "-1s", "", -3, True):
        with pytest.raises(InvalidDuration):
            parse_duration(bad)  # type: ignore[arg-type]


def test_static_retry_policy_backs_off_exponentially_up_to_the_maximum() -> None:
    policy = RetryPolicy(max_attempts=5, initial_interval_ms=1000, backoff_coefficient=2, maximum_interval_ms=3000)
    decisions = [policy.decide(RuntimeError(), attempt) for attempt in range(1, 6)]
    assert [d.delay_ms for d in decisions[:4]] == [1000, 2000, 3000, 3000]
    assert [d.should_retry for d in decisions] == [True, True, True, True, False]


def test_seed_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_interval_ms, policy.backoff_coefficient) == (5, 1000, 2)


def test_dynamic_policy_is_still_bounded_by_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, should_retry=lambda e, a: RetryDecision(True, a * 2000))
    assert policy.decide(RuntimeError(), 2) == RetryDecision(True, 4000)
    assert policy.decide(RuntimeError(), 3).should_retry is False


def test_values_that_are_not_json_are_refused_with_the_place_named() -> None:
    with pytest.raises(SerializationError, match=r"the result of step 'x'.*object"):
        dumps(object(), what="the result of step 'x'")
    with pytest.raises(SerializationError, match=r"a value cannot be stored as JSON: nan at \$ is not a finite"):
        dumps(float("nan"), what="a value")
    # Where in the value: the JSON path of the first part the encoder refuses.
    refused = {"order": {"lines": [1, float("inf")]}, "ok": True}
    with pytest.raises(SerializationError, match=r'inf at \$\["order"\]\["lines"\]\[1\] is not a finite number'):
        dumps(refused, what="a value")
    with pytest.raises(SerializationError, match=r'at \$\["when"\], a value of type object is not JSON'):
        dumps({"when": object()}, what="a value")
    with pytest.raises(SerializationError, match=r"a key of type tuple at \$\[0\]"):
        dumps([{(1, 2): "pair"}], what="a value")
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(SerializationError, match=r'the value at \$\["x"\]\[0\] contains itself'):
        dumps({"x": looped}, what="a value")


def test_config_rejects_unknown_options_by_name() -> None:
    with pytest.raises(ConfigError, match="concurency"):
        define_config(tasks={"worker_options": {"concurency": 4}})
    config = define_config(tasks={"enable_worker": False, "worker_options": {"concurrency": 3, "listen_delay": 0}})
    assert config.tasks.worker_options.concurrency == 3 and config.tasks.enable_worker is False


def test_environment_overrides_the_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SONAMU_TASKS_DATABASE_URL", "postgresql://env@host/db")
    assert define_config(database_url="postgresql://file@host/db").resolved_database_url() == (
        "postgresql://env@host/db"
    )
