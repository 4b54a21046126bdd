"""Concurrent steps and child workflows when the worker running them is killed (kill -9, a real process)."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

from sonamu_tasks import RunStatus, StepStatus

from .conftest import wait_until
from .support.processes import audit_lines
from .test_processes import client, start_worker  # noqa: F401 - fixtures

WORKFLOW = {"name": "gather_and_child", "version": "1"}
WORKFLOWS = "gather_and_child,audited_child"


async def test_a_gather_whose_worker_is_killed_reruns_only_the_unfinished_step_and_starts_its_child_once(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    first = start_worker("first", lease_ms=1000, workflows=WORKFLOWS)
    handle = await client.run(WORKFLOW, {"dir": str(tmp_path)})

    async def three_stored_and_g3_running() -> bool:
        run = await handle.info(with_steps=True)
        stored = {s.name for s in run.steps if s.status is StepStatus.COMPLETED}
        started = {name for name, _ in audit_lines(tmp_path)}
        children = (await client.list_runs(parent_id=handle.id)).items
        child_done = [c.status for c in children] == [RunStatus.COMPLETED]
        return {"g0", "g1", "g2", "kid"} <= stored and "g3-start" in started and child_done

    # Killed once g0-g2 and the child completed, while g3 runs: all of those are stored and must not run again.
    await wait_until(three_stored_and_g3_running, what="g0-g2 and the child done while g3 runs")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    (tmp_path / "release").touch()
    second = start_worker("second", lease_ms=1000, workflows=WORKFLOWS)

    result = await handle.result(timeout=30)
    assert result == {"steps": ["g0", "g1", "g2", "g3"], "child": "child", "finished_in": second.pid}
    counts = Counter(name for name, _ in audit_lines(tmp_path))
    assert counts["g0-start"] == counts["g1-start"] == counts["g2-start"] == 1
    assert counts["g3-start"] == 2 and counts["g3-done"] == 1  # interrupted: ran again, finished once
    assert counts["child-start"] == 1  # the completed child is not started again by the parent's replay
    children = await client.list_runs(parent_id=handle.id)
    assert len(children.items) == 1 and children.items[0].status is RunStatus.COMPLETED
    run = await handle.info()
    assert run.status is RunStatus.COMPLETED and run.recoveries == 1


async def test_messages_are_consumed_exactly_once_when_the_worker_is_killed_right_after_each_send(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    worker = start_worker("w0", lease_ms=1000, workflows="collect")
    handle = await client.run({"name": "collect", "version": "1"}, {"n": 6})
    for index in range(6):
        await client.send(handle.id, index, topic="t")
        if index % 2 == 0:  # killed right after the send: whatever it was doing with the message
            worker.process.send_signal(signal.SIGKILL)
            worker.process.wait(timeout=10)
            worker = start_worker(f"w{index + 1}", lease_ms=1000, workflows="collect")
    assert await handle.result(timeout=40) == [0, 1, 2, 3, 4, 5]
    assert await client.list_messages(handle.id) == []
    run = await handle.info(with_steps=True)
    assert sorted(s.output for s in run.steps) == [0, 1, 2, 3, 4, 5]
