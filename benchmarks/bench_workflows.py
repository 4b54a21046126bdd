"""Trivial workflows for benchmarks."""

from __future__ import annotations

import time
from typing import Any

from sonamu_tasks import WorkflowDefinition, workflow


async def noop(index: int) -> int:
    return index


async def stamp() -> dict[str, float]:
    """The moment the step starts: wall clock (compared across processes) and perf_counter (within one)."""
    return {"time": time.time(), "perf": time.perf_counter()}


async def seconds_until(moment: float) -> float:
    return max(0.0, moment - time.time())


@workflow(version="1")
async def steps(input: Any, step: Any) -> int:
    """S steps that return at once."""
    for index in range(input["steps"]):
        await step.define(f"s{index}", noop).run(index)
    return int(input["steps"])


@workflow(version="1")
async def stamped(input: Any, step: Any) -> dict[str, float]:
    """S steps; the first returns when it started, and the workflow returns that."""
    started: dict[str, float] = await step.define("stamp", stamp).run()
    for index in range(1, input["steps"]):
        await step.define(f"s{index}", noop).run(index)
    return started


@workflow(version="1")
async def sleeper(input: Any, step: Any) -> bool:
    """A step, a durable sleep until the common wake time `input["wake_at"]` (epoch seconds), a step.

    The first step computes the sleep (its checkpoint keeps the value), so every run of a batch wakes at
    the same instant however long the batch took to start.
    """
    nap = await step.define("first", seconds_until).run(input["wake_at"])
    await step.sleep("nap", nap)
    await step.define("last", noop).run(0)
    return True


@workflow(version="1")
async def charge_items(input: Any, step: Any) -> int:
    """One step per item, named by the item's id as the steps guide advises for loops (`charge-{id}`); with
    `"spelled"`, the ids are written in letters, as ids that are words would be (`charge-bcd`)."""
    for item in input["items"]:
        key = "".join(chr(97 + int(digit)) for digit in str(item)) if input["spelled"] else str(item)
        await step.define(f"charge-{key}", noop).run(item)
    return len(input["items"])


ALL: list[WorkflowDefinition[Any, Any]] = [steps, stamped, sleeper, charge_items]
