"""The `step` a workflow receives (the seed's StepWrapper): define / get / sleep / map, and child workflows.

The checkpoint logic lives in `attempt.Attempt`; this module is the user-facing surface.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeAlias, TypeVar, cast, overload

from typing_extensions import TypeVar as DefaultedTypeVar

from .definition import WorkflowDefinition, underscore_case
from .duration import Duration, parse_duration
from .errors import InvalidValue
from .handle import R_co, RunHandle
from .limits import shown
from .queue import Queue
from .retry import RetryPolicy, coerce_retry_policy
from .run_creation import RunOptions, resolve

if TYPE_CHECKING:
    from .attempt import Attempt

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

W = DefaultedTypeVar("W", default=Any)
"""What a child's workflow returns (Any for a child named by a mapping)."""

ChildWorkflow: TypeAlias = WorkflowDefinition[Any, W] | Mapping[str, Any]
"""A child to start: a definition, or `{"name": ..., "version": ...}` (a workflow another fleet runs)."""


@dataclass(frozen=True)
class StepOptions:
    """A step's own retry policy (instead of the workflow's) and its timeout per execution."""

    retry_policy: RetryPolicy | None = None
    timeout: timedelta | None = None

    @classmethod
    def of(
        cls, step_name: str, retry_policy: RetryPolicy | Mapping[str, Any] | None, timeout: Duration | None
    ) -> StepOptions:
        what = f"the timeout of step {step_name!r}"
        limit = None if timeout is None else parse_duration(timeout, what=what)
        if limit is not None and limit <= timedelta(0):
            # Every execution would time out before it began (and a sync step's thread would run on anyway).
            raise InvalidValue(f"{what} must be more than 0, got {timeout!r}", field="timeout")
        return cls(
            coerce_retry_policy(retry_policy, what=f"the retry_policy of step {step_name!r}", error=InvalidValue),
            limit,
        )


NO_OPTIONS = StepOptions()


class Step(Generic[P, R]):
    """A named step; `await step.run(*args, **kwargs)` executes it once per run and checkpoints the result.

    Typed as its function: `run` takes the function's parameters and gives what it returns (awaited, for an
    async function): `step.define("load", load)` with `async def load(order_id: int) -> Order` is a
    `Step[[int], Order]`."""

    def __init__(self, attempt: Attempt, name: str, fn: Callable[P, Any], options: StepOptions = NO_OPTIONS) -> None:
        self.name = name
        self.fn = fn
        self.options = options
        self._attempt = attempt

    async def run(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._attempt.run_step(self.name, self.fn, args, kwargs, self.options)  # type: ignore[no-any-return]


class StepWrapper:
    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt

    # An async function's step gives what its coroutine returns; a sync function's, what it returns.
    @overload
    def define(
        self,
        name: str | Mapping[str, Any],
        fn: Callable[P, Awaitable[R]],
        retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
    ) -> Step[P, R]: ...

    @overload
    def define(
        self,
        name: str | Mapping[str, Any],
        fn: Callable[P, R],
        retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
    ) -> Step[P, R]: ...

    def define(
        self,
        name: str | Mapping[str, Any],
        fn: Callable[..., Any],
        retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
    ) -> Step[..., Any]:
        """`step.define("load-order", load_order)`; the seed's `{"name": ...}` form is accepted too.

        `retry_policy`: this step's own policy, instead of the workflow's, when it raises. `timeout`: how long
        one execution may take; past it the step fails with StepTimeout (an async step is cancelled, a sync
        step's late result is discarded)."""
        step_name = _step_name(name["name"] if isinstance(name, Mapping) else name)
        if not callable(fn):
            raise TypeError(f"step.define({step_name!r}, fn): fn must be callable, got {type(fn).__name__}")
        return Step(self._attempt, step_name, fn, _options(step_name, retry_policy, timeout))

    def get(
        self,
        obj: Any,
        method_name: str,
        name: str | None = None,
        *,
        retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
    ) -> Step[..., Any]:
        """Wrap `obj.method_name` (class or instance); the step is named after the method unless `name`.
        Named by a string, the method is not typed: `step.define("name", obj.method)` is."""
        method = _bound_method(obj, method_name)
        step_name = _step_name(name or underscore_case(method_name))
        return Step(self._attempt, step_name, method, _options(step_name, retry_policy, timeout))

    async def sleep(self, name: str, duration: Duration) -> None:
        """Durable sleep: the run is parked in the database and holds no worker slot until it wakes."""
        await self._attempt.sleep(_step_name(name), duration)

    async def receive(self, name: str, topic: str | None = None, *, timeout: Duration | None = None) -> Any:
        """Wait durably for a message sent to this run on `topic` (`manager.send`); return the oldest one not
        consumed yet, or None after `timeout`. Taking it and checkpointing it are one transaction, so each
        message is received once. While it waits the run is `waiting` and holds no worker slot."""
        return await self._attempt.receive(_step_name(name), _topic(topic), timeout)

    async def set_event(self, key: str, value: Any) -> None:
        """Publish `value` under `key` for readers outside the run (`handle.get_event`); the latest wins."""
        from .limits import check_name

        await self._attempt.set_event(check_name(key, field="event key"), value)

    async def wait_for_event(
        self, name: str, event: str, key: str | None = None, *, timeout: Duration | None = None
    ) -> Any:
        """Wait durably for the first broadcast `event` (with `key`) emitted since this run was created
        (`manager.emit`); its payload, or None after `timeout`. An event emitted before the run reached this
        line counts; many runs may wait for one event."""
        from .limits import check_name

        event = check_name(event, field="event name")
        event_key = "" if key is None else check_name(key, field="event key", limit=255)
        return await self._attempt.wait_for_event(_step_name(name), event, event_key, timeout)

    @overload
    async def map(
        self, name: str, fn: Callable[[T], Awaitable[R]], items: Iterable[T], concurrency: int | None = None
    ) -> list[R]: ...

    @overload
    async def map(
        self, name: str, fn: Callable[[T], R], items: Iterable[T], concurrency: int | None = None
    ) -> list[R]: ...

    async def map(
        self, name: str, fn: Callable[[Any], Any], items: Iterable[Any], concurrency: int | None = None
    ) -> list[Any]:
        """Run `fn(item)` as one step per item, named `"{name}[{index}]"`, at most `concurrency` at once (all
        at once when None); return the results in item order. Completed items are never run again."""
        name = _step_name(name)
        where = f"step.map({name!r}) in workflow {self._attempt.definition.name!r}"
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise InvalidValue(
                f"{where}: concurrency must be a positive int or None, got {concurrency!r}", field="concurrency"
            )
        if not callable(fn):
            raise InvalidValue(f"{where}: fn must be callable, got {type(fn).__name__}", field="fn")
        iterator = _iterable(items, where, "items")
        limit = asyncio.Semaphore(concurrency) if concurrency is not None else None
        failed = False

        async def one(index: int, item: Any) -> Any:
            nonlocal failed
            step = Step[[Any], Any](self._attempt, _step_name(f"{name}[{index}]"), fn)
            if limit is None:
                return await step.run(item)
            async with limit:
                if failed:  # the map has failed: an item waiting for its turn does not start (gather raises)
                    return None
                try:
                    return await step.run(item)
                except BaseException:
                    failed = True
                    raise

        return list(await asyncio.gather(*(one(index, item) for index, item in enumerate(iterator))))

    async def start_workflow(
        self,
        name: str,
        workflow: ChildWorkflow[W],
        input: Any = None,
        *,
        detached: bool = False,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        deadline: datetime | Duration | None = None,
    ) -> ChildHandle[W]:
        """Start a child run in step `name`, once: its id comes from (this run, `name`), so a replay or a
        take-over finds it instead of starting another. `await handle.result()` waits for it durably.
        Canceling this run cancels the child unless `detached`. `queue`, `priority`, `concurrency_key`: as
        for `run()` (the child's own workflow queue by default); `deadline`: as for `run()`, counted from when
        the child is first started (a replay does not move it)."""
        options = RunOptions(queue=queue, priority=priority, concurrency_key=concurrency_key, deadline=deadline)
        [child] = await self._start_children(name, workflow, [input], fan_out=False, detached=detached, options=options)
        return child

    async def start_workflows(
        self,
        name: str,
        workflow: ChildWorkflow[W],
        inputs: Iterable[Any],
        *,
        detached: bool = False,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        deadline: datetime | Duration | None = None,
    ) -> list[ChildHandle[W]]:
        """Start one child per input in one statement; the children are steps `"{name}[{index}]"`."""
        options = RunOptions(queue=queue, priority=priority, concurrency_key=concurrency_key, deadline=deadline)
        return await self._start_children(name, workflow, inputs, fan_out=True, detached=detached, options=options)

    async def _start_children(
        self,
        name: str,
        workflow: ChildWorkflow[W],
        inputs: Iterable[Any],
        *,
        fan_out: bool,
        detached: bool,
        options: RunOptions,
    ) -> list[ChildHandle[W]]:
        """The children of step `name`: one (step `name`), or one per input (steps `"{name}[{index}]"`)."""
        name = _step_name(name)
        spec = self._spec(workflow)
        where = f"step.start_workflows({name!r}) in workflow {self._attempt.definition.name!r}"
        children = [(*spec, item) for item in (_iterable(inputs, where, "inputs") if fan_out else inputs)]
        if isinstance(options.queue, Queue):  # its limits must be stored to hold
            # An attempt rides out an outage (its lease decides who goes on), as its other writes do
            await self._attempt.hooks.manager.declare_queue(options.queue, give_up_after_s=None)
        ids = await self._attempt.start_children(name, children, fan_out=fan_out, detached=detached, options=options)
        steps = [f"{name}[{index}]" for index in range(len(ids))] if fan_out else [name]
        output_type = spec[2].output_type if spec[2] is not None else None
        return [
            ChildHandle(self._attempt, child_id, spec[0], step, fan_out=fan_out, output_type=output_type)
            for child_id, step in zip(ids, steps, strict=True)
        ]

    async def run_workflow(
        self,
        name: str,
        workflow: ChildWorkflow[W],
        input: Any = None,
        *,
        detached: bool = False,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        deadline: datetime | Duration | None = None,
    ) -> W:
        """`start_workflow` and wait for the child's output (ChildWorkflowFailed if it failed)."""
        child = await self.start_workflow(
            name,
            workflow,
            input,
            detached=detached,
            queue=queue,
            priority=priority,
            concurrency_key=concurrency_key,
            deadline=deadline,
        )
        return await child.result()

    def _spec(self, workflow: ChildWorkflow) -> tuple[str, str, WorkflowDefinition[Any, Any] | None]:
        return resolve(workflow, self._attempt.hooks.registry)


class ChildHandle(RunHandle[R_co]):
    """A child run started by a workflow step: a `RunHandle` whose `await result()` is a durable wait (the
    parent parks without a worker slot until the child finishes, and every replay sees the same outcome).

    The other methods (`info`, `status`, `get_event`, `send`, `cancel`, `pause`, `resume`, `retry`) act at
    once, as from outside the workflow: they are not checkpointed, so a replay calls them again. Call them
    inside a step when that matters."""

    def __init__(
        self,
        attempt: Attempt,
        run_id: str,
        workflow_name: str,
        step_name: str,
        *,
        fan_out: bool,
        output_type: Any = None,
    ) -> None:
        super().__init__(attempt.hooks.manager, run_id, workflow_name, output_type=output_type)
        self._attempt = attempt
        self.step_name = step_name
        self._fan_out = fan_out

    def __repr__(self) -> str:
        return f"<ChildHandle {self.workflow_name} {self.id} (step {self.step_name!r})>"

    async def result(self, timeout: float | None = None) -> R_co:
        """The child's output, as the type its workflow declares; raises ChildWorkflowFailed (with the child's
        error) if it failed or was canceled.

        No `timeout`: the wait is durable and lasts as long as the child does (which a `deadline` given to
        `start_workflow` can bound, as for `run()`)."""
        if timeout is not None:
            raise InvalidValue(
                f"child {self.step_name!r} of workflow {self._attempt.definition.name!r}: result() inside a workflow"
                " takes no timeout (the wait is durable: it lasts as long as the child)",
                field="timeout",
            )
        output = await self._attempt.child_result(self.step_name, self.id, self.workflow_name, fan_out=self._fan_out)
        return cast(R_co, self._decoded(output))


def _iterable(items: Any, where: str, field: str) -> Iterator[Any]:
    """`items` to iterate, or InvalidValue naming the call: the same code would give the same value again, so
    the run fails at once rather than retrying."""
    try:
        return iter(items)
    except TypeError:
        raise InvalidValue(
            f"{where}: {field} must be iterable (a list, a tuple ...), got {shown(items)}", field=field
        ) from None


def _options(
    step_name: str, retry_policy: RetryPolicy | Mapping[str, Any] | None, timeout: Duration | None
) -> StepOptions:
    if retry_policy is None and timeout is None:
        return NO_OPTIONS
    return StepOptions.of(step_name, retry_policy, timeout)


DEFAULT_TOPIC = "default"
"""The topic of a message sent or received without one."""


def _topic(topic: str | None) -> str:
    from .limits import check_topic

    return DEFAULT_TOPIC if topic is None else check_topic(topic)


def _step_name(name: Any) -> str:
    """The name, if the database can hold it: a string of 1 to 200 printable characters, not blank
    (`limits.check_step_name`). Otherwise InvalidName, a NonRetryableError naming the step, fails the run
    at once: the same code would make the same name again."""
    from .limits import check_step_name

    return check_step_name(name)


def _bound_method(obj: Any, method_name: str) -> Callable[..., Any]:
    owner = obj if isinstance(obj, type) else type(obj)
    target = obj
    raw = inspect.getattr_static(owner, method_name, None) if isinstance(obj, type) else None
    if isinstance(obj, type) and inspect.isfunction(raw):
        # A plain method asked for on the class: it needs an instance. Services and models are usually
        # stateless, so make one; a class that needs arguments must be passed as an instance.
        try:
            target = obj()
        except TypeError as error:
            raise TypeError(
                f"step.get({owner.__name__}, {method_name!r}): {method_name} is an instance method and "
                f"{owner.__name__}() cannot be built without arguments ({error}); pass an instance instead"
            ) from error
    method = getattr(target, method_name, None)
    if method is None:
        raise AttributeError(f"step.get: {owner.__name__} has no method {method_name!r}")
    if not callable(method):
        raise TypeError(f"step.get: {owner.__name__}.{method_name} is not callable")
    return method  # type: ignore[no-any-return]
