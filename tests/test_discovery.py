"""The syncer: workflow modules are found and registered; a broken one is named and skipped; a code
change is picked up by synchronize() without dropping runs in flight."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sonamu_tasks import WorkflowManager
from sonamu_tasks.discovery import discover

from .conftest import wait_until

SHOP = Path(__file__).resolve().parents[1] / "examples" / "shop"


@pytest.fixture
def package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A fresh importable package `<name>` under tmp_path, removed from sys.modules afterwards."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    (root / "billing").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "billing" / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    yield name, root
    sys.path.remove(str(tmp_path))
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def write(path: Path, source: str) -> None:
    path.write_text(textwrap.dedent(source))


def test_the_example_application_is_discovered() -> None:
    sys.path.insert(0, str(SHOP))
    try:
        found = discover(["app.application"])
    finally:
        sys.path.remove(str(SHOP))
    assert sorted((d.name, d.version) for d in found.definitions) == [("confirm_order", "1"), ("daily_report", "1")]
    assert found.errors == []
    report = next(d for d in found.definitions if d.name == "daily_report")
    assert [s.name_for("daily_report") for s in report.schedules] == ["daily-report", "daily_report[*/10 * * * * *]"]


def test_a_broken_module_is_named_and_the_others_still_load(package: tuple[str, Path]) -> None:
    name, root = package
    write(
        root / "billing" / "billing_workflow.py",
        """
        from sonamu_tasks import workflow

        @workflow(version="1")
        async def charge(input):
            return input
    """,
    )
    write(
        root / "broken_workflow.py",
        """
        raise RuntimeError("missing API key at import")
    """,
    )
    write(root / "helpers.py", "IMPORTED = True\n")  # not a workflow file: never imported
    found = discover([name])
    assert [d.name for d in found.definitions] == ["charge"]
    (error,) = found.errors
    assert error.path.endswith("broken_workflow.py") and "missing API key at import" in error.error
    assert f"{name}.helpers" not in sys.modules


async def test_synchronize_picks_up_changed_code_and_keeps_runs_in_flight(
    package: tuple[str, Path], make_config: Any, tmp_path: Path
) -> None:
    name, root = package
    gate = tmp_path / "gate"
    source = """
        import asyncio, pathlib
        from sonamu_tasks import workflow

        async def wait_for_gate():
            while not pathlib.Path({gate!r}).exists():
                await asyncio.sleep(0.02)
            return "{label}"

        @workflow(version="{version}", schedules={schedules})
        async def invoice(step):
            return await step.define("wait", wait_for_gate).run()
    """
    module = root / "billing" / "billing_workflow.py"
    write(module, source.format(gate=str(gate), label="old code", version="1", schedules='["0 * * * *"]'))
    config = make_config()
    config.workflows = (name,)
    async with WorkflowManager(config) as manager:
        assert manager.registry.keys() == [("invoice", "1")]
        in_flight = await manager.run({"name": "invoice", "version": "1"})
        await wait_until(lambda: _is_running(in_flight), what="the run to start")

        write(module, source.format(gate=str(gate), label="new code", version="2", schedules="[]"))
        await manager.synchronize()
        assert manager.registry.keys() == [("invoice", "2")]
        assert await manager.backend.list_schedules() == []  # type: ignore[attr-defined]

        gate.touch()
        assert await in_flight.result(timeout=15) == "old code"  # it kept the code it started with
        fresh = await manager.run({"name": "invoice", "version": "2"})
        assert await fresh.result(timeout=15) == "new code"


async def _is_running(handle: Any) -> bool:
    return str(await handle.status()) == "running"


async def test_a_workflow_registered_after_the_start_survives_synchronize(manager_for: Any) -> None:
    """register() then synchronize(), as the docstring says: the workflow was dropped by the re-import."""
    from sonamu_tasks import workflow

    @workflow(version="1")
    async def added_later(input: Any) -> Any:
        return {"echo": input}

    manager = await manager_for([])
    manager.register(added_later)
    await manager.synchronize()
    assert manager.registry.find("added_later", "1") is not None
    assert await (await manager.run(added_later, 7)).result(timeout=15) == {"echo": 7}
