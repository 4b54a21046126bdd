"""Making a run: validate the input, serialize it, and describe the row to insert.

Every way a run comes to be goes through `prepare_run`: `WorkflowManager.run`, a cron fire, and a child
started by a workflow step. So a run is validated and stored the same way wherever it starts, and the
checks on names, keys and times live in one place.

The input is validated here (a bad input is refused before anything is stored) and stored as given, not
as validated: the worker validates the stored input again before each attempt, so the workflow receives
exactly what the schema makes of the caller's value, once (an alias, a normalizing validator or a
callable schema that reshapes the input all see the caller's value, never their own output).
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias, overload

from typing_extensions import TypeVar

from . import limits, serde
from .backends.base import NewRun
from .definition import WorkflowDefinition
from .duration import Duration, parse_duration
from .errors import InvalidInput, InvalidValue, WorkflowNotRegistered
from .ids import new_run_id, new_run_ids
from .queue import Queue, check_priority, queue_name
from .registry import Registry

R = TypeVar("R", default=Any)

WorkflowSpec: TypeAlias = Mapping[str, Any] | WorkflowDefinition[Any, R] | str
"""What `run()` accepts: `{"name": ..., "version": ...}`, a definition, or a registered name. `R`: what the
workflow returns (typed only for a definition; Any for the others)."""


@dataclass(frozen=True)
class RunOptions:
    """The run options of `run()` (see `WorkflowManager.run`)."""

    idempotency_key: str | None = None
    start_at: datetime | Duration | None = None
    deadline: datetime | Duration | None = None
    queue: Queue | str | None = None
    priority: int = 0
    concurrency_key: str | None = None
    debounce: Duration | None = None
    debounce_key: str | None = None


def resolve(workflow: WorkflowSpec, registry: Registry) -> tuple[str, str, WorkflowDefinition[Any, Any] | None]:
    """(name, version, the definition when this process knows it) of what `run()` was given."""
    if isinstance(workflow, WorkflowDefinition):
        return workflow.name, workflow.version, registry.find(*workflow.key) or workflow
    if isinstance(workflow, str):
        workflow = {"name": workflow}
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("name"), str):
        raise TypeError(f"run() needs a workflow definition or {{'name': ..., 'version': ...}}, got {workflow!r}")
    name = workflow["name"]
    version = workflow.get("version")
    if version is None:
        versions = [v for n, v in registry.keys() if n == name]
        if len(versions) != 1:
            raise WorkflowNotRegistered(
                f"run({name!r}) needs a version: "
                + (
                    f"registered versions here are {', '.join(versions)}"
                    if versions
                    else "the workflow is not registered in this process, so say which version to run"
                )
            )
        version = versions[0]
    return name, str(version), registry.find(name, str(version))


def prepare_run(
    name: str,
    version: str,
    definition: WorkflowDefinition[Any, Any] | None,
    input: Any,
    options: RunOptions = RunOptions(),
    *,
    run_id: str | None = None,
    parent_id: str | None = None,
    parent_step: str | None = None,
    detached: bool = False,
    what: str | None = None,
    trace_context: str | None = None,
) -> NewRun:
    """Validate and serialize; raise (InvalidInput, SerializationError, ValueError ...) before anything is
    stored. `what` names the input in errors (default: "the input of workflow NAME")."""
    # Names, key and times first: a value the database cannot hold is refused here, by name, instead of
    # failing inside the database where it looks like an outage (see limits).
    limits.check_workflow_name(name)
    limits.check_version(version)
    if options.idempotency_key is not None:
        limits.check_idempotency_key(options.idempotency_key)
    start_at, deadline = options.start_at, options.deadline
    for moment, field in ((start_at, "start_at"), (deadline, "deadline")):
        if isinstance(moment, datetime):
            limits.check_time(moment, field=field)
    queue = queue_name(options.queue)
    if queue is None and definition is not None:
        queue = definition.queue_name  # else the database finds the queue the workflow registered
    check_priority(options.priority)
    if options.concurrency_key is not None:
        _check_concurrency_key(options.concurrency_key)
    debounce = _debounce(options)
    start_delay = (
        None if start_at is None or isinstance(start_at, datetime) else parse_duration(start_at, what="start_at")
    )
    deadline_delay = (
        None if deadline is None or isinstance(deadline, datetime) else parse_duration(deadline, what="deadline")
    )
    if start_at is not None and deadline is not None:
        _check_starts_before_deadline(start_at, start_delay, deadline, deadline_delay)
    return NewRun(
        id=run_id or new_run_id(),
        workflow_name=name,
        version=version,
        input_json=_input_json(definition, input, what or f"the input of workflow {name!r}"),
        idempotency_key=options.idempotency_key,
        start_at=start_at if isinstance(start_at, datetime) else None,
        start_delay=start_delay,
        deadline_at=deadline if isinstance(deadline, datetime) else None,
        deadline_delay=deadline_delay,
        parent_id=parent_id,
        parent_step=parent_step,
        detached=detached,
        trace_context=trace_context,
        queue=queue,
        priority=options.priority,
        concurrency_key=options.concurrency_key,
        debounce_key=options.debounce_key if debounce is not None else None,
        debounce=debounce,
    )


_OWN_FIELDS = ("idempotency_key", "concurrency_key")  # what each input of a run_many has of its own, besides itself


class RunBatch(Sequence[NewRun]):
    """The runs of one run_many: `prepare_run` for each input, its keys from `idempotency_keys` and
    `concurrency_keys` (one per input; `options`' own are ignored), the rest of `options` shared.

    Prepared as they are read, in order, and kept once prepared (a call repeated after a lost answer sends the
    same ids). So a backend can send the first runs while later ones are still prepared: PostgreSQL streams a
    large batch into one COPY. Reading a bad item raises its error, named "inputs[INDEX]: ...", `what(index)`
    the input in serialization errors; a backend stores the batch in one transaction, so then nothing of it.

    The first item is prepared at once, by `prepare_run` whole: it checks what every item shares (names, times,
    queue, priority) exactly as a lone run() would, before anything is sent. The others check only what is
    their own (keys and input) and take the first's other fields."""

    _CHUNK = 256  # items prepared per step of the iteration (a loop of the quick path, not one call per item)

    def __init__(
        self,
        name: str,
        version: str,
        definition: WorkflowDefinition[Any, Any] | None,
        inputs: Sequence[Any],
        options: RunOptions,
        idempotency_keys: Sequence[str | None],
        concurrency_keys: Sequence[str | None],
        *,
        what: Callable[[int], str],
        trace_context: str | None = None,
    ) -> None:
        self._name, self._definition, self._what = name, definition, what
        self._inputs, self._keys, self._concurrency_keys = inputs, idempotency_keys, concurrency_keys
        self.keyed = any(key is not None for key in idempotency_keys)
        """Whether any run has an idempotency key (else every run differs from the first only by its id, input
        and concurrency key)."""
        self._runs: list[NewRun] = []
        self._ids: list[str] = []
        if not inputs:
            return
        own = dataclasses.replace(options, idempotency_key=idempotency_keys[0], concurrency_key=concurrency_keys[0])
        try:
            self._runs.append(
                prepare_run(name, version, definition, inputs[0], own, what=what(0), trace_context=trace_context)
            )
        except (InvalidInput, InvalidValue) as error:
            if isinstance(error, InvalidValue) and error.field not in _OWN_FIELDS:
                raise  # about the call's options (a name, a time, the priority...), not its first input
            raise _named(error, 0, name) from error
        self._ids = new_run_ids(len(inputs) - 1)

    def __len__(self) -> int:
        return len(self._inputs)

    def prepare_all(self) -> None:
        """Prepare every run not yet prepared (raising for the first bad one)."""
        self._prepare_until(len(self))

    @overload
    def __getitem__(self, index: int) -> NewRun: ...

    @overload
    def __getitem__(self, index: slice) -> list[NewRun]: ...

    def __getitem__(self, index: int | slice) -> NewRun | list[NewRun]:
        self._prepare_until(index + 1 if isinstance(index, int) and index >= 0 else len(self))
        if isinstance(index, int) and index >= len(self):
            raise IndexError(f"run {index} of a batch of {len(self)}")
        return self._runs[index]

    def __iter__(self) -> Iterator[NewRun]:
        index = 0
        while index < len(self._inputs):
            if index == len(self._runs):
                self._prepare_until(index + self._CHUNK)
            yield self._runs[index]
            index += 1

    def _prepare_until(self, stop: int) -> None:
        """Prepare the items up to `stop` (exclusive) not yet prepared."""
        if not self._runs:  # an empty batch: nothing to prepare
            return
        runs, first = self._runs, self._runs[0]
        definition, what, ids = self._definition, self._what, self._ids
        index = len(runs)
        try:  # one try for the loop, not one context manager per item: a third of the loop's time at 10,000 items
            for index in range(len(runs), min(stop, len(self._inputs))):
                key, concurrency_key = self._keys[index], self._concurrency_keys[index]
                if key is not None:
                    limits.check_idempotency_key(key)
                if concurrency_key is not None:
                    _check_concurrency_key(concurrency_key)
                input_json = _input_json(definition, self._inputs[index], what(index))
                runs.append(_sibling(first, ids[index - 1], input_json, key, concurrency_key))
        except (InvalidInput, InvalidValue) as error:
            raise _named(error, index, self._name) from error


def _sibling(first: NewRun, run_id: str, input_json: str, key: str | None, concurrency_key: str | None) -> NewRun:
    """Another run of the same run_many: the first's fields, but its own id, input and keys. (Made field by
    field: three times quicker than dataclasses.replace. The property test of RunBatch in
    tests/test_run_many.py compares every field with prepare_run's, so a field left out here shows there.)"""
    return NewRun(
        id=run_id,
        workflow_name=first.workflow_name,
        version=first.version,
        input_json=input_json,
        idempotency_key=key,
        start_at=first.start_at,
        start_delay=first.start_delay,
        deadline_at=first.deadline_at,
        deadline_delay=first.deadline_delay,
        parent_id=first.parent_id,
        parent_step=first.parent_step,
        detached=first.detached,
        trace_context=first.trace_context,
        queue=first.queue,
        priority=first.priority,
        concurrency_key=concurrency_key,
        debounce_key=first.debounce_key,
        debounce=first.debounce,
    )


def _named(error: InvalidInput | InvalidValue, index: int, workflow: str) -> InvalidInput | InvalidValue:
    """`error` raised for item `index`, named: in an InvalidInput's problems, or an InvalidValue's message."""
    if isinstance(error, InvalidInput):
        return InvalidInput(workflow, [f"inputs[{index}]: {problem}" for problem in error.problems])
    return type(error)(f"inputs[{index}]: {error}", field=error.field)


def _input_json(definition: WorkflowDefinition[Any, Any] | None, input: Any, what: str) -> str:
    if definition is not None:
        definition.validate_input(input)  # refuse a bad input now; the worker builds the value itself
    return serde.dumps(input, what=what)


def _check_starts_before_deadline(
    start_at: datetime | Duration,
    start_delay: timedelta | None,
    deadline: datetime | Duration,
    deadline_delay: timedelta | None,
) -> None:
    """A run whose start is not before its deadline could only fail with "deadline exceeded" when it starts:
    refused at run(), naming both. Two durations (or two datetimes) are compared as they are; a datetime and a
    duration through this process's clock."""
    now = datetime.now(UTC)
    starts = start_at if isinstance(start_at, datetime) else now + (start_delay or timedelta(0))
    ends = deadline if isinstance(deadline, datetime) else now + (deadline_delay or timedelta(0))
    if starts >= ends:
        raise InvalidValue(
            f"start_at ({_moment_text(start_at)}) is not before deadline ({_moment_text(deadline)}): the run would "
            "fail with 'deadline exceeded' as it starts; start it earlier or give a later deadline",
            field="start_at",
        )


def _moment_text(moment: datetime | Duration) -> str:
    return moment.isoformat() if isinstance(moment, datetime) else str(moment)


def _check_concurrency_key(key: str) -> None:
    limits.check_name(key, field="concurrency_key", limit=limits.MAX_KEY_LENGTH)


def _debounce(options: RunOptions) -> timedelta | None:
    """`debounce` with its `debounce_key`: both or neither, and not with a start time or idempotency key (a
    debounced run starts when its window ends, and the key already makes repeated calls one run)."""
    if options.debounce is None and options.debounce_key is None:
        return None
    if options.debounce is None or options.debounce_key is None:
        missing = "debounce_key" if options.debounce_key is None else "debounce"
        raise InvalidValue(f"debounce and debounce_key go together: {missing} is missing", field=missing)
    limits.check_name(options.debounce_key, field="debounce_key", limit=limits.MAX_KEY_LENGTH)
    for field, value in (("start_at", options.start_at), ("idempotency_key", options.idempotency_key)):
        if value is not None:
            raise InvalidValue(f"debounce cannot be combined with {field}", field=field)
    window = parse_duration(options.debounce, what="debounce")
    if not window:
        raise InvalidValue("debounce must be longer than 0", field="debounce")
    return window


def child_run_id(parent_id: str, step_name: str) -> str:
    """The id of the child a parent starts in step `step_name`: the same on every replay and take-over, so
    starting it again finds it instead of making a second one. The parent's time prefix keeps ids sorting by
    time (a child lists beside its parent); the rest is a hash of (parent, step)."""
    parent = uuid.UUID(parent_id).int
    digest = int.from_bytes(hashlib.sha256(f"{parent_id}/{step_name}".encode()).digest()[:10], "big")
    value = (parent >> 80) << 80 | digest
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8: custom (RFC 9562)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))
