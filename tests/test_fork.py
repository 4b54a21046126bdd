"""Forking a run from a step, and finding runs no worker serves, on every backend (see BACKENDS)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from sonamu_tasks import InvalidValue, RetryPolicy, RunStatus, WorkflowFailed, workflow

from .conftest import wait_until
from .test_processes import client, start_worker  # noqa: F401 - fixtures

ONCE = RetryPolicy(max_attempts=1)


async def test_fork_keeps_the_checkpoints_before_the_step_and_runs_the_rest_on_a_new_version(
    manager_for: Any,
) -> None:
    calls: list[str] = []

    async def load(order: int) -> dict[str, int]:
        calls.append("load")
        return {"order": order, "total": 30}

    async def charge_buggy(loaded: dict[str, int]) -> str:
        calls.append("charge-v1")
        raise ValueError("bug in charge")

    async def charge_fixed(loaded: dict[str, int]) -> str:
        calls.append("charge-v2")
        return f"charged {loaded['total']}"

    async def notify(receipt: str) -> str:
        calls.append("notify")
        return f"sent: {receipt}"

    def make(version: str, charge: Any) -> Any:
        async def checkout(input: Any, step: Any) -> Any:
            loaded = await step.define("load", load).run(input)
            receipt = await step.define("charge", charge).run(loaded)
            return await step.define("notify", notify).run(receipt)

        return workflow(checkout, version=version, retry_policy=ONCE)

    v1, v2 = make("1", charge_buggy), make("2", charge_fixed)
    manager = await manager_for([v1, v2])
    source = await manager.run(v1, 7)
    with pytest.raises(WorkflowFailed, match="bug in charge"):
        await source.result(timeout=15)

    fork = await manager.fork(source.id, from_step="charge", version="2")
    assert await fork.result(timeout=15) == "sent: charged 30"
    assert calls == ["load", "charge-v1", "charge-v2", "notify"]  # "load" was not run again
    forked = await fork.info(with_steps=True)
    assert forked.version == "2" and forked.input == 7
    assert [(s.name, s.output) for s in forked.steps] == [
        ("load", {"order": 7, "total": 30}),
        ("charge", "charged 30"),
        ("notify", "sent: charged 30"),
    ]
    assert (forked.forked_from, forked.forked_step) == (source.id, "charge")  # it remembers where it came from
    assert (await source.info()).status is RunStatus.FAILED  # the source is left as it was
    with pytest.raises(InvalidValue, match="no step 'nope' to fork from; its steps: 'load', 'charge'"):
        await manager.fork(source.id, from_step="nope")


async def test_a_fork_keeps_children_whose_outcomes_were_seen_and_starts_a_fan_out_again_otherwise(
    manager_for: Any,
) -> None:
    executed: list[int] = []
    broken = {"finish": True, "early": True}

    @workflow(version="1")
    async def kid(input: int) -> int:
        executed.append(input)  # the child's side effect (an email, say)
        return input * 10

    async def finish(results: Any) -> Any:
        if broken["finish"]:
            raise RuntimeError("bug in finish")
        return results

    async def early() -> None:
        if broken["early"]:
            raise RuntimeError("bug before the results were read")

    @workflow(version="1", retry_policy=ONCE)
    async def seen(step: Any) -> Any:
        one = await step.run_workflow("single", kid, 100)
        handles = await step.start_workflows("many", kid, [1, 2])
        results = await asyncio.gather(*(handle.result() for handle in handles))
        return await step.define("finish", finish).run([one, results])

    @workflow(version="1", retry_policy=ONCE)
    async def unseen(step: Any) -> Any:
        handles = await step.start_workflows("many", kid, [3, 4])
        await step.define("early", early).run()
        return await asyncio.gather(*(handle.result() for handle in handles))

    manager = await manager_for([kid, seen, unseen])
    source = await manager.run(seen)
    with pytest.raises(WorkflowFailed, match="bug in finish"):
        await source.result(timeout=15)
    steps = {s.name: s.kind for s in (await source.info(with_steps=True)).steps}
    assert steps["many[0]"] == steps["many[1]"] == "child"  # a fan-out's outcomes are child steps
    broken["finish"] = False
    fork = await manager.fork(source.id, from_step="finish")
    assert await fork.result(timeout=15) == [1000, [10, 20]]
    assert sorted(executed) == [1, 2, 100]  # no child ran again
    assert (await manager.list_runs(parent_id=fork.id)).items == []

    # The source failed before reading its children's results: the fork starts the fan-out again, whole.
    source = await manager.run(unseen)
    with pytest.raises(WorkflowFailed, match="bug before the results"):
        await source.result(timeout=15)
    broken["early"] = False
    fork = await manager.fork(source.id, from_step="early")
    assert await fork.result(timeout=15) == [30, 40]
    children = (await manager.list_runs(parent_id=fork.id)).items
    assert sorted(child.parent_step or "" for child in children) == ["many[0]", "many[1]"]


async def test_stranded_runs_are_those_of_versions_no_live_worker_serves(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    worker = start_worker("v1-only", lease_ms=1000)  # registers three_steps version 1
    served = await client.run({"name": "three_steps", "version": "1"}, {"dir": str(tmp_path)})
    retired = [await client.run({"name": "three_steps", "version": "0"}, {"dir": str(tmp_path)}) for _ in range(3)]
    await client.pause(retired[0].id)

    async def registered() -> bool:
        return any(w.workflows for w in await client.list_workers())

    await wait_until(registered, what="the worker registered")
    (group,) = await client.stranded_runs()
    assert (group.workflow, group.version, group.total) == ("three_steps", "0", 3)
    assert group.counts == {RunStatus.PENDING: 2, RunStatus.PAUSED: 1}
    (tmp_path / "release").touch()
    assert (await served.result(timeout=30))["finished_in"] == worker.pid
    # Once the only worker is gone, version 1's unfinished runs are stranded too.
    again = await client.run({"name": "three_steps", "version": "1"}, {"dir": str(tmp_path)})
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait(timeout=10)
    groups = {g.version: g.total for g in await client.stranded_runs(stale_after=0)}
    assert groups == {"0": 3, "1": 1}
    page = await client.list_runs(workflow="three_steps", version="0")
    assert sorted(r.id for r in page.items) == sorted(h.id for h in retired)
    assert again.id not in {r.id for r in page.items}
