"""Workflows run by real worker processes in the crash, fencing and shutdown tests.

Every step appends a line to `<dir>/audit.log` (with the pid that ran it), so a test can count how often
each step really executed. Step "two" blocks until the file `<dir>/release` exists.

`blocks_the_loop` has an async step that never awaits: it holds the worker's event loop for `seconds`
(sleeping, or computing when `spin` is true), or until `<dir>/release` exists when no `seconds` are given.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from sonamu_tasks import Queue, RetryPolicy, Schedule, workflow


def audit(directory: str, line: str) -> None:
    with open(Path(directory) / "audit.log", "a") as log:
        log.write(f"{line} {os.getpid()}\n")
        log.flush()
        os.fsync(log.fileno())


def step_one(directory: str) -> str:
    audit(directory, "one")
    return "one"


def step_two(directory: str) -> int:
    audit(directory, "two-start")
    while not (Path(directory) / "release").exists():
        time.sleep(0.02)
    audit(directory, "two-done")
    return os.getpid()


def step_three(directory: str) -> str:
    audit(directory, "three")
    return "three"


@workflow(version="1", retry_policy=RetryPolicy(max_attempts=3, initial_interval_ms=100))
async def three_steps(input: Any, step: Any) -> dict[str, Any]:
    directory = input["dir"]
    await step.define("one", step_one).run(directory)
    two = await step.define("two", step_two).run(directory)
    await step.define("three", step_three).run(directory)
    return {"two_ran_in": two, "finished_in": os.getpid()}


async def hold_the_loop(directory: str, seconds: float | None, spin: bool) -> int:
    audit(directory, "block-start")
    if seconds is not None and spin:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # CPU work holding the GIL, no await
            pass
    elif seconds is not None:
        time.sleep(seconds)  # no await: the event loop runs nothing else meanwhile
    else:
        while not (Path(directory) / "release").exists():
            time.sleep(0.02)
    audit(directory, "block-done")
    return os.getpid()


@workflow(version="1")
async def blocks_the_loop(input: Any, step: Any) -> dict[str, Any]:
    blocked_in = await step.define("block", hold_the_loop).run(
        input["dir"], input.get("seconds"), input.get("spin", False)
    )
    return {"blocked_in": blocked_in, "finished_in": os.getpid()}


@workflow(version="1", schedules=[Schedule("* * * * * *", name="every-second")])
async def ticker(input: Any) -> Any:
    return input


def gather_step(directory: str, name: str) -> str:
    audit(directory, f"{name}-start")
    while name == "g3" and not (Path(directory) / "release").exists():
        time.sleep(0.02)
    audit(directory, f"{name}-done")
    return name


@workflow(version="1")
async def audited_child(input: Any, step: Any) -> str:
    return await step.define("child-run", gather_step).run(input["dir"], "child")  # type: ignore[no-any-return]


@workflow(version="1")
async def gather_and_child(input: Any, step: Any) -> dict[str, Any]:
    """A child started first, then four steps at once (g3 blocks until released), then the child's result."""
    import asyncio

    directory = input["dir"]
    child = await step.start_workflow("kid", audited_child, {"dir": directory})
    names = await asyncio.gather(*(step.define(f"g{i}", gather_step).run(directory, f"g{i}") for i in range(4)))
    return {"steps": names, "child": await child.result(), "finished_in": os.getpid()}


def blocking_item(item: dict[str, Any]) -> int:
    """A step.map item: audited, then blocks until `<dir>/release` exists."""
    audit(item["dir"], f"m{item['index']}-start")
    while not (Path(item["dir"]) / "release").exists():
        time.sleep(0.02)
    return int(item["index"])


@workflow(version="1")
async def mapped(input: Any, step: Any) -> list[int]:
    """Six blocking sync items, three at a time: on a worker of concurrency 2 one of them queues for a thread."""
    items = [{"dir": input["dir"], "index": index} for index in range(6)]
    return await step.map("m", blocking_item, items, concurrency=3)  # type: ignore[no-any-return]


@workflow(version="1")
async def collect(input: Any, step: Any) -> list[Any]:
    """Receives `n` messages on topic "t", one step each, and returns them in order."""
    got = []
    for index in range(input["n"]):
        got.append(await step.receive(f"m{index}", topic="t"))
    return got


def audited_work(directory: str, key: str, work_ms: float) -> str:
    """One line per execution, `key wall-clock-time pid`, written before the work (the failover tests)."""
    with open(Path(directory) / "executions.log", "a") as log:
        log.write(f"{key} {time.time()!r} {os.getpid()}\n")
        log.flush()
    time.sleep(work_ms / 1000)
    return key


@workflow(version="1", retry_policy=RetryPolicy(max_attempts=30, initial_interval_ms=100))
async def audited_chain(input: Any, step: Any, context: Any) -> int:
    for index in range(int(input["steps"])):
        key = f"{context['run_id']}/s{index}"
        await step.define(f"s{index}", audited_work).run(input["dir"], key, float(input.get("work_ms", 20)))
    return int(input["steps"])


LIMITED = Queue("limited", concurrency=3)


def timed_step(directory: str, seconds: float) -> int:
    """Writes its start and end (wall clock, shared by every process) to `<dir>/spans.log`; blocks until
    `<dir>/release` exists when `seconds` is negative."""
    path = Path(directory) / "spans.log"
    with open(path, "a") as log:
        log.write(f"start {os.getpid()} {time.time()}\n")
    if seconds < 0:
        while not (Path(directory) / "release").exists():
            time.sleep(0.01)
    else:
        time.sleep(seconds)
    with open(path, "a") as log:
        log.write(f"end {os.getpid()} {time.time()}\n")
    return os.getpid()


@workflow(version="1", queue=LIMITED)
async def limited(input: Any, step: Any) -> int:
    """One timed step in a queue that lets three runs execute at once across every worker."""
    pid: int = await step.define("work", timed_step).run(input["dir"], input.get("seconds", 0.2))
    return pid


ONE_PER_KEY = Queue("one-per-key", per_key_concurrency=1)


@workflow(version="1", queue=ONE_PER_KEY)
async def keyed_sleep(input: Any, step: Any) -> int:
    """One step of `input` seconds in a queue that runs one run per concurrency key at a time."""
    pid: int = await step.define("pid", _pid_after).run(float(input))
    return pid


async def _pid_after(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()


PER_TENANT = Queue("per-tenant", per_key_concurrency=1)


@workflow(version="1", queue=PER_TENANT)
async def keyed(input: Any, step: Any) -> int:
    """Version 1 of a workflow that runs one at a time per concurrency key: one timed step (the tests declare
    version 2 in their own process)."""
    pid: int = await step.define("work", timed_step).run(input["dir"], input.get("seconds", 0.2))
    return pid


async def _started_in() -> int:
    return os.getpid()


@workflow(version="1")
async def one_step(input: Any, step: Any) -> dict[str, Any]:
    """One step that returns the pid of the process that ran it."""
    return {"input": input, "ran_in": await step.define("pid", _started_in).run()}


@workflow(version="1")
async def awaits_event(input: Any, step: Any) -> Any:
    """Waits for the event ("ready", input) and returns its payload."""
    return await step.wait_for_event("ready", event="ready", key=input)
