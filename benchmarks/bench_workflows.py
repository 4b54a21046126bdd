"""Trivial workflows for benchmarks: S steps that return at once."""

from __future__ import annotations

from typing import Any

from sonamu_tasks import workflow


async def noop(index: int) -> int:
    return index


@workflow(version="1")
async def steps(input: Any, step: Any) -> int:
    for index in range(input["steps"]):
        await step.define(f"s{index}", noop).run(index)
    return int(input["steps"])
