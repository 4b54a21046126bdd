"""Starting and stopping a manager: a start that fails part-way leaves nothing running behind it."""

from __future__ import annotations

import asyncio
import logging
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


async def test_a_claim_that_keeps_failing_waits_its_backoff_and_is_said_once(
    manager_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A database refusing the claim at once (a read-only node after a failover, a revoked grant) while
    notifications keep waking the worker: the claim loop spun 700-900 times a second, each failure logged at
    ERROR with its traceback (246,000 lines in 5 s)."""
    manager = await manager_for([])
    worker = manager.worker
    assert worker is not None
    claims = 0

    async def refused(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        raise RuntimeError("cannot execute UPDATE in a read-only transaction")

    manager.backend.claim_runs = refused  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="sonamu_tasks.worker"):
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5
        while loop.time() < until:
            worker.wake()  # a notification of a new run, say
            await asyncio.sleep(0.01)
    assert 1 <= claims <= 10, claims  # backoff 50 ms, 100, 200, 400, 800: about 5 in 1.5 s
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "claim failed" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is not None  # once, with the traceback of the unexpected error
