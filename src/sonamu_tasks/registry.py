"""The workflows this process can execute, by (name, version)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .definition import WorkflowDefinition
from .errors import WorkflowDefinitionError, WorkflowNotRegistered


class Registry:
    def __init__(self) -> None:
        self._definitions: dict[tuple[str, str], WorkflowDefinition[Any, Any]] = {}

    def register(self, definition: WorkflowDefinition[Any, Any]) -> None:
        if not isinstance(definition, WorkflowDefinition):
            raise WorkflowDefinitionError(f"expected a workflow made by workflow(), got {type(definition).__name__}")
        existing = self._definitions.get(definition.key)
        if (
            existing is not None
            and existing.fn is not definition.fn
            and existing.fn.__qualname__ != (definition.fn.__qualname__)
        ):
            raise WorkflowDefinitionError(
                f"two different functions claim workflow {definition.name!r} version {definition.version!r}: "
                f"{existing.fn.__module__}.{existing.fn.__qualname__} and "
                f"{definition.fn.__module__}.{definition.fn.__qualname__}"
            )
        self._check_schedule_names(definition)
        self._definitions[definition.key] = definition

    def _check_schedule_names(self, definition: WorkflowDefinition[Any, Any]) -> None:
        """A schedule name belongs to one workflow (its versions may each declare it): two workflows declaring
        the same name would share one stored schedule, which fires only one of them."""
        declared = {schedule.name_for(definition.name) for schedule in definition.schedules}
        for other in self._definitions.values():
            if other.name == definition.name:
                continue
            for schedule in other.schedules:
                name = schedule.name_for(other.name)
                if name in declared:
                    raise WorkflowDefinitionError(
                        f"schedule {name!r} is declared by two workflows, {other.name!r} and {definition.name!r}; "
                        "schedule names are unique: give one of them another name="
                    )

    def replace_all(self, definitions: Iterable[WorkflowDefinition[Any, Any]]) -> None:
        """Swap in a new set of definitions at once (a dev-mode reload)."""
        fresh = Registry()
        for definition in definitions:
            fresh.register(definition)
        self._definitions = fresh._definitions

    def get(self, name: str, version: str) -> WorkflowDefinition[Any, Any]:
        definition = self._definitions.get((name, version))
        if definition is None:
            known = sorted(v for (n, v) in self._definitions if n == name)
            hint = f"registered versions: {', '.join(known)}" if known else "no version of it is registered here"
            raise WorkflowNotRegistered(f"workflow {name!r} version {version!r} is not registered; {hint}")
        return definition

    def find(self, name: str, version: str) -> WorkflowDefinition[Any, Any] | None:
        return self._definitions.get((name, version))

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._definitions)

    def __iter__(self) -> Any:
        return iter(list(self._definitions.values()))

    def __len__(self) -> int:
        return len(self._definitions)
