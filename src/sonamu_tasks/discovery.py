"""The syncer: find `*_workflow.py` / `workflow.py` modules under the configured packages and collect
every module-level workflow they define.

A module that fails to import is reported (file and error) and skipped; the others still load.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .definition import WorkflowDefinition

logger = logging.getLogger("sonamu_tasks.discovery")


@dataclass(frozen=True)
class DiscoveryError:
    path: str
    module: str
    error: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.path}: {self.error}"


@dataclass
class Discovered:
    definitions: list[WorkflowDefinition[Any, Any]] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    errors: list[DiscoveryError] = field(default_factory=list)
    watched_paths: list[Path] = field(default_factory=list)


def is_workflow_file(path: Path) -> bool:
    return path.suffix == ".py" and (path.name == "workflow.py" or path.name.endswith("_workflow.py"))


def discover(packages: Iterable[str], *, reload: bool = False) -> Discovered:
    """Import the workflow modules of `packages` (fresh copies when `reload`) and collect their workflows."""
    found = Discovered()
    seen: set[int] = set()
    for package in packages:
        for module_name, path in _workflow_modules(package, found):
            module = _import(module_name, path, reload=reload, found=found)
            if module is None:
                continue
            found.modules.append(module_name)
            for value in vars(module).values():
                if isinstance(value, WorkflowDefinition) and id(value) not in seen:
                    seen.add(id(value))
                    found.definitions.append(value)
    return found


def _workflow_modules(package: str, found: Discovered) -> list[tuple[str, Path]]:
    try:
        root = importlib.import_module(package)
    except Exception as error:
        found.errors.append(
            DiscoveryError(package, package, f"cannot import package: {error!r}", traceback.format_exc())
        )
        logger.error("cannot import workflow package %s: %r", package, error)
        return []
    locations: Sequence[str] = getattr(root, "__path__", None) or []
    if not locations:  # a plain module named directly
        file = getattr(root, "__file__", None)
        return [(package, Path(file))] if file else []
    modules = []
    for location in locations:
        base = Path(location)
        found.watched_paths.append(base)
        for path in sorted(base.rglob("*.py")):
            if is_workflow_file(path) and "__pycache__" not in path.parts:
                relative = path.relative_to(base).with_suffix("")
                modules.append((".".join([package, *relative.parts]), path))
    return modules


def _import(module_name: str, path: Path, *, reload: bool, found: Discovered) -> Any:
    try:
        if reload and module_name in sys.modules:
            # The bytecode cache is keyed by mtime in whole seconds and size: an edit within the same second
            # that keeps the size would load the stale bytecode. Drop it.
            with contextlib.suppress(OSError, NotImplementedError):
                Path(importlib.util.cache_from_source(str(path))).unlink()
            return importlib.reload(sys.modules[module_name])
        return importlib.import_module(module_name)
    except Exception as error:
        sys.modules.pop(module_name, None)
        failure = DiscoveryError(str(path), module_name, f"{type(error).__name__}: {error}", traceback.format_exc())
        found.errors.append(failure)
        logger.error("workflow module %s failed to load and is skipped: %s", path, failure.error)
        return None
