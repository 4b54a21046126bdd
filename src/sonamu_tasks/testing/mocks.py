"""The stand-ins of `WorkflowTestEnv.mock_step`: found by the name of the step that runs, and accounted for.

A mock of `charge` stands for step `charge`, and for every item `charge[0]`, `charge[1]` ... of
`step.map("charge", ...)` that has no mock of its own. The environment remembers which mocks stood in for a
step: one that never did is most often a typo, and the environment's exit says so (`StepMocks.unused`).
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

from ..errors import NonRetryableError
from ..log import current_step

T = TypeVar("T")

_MAP_ITEM = re.compile(r"(?P<map>.*)\[\d+\]", re.DOTALL)
"""The name of an item of `step.map(name, ...)`: `name[index]`."""
_SHOWN = 20  # the steps an unused mock's message lists


class MockExhausted(NonRetryableError, AssertionError):
    """A mock's `side_effect` list ran out: the step was called more times than the list has values. It fails
    the run at once (retrying cannot bring more values)."""


class StepMocks(dict[str, Callable[..., Any]]):
    """The worker's stand-ins by step name (`Worker.step_mocks`). The attempt asks `get(step name, the step's
    function)` for each step it executes; this answers with the mock of that name, else the mock of the map
    the step is an item of, else the function, and records which mock stood in and which steps ran."""

    def __init__(self) -> None:
        super().__init__()
        self.used: set[str] = set()
        """The mocks that stood in for at least one step."""
        self.optional: set[str] = set()
        """The mocks set with `optional=True`: the test may not reach their step."""
        self.ran: dict[str, None] = {}
        """The names of the steps executed (not replayed), in order: what a typo is compared with."""

    @overload
    def get(self, name: str, default: None = None, /) -> Callable[..., Any] | None: ...
    @overload
    def get(self, name: str, default: Callable[..., Any], /) -> Callable[..., Any]: ...
    @overload
    def get(self, name: str, default: T, /) -> Callable[..., Any] | T: ...
    def get(self, name: str, default: Any = None, /) -> Any:
        self.ran[name] = None
        mock = self.mock_for(name)
        if mock is None:
            return default
        self.used.add(mock)
        return self[mock]

    def mock_for(self, step: str) -> str | None:
        """The name of the mock that stands for step `step`, if any."""
        if step in self:
            return step
        item = _MAP_ITEM.fullmatch(step)
        if item is not None and item["map"] in self:
            return item["map"]
        return None

    def put(self, name: str, stand_in: Callable[..., Any], *, optional: bool) -> None:
        self[name] = stand_in
        self.used.discard(name)
        if optional:
            self.optional.add(name)
        else:
            self.optional.discard(name)

    def remove(self, name: str) -> None:
        self.pop(name, None)
        self.used.discard(name)
        self.optional.discard(name)

    def unused(self) -> str | None:
        """What to tell of the mocks (not optional) that stood in for no step since they were set, or None."""
        names = [name for name in self if name not in self.used and name not in self.optional]
        if not names:
            return None
        steps = list(self.ran)
        ran = ", ".join(repr(step) for step in steps[:_SHOWN]) or "none"
        if len(steps) > _SHOWN:
            ran += f" and {len(steps) - _SHOWN} more"
        mocks = ", ".join(f"mock_step({name!r}){_did_you_mean(name, steps)}" for name in names)
        return (
            f"{mocks} stood in for no step: no step of that name (nor an item of a step.map of that name) "
            f"was executed. Steps executed: {ran}. A typo in the step name? If the test is not meant to reach "
            f"that step, pass mock_step(..., optional=True) or call unmock_step({names[0]!r})."
        )


def stand_in(name: str, return_value: Any, side_effect: Any) -> Callable[..., Any]:
    """The function called instead of a step's (see `WorkflowTestEnv.mock_step`)."""
    if side_effect is None:
        return lambda *args, **kwargs: return_value
    if _is_exception(side_effect):
        error = side_effect

        def raise_it(*args: Any, **kwargs: Any) -> Any:
            raise error

        return raise_it
    if callable(side_effect):
        return side_effect  # type: ignore[no-any-return]
    values: Iterator[Any] = iter(side_effect)
    lock = threading.Lock()  # sync steps run in threads: the items of a map may take values at once
    given = 0

    def next_value(*args: Any, **kwargs: Any) -> Any:
        nonlocal given
        with lock:
            try:
                value = next(values)
            except StopIteration:
                step = current_step.get() or name
                raise MockExhausted(
                    f"mock_step({name!r}): its side_effect list ran out: it gave {given} value(s) and step "
                    f"{step!r} was called again; give one value (or exception) per call, or a callable"
                ) from None
            given += 1
        if _is_exception(value):
            raise value
        return value

    return next_value


def _did_you_mean(name: str, steps: list[str]) -> str:
    names = {step: None for step in steps} | {item["map"]: None for item in map(_MAP_ITEM.fullmatch, steps) if item}
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_exception(value: Any) -> bool:
    return isinstance(value, BaseException) or (isinstance(value, type) and issubclass(value, BaseException))
