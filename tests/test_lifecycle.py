"""Starting and stopping a manager: a start that fails part-way leaves nothing running behind it."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from sonamu_tasks import WorkflowManager, workflow
from sonamu_tasks.scheduler import Scheduler


@workflow(version="1")
async def noop() -> str:
    return "done"


def sonamu_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("sonamu")}


async def test_a_busy_metrics_port_fails_the_start_before_the_worker_claims_anything(make_config: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        manager = WorkflowManager(make_config(metrics_port=port), workflows=[noop])
        with pytest.raises(OSError):
            await manager.start()
    async with WorkflowManager(make_config(enable_worker=False)) as client:
        assert await client.list_workers() == []


async def test_a_start_failing_after_the_worker_started_stops_the_worker(
    make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sonamu_threads()

    async def broken(self: Scheduler) -> None:
        raise RuntimeError("schedules could not be stored")

    monkeypatch.setattr(Scheduler, "synchronize", broken)
    manager = WorkflowManager(make_config(), workflows=[noop])
    with pytest.raises(RuntimeError, match="schedules could not be stored"):
        await manager.start()
    monkeypatch.undo()
    assert sonamu_threads() <= before  # the heartbeat thread is stopped
    async with WorkflowManager(make_config(enable_worker=False)) as client:
        assert await client.list_workers() == []  # deregistered: no live-looking worker in `workers`
