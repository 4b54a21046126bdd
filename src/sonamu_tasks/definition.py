"""`workflow()`: turn an `async def` into a versioned, registrable workflow definition."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from . import limits, serde
from .duration import Duration, parse_duration
from .errors import (
    InvalidDuration,
    InvalidInput,
    InvalidName,
    InvalidValue,
    SerializationError,
    WorkflowDefinitionError,
)
from .queue import DEFAULT_QUEUE, Queue, queue_name
from .retry import DEFAULT_RETRY_POLICY, RetryPolicy, coerce_retry_policy
from .schedule import Schedule

if TYPE_CHECKING:
    from .handle import RunHandle

P = ParamSpec("P")
R = TypeVar("R")

INJECTABLE_PARAMETERS = ("input", "step", "logger", "version", "context")
"""The names a workflow function may declare; each receives what its name says."""


class WorkflowDefinition(Generic[P, R]):
    """A workflow: its function, name, version, input schema, schedules and retry policy.

    Calling it calls the plain function (handy in unit tests); `await definition.run(input)` starts a
    durable run through the WorkflowManager that is running in this process.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str,
        version: str,
        schema: Any = None,
        schedules: Iterable[Schedule | Mapping[str, Any] | str] = (),
        retry_policy: RetryPolicy | None = None,
        retention: Duration | None = None,
        queue: Queue | str | None = None,
    ) -> None:
        self.fn = fn
        self.name = _checked(limits.check_workflow_name, name)
        self.version = _checked(limits.check_version, version)
        self.schema = schema
        self.schedules = _schedules(schedules, name)
        self.retry_policy = retry_policy or DEFAULT_RETRY_POLICY
        self.parameters = _injected_parameters(fn, name)
        self.retention = _retention(retention, name)
        """How long its finished runs are kept before workers delete them; None: the configured default."""
        self.queue: Queue | str = _queue(queue, name)
        """The queue its runs go to (a `Queue`, or the name of one declared elsewhere); "default" by default."""
        functools.update_wrapper(self, fn)

    @property
    def queue_name(self) -> str:
        return self.queue.name if isinstance(self.queue, Queue) else self.queue

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    @property
    def output_type(self) -> Any:
        """The function's return annotation, which a handle's `result()` rebuilds the output as."""
        return serde.declared_return(self.fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<workflow {self.name!r} version {self.version!r}>"

    async def run(
        self,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        start_at: datetime | Duration | None = None,
        deadline: datetime | Duration | None = None,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        debounce: Duration | None = None,
        debounce_key: str | None = None,
    ) -> RunHandle[R]:
        """Start a run through the active WorkflowManager; see `WorkflowManager.run` for the options."""
        from .manager import active_manager

        return await active_manager().run(
            self,
            input,
            idempotency_key=idempotency_key,
            start_at=start_at,
            deadline=deadline,
            queue=queue,
            priority=priority,
            concurrency_key=concurrency_key,
            debounce=debounce,
            debounce_key=debounce_key,
        )

    def validate_input(self, value: Any) -> Any:
        """Return the input as the workflow will see it, or raise InvalidInput naming the fields."""
        if self.schema is None:
            return value
        try:
            return _validator(self.schema)(value)
        except InvalidInput:
            raise
        except Exception as error:
            raise InvalidInput(self.name, serde.validation_problems(error)) from error


@overload
def workflow(
    fn: Callable[P, Awaitable[R]],
    *,
    version: str,
    name: str | None = None,
    schema: Any = None,
    schedules: Iterable[Any] = (),
    retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
    retention: Duration | None = None,
    queue: Queue | str | None = None,
) -> WorkflowDefinition[P, R]: ...


@overload
def workflow(
    fn: None = None,
    *,
    version: str,
    name: str | None = None,
    schema: Any = None,
    schedules: Iterable[Any] = (),
    retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
    retention: Duration | None = None,
    queue: Queue | str | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], WorkflowDefinition[P, R]]: ...


def workflow(
    fn: Callable[P, Awaitable[R]] | None = None,
    *,
    version: str | None = None,
    name: str | None = None,
    schema: Any = None,
    schedules: Iterable[Any] = (),
    retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
    retention: Duration | None = None,
    queue: Queue | str | None = None,
) -> WorkflowDefinition[P, R] | Callable[[Callable[P, Awaitable[R]]], WorkflowDefinition[P, R]]:
    """Declare a workflow: `@workflow(version="1")` above an `async def`, or `workflow(fn, version="1")`."""

    # The arguments are checked here, not before: with the function known, an error can name its workflow.
    def decorate(function: Callable[P, Awaitable[R]]) -> WorkflowDefinition[P, R]:
        if not inspect.iscoroutinefunction(function):
            raise WorkflowDefinitionError(
                f"workflow {getattr(function, '__name__', function)!r} must be an async def function"
            )
        workflow_name = name or underscore_case(function.__name__)
        if version is None or (isinstance(version, str) and not version.strip()):
            raise WorkflowDefinitionError(
                f'workflow {workflow_name!r} needs a version: write @workflow(version="1") '
                "(runs remember the version they started with)"
            )
        if not isinstance(version, str | int) or isinstance(version, bool):
            raise WorkflowDefinitionError(
                f"workflow {workflow_name!r} version must be a string, got {type(version).__name__}"
            )
        return WorkflowDefinition(
            function,
            name=workflow_name,
            version=str(version),
            schema=schema,
            schedules=schedules,
            retry_policy=_retry_policy(retry_policy, workflow_name),
            retention=retention,
            queue=queue,
        )

    return decorate if fn is None else decorate(fn)


def underscore_case(name: str) -> str:
    """`sendInvoice` -> `send_invoice`, `HTTPFetch` -> `http_fetch`, `load-order` stays as it is."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return name.lower()


def _injected_parameters(fn: Callable[..., Any], workflow_name: str) -> tuple[str, ...]:
    parameters = inspect.signature(fn).parameters.values()
    names = []
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise WorkflowDefinitionError(
                f"workflow {workflow_name!r}: *args/**kwargs are not supported; "
                f"name the parameters you need among {', '.join(INJECTABLE_PARAMETERS)}"
            )
        if parameter.name not in INJECTABLE_PARAMETERS:
            raise WorkflowDefinitionError(
                f"workflow {workflow_name!r} has an unknown parameter {parameter.name!r}; "
                f"a workflow function may take {', '.join(INJECTABLE_PARAMETERS)}"
            )
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise WorkflowDefinitionError(
                f"workflow {workflow_name!r}: parameter {parameter.name!r} must not be positional-only "
                "(parameters are passed by name)"
            )
        names.append(parameter.name)
    return tuple(names)


def _checked(check: Callable[[object], str], value: object) -> str:
    try:
        return check(value)
    except InvalidName as error:
        raise WorkflowDefinitionError(str(error)) from error


def _retry_policy(policy: RetryPolicy | Mapping[str, Any] | None, workflow_name: str) -> RetryPolicy | None:
    """A RetryPolicy, or the seed's plain-dict form (`{"max_attempts": 3, "initial_interval_ms": 500}`)."""
    return coerce_retry_policy(policy, what=f"workflow {workflow_name!r} retry_policy", error=WorkflowDefinitionError)


def _queue(value: Queue | str | None, workflow_name: str) -> Queue | str:
    """`queue=`: a Queue, the name of one, or None for the default queue."""
    try:
        name = queue_name(value, what=f"workflow {workflow_name!r} queue")
    except InvalidValue as error:
        raise WorkflowDefinitionError(str(error)) from None
    return value if isinstance(value, Queue) else (name or DEFAULT_QUEUE)


def _retention(value: Duration | None, workflow_name: str) -> timedelta | None:
    """`retention=`: a Duration (`"30d"`), or None for the configured default."""
    if value is None:
        return None
    try:
        return parse_duration(value, what=f"workflow {workflow_name!r} retention")
    except InvalidDuration as error:
        raise WorkflowDefinitionError(str(error)) from error


def _schedules(items: Iterable[Schedule | Mapping[str, Any] | str], workflow_name: str) -> tuple[Schedule, ...]:
    schedules = tuple(_schedule(item, workflow_name) for item in items)
    seen: set[str] = set()
    for schedule in schedules:
        name = schedule.name_for(workflow_name)
        if name in seen:
            raise WorkflowDefinitionError(
                f"workflow {workflow_name!r} declares schedule {name!r} twice; schedule names are unique: give "
                "each schedule its own name="
            )
        seen.add(name)
    return schedules


def _schedule(item: Schedule | Mapping[str, Any] | str, workflow_name: str) -> Schedule:
    if isinstance(item, Schedule):
        schedule = item
    elif isinstance(item, str):
        schedule = Schedule(item)
    elif isinstance(item, Mapping):
        try:
            schedule = Schedule(**item)  # the seed's {"expression", "name", "input"} form
        except TypeError as error:
            raise WorkflowDefinitionError(f"workflow {workflow_name!r}: schedule {dict(item)!r}: {error}") from error
    else:
        raise WorkflowDefinitionError(
            f"workflow {workflow_name!r}: a schedule must be a Schedule, a dict or a cron string, got {item!r}"
        )
    schedule.check(workflow_name)
    name = schedule.name_for(workflow_name)
    if schedule.name is None and len(name) > limits.MAX_NAME_LENGTH:
        raise WorkflowDefinitionError(
            f"workflow {workflow_name!r}: the default name of schedule {schedule.expression!r} "
            f"({len(name)} characters) is longer than {limits.MAX_NAME_LENGTH}; give it a shorter name= "
        )
    _checked(limits.check_schedule_name, name)
    if not callable(schedule.input):  # a static input is stored at start-up: refuse a bad one now
        try:
            serde.dumps(schedule.input, what=f"the input of schedule {name!r}")
        except SerializationError as error:
            raise WorkflowDefinitionError(f"workflow {workflow_name!r}: {error}") from error
    return schedule


def _validator(schema: Any) -> Callable[[Any], Any]:
    validate_python = getattr(schema, "validate_python", None)  # a pydantic TypeAdapter
    if callable(validate_python):
        return validate_python  # type: ignore[no-any-return]
    model_validate = getattr(schema, "model_validate", None)  # a pydantic model class
    if isinstance(schema, type) and callable(model_validate):
        return model_validate  # type: ignore[no-any-return]
    if callable(schema):
        return schema  # type: ignore[no-any-return]
    raise WorkflowDefinitionError(
        f"schema must be a pydantic model, a pydantic TypeAdapter or a callable, got {type(schema).__name__}"
    )
