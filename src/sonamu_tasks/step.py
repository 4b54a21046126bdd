"""The `step` a workflow receives (the seed's StepWrapper): define / get / sleep.

The checkpoint logic lives in `executor.Attempt`; this module is the user-facing surface.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .definition import underscore_case
from .duration import Duration

if TYPE_CHECKING:
    from .executor import Attempt

R = TypeVar("R")


class Step(Generic[R]):
    """A named step; `await step.run(*args, **kwargs)` executes it once per run and checkpoints the result."""

    def __init__(self, attempt: Attempt, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self._attempt = attempt

    async def run(self, *args: Any, **kwargs: Any) -> R:
        return await self._attempt.run_step(self.name, self.fn, args, kwargs)  # type: ignore[no-any-return]


class StepWrapper:
    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt

    def define(self, name: str | Mapping[str, Any], fn: Callable[..., R]) -> Step[R]:
        """`step.define("load-order", load_order)`; the seed's `{"name": ...}` form is accepted too."""
        step_name = _step_name(name["name"] if isinstance(name, Mapping) else name)
        if not callable(fn):
            raise TypeError(f"step.define({step_name!r}, fn): fn must be callable, got {type(fn).__name__}")
        return Step(self._attempt, step_name, fn)

    def get(self, obj: Any, method_name: str, name: str | None = None) -> Step[Any]:
        """Wrap `obj.method_name` (class or instance); the step is named after the method unless `name`."""
        method = _bound_method(obj, method_name)
        return Step(self._attempt, _step_name(name or underscore_case(method_name)), method)

    async def sleep(self, name: str, duration: Duration) -> None:
        """Durable sleep: the run is parked in the database and holds no worker slot until it wakes."""
        await self._attempt.sleep(_step_name(name), duration)


def _step_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"a step name must be a non-empty string, got {name!r}")
    return name


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
