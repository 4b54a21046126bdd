"""Crash recovery, fencing and graceful shutdown with real worker processes (kill -9, SIGSTOP, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sonamu_tasks import RunStatus, WorkflowManager

from .conftest import wait_until
from .support.processes import WorkerProcess, audit_lines

WORKFLOW = {"name": "three_steps", "version": "1"}


@pytest.fixture
def start_worker(database_url: str, schema: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str, **settings: float | str) -> WorkerProcess:
        worker = WorkerProcess(database_url, schema, tmp_path, name, **settings)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            os.kill(worker.pid, signal.SIGCONT)
        worker.stop()


@pytest.fixture
async def client(make_config: Any) -> Any:
    """The test's own process: starts runs and reads them, executes nothing."""
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        yield manager


def steps_started(directory: Path, step: str) -> list[int]:
    return [pid for name, pid in audit_lines(directory) if name == step]


async def test_completed_steps_are_not_rerun_after_a_worker_is_killed_mid_step(
    client: Any, start_worker: Any, tmp_path: Path
) -> None:
    first = start_worker("first", lease_ms=1000)
    handle = await client.run(WORKFLOW, {"dir": str(tmp_path)})
    await wait_until(lambda: steps_started(tmp_path, "two-start"), what="step two to start")

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    (tmp_path / "release").touch()
    second = start_worker("second", lease_ms=1000)

    result = await handle.result(timeout=30)
    assert result == {"two_ran_in": second.pid, "finished_in": second.pid}
    counts = Counter(name for name, _ in audit_lines(tmp_path))
    # Step one completed before the kill: never again. Step two was interrupted: it ran again.
    assert counts == {"one": 1, "two-start": 2, "two-done": 1, "three": 1}
    run = await handle.info()
    assert run.status is RunStatus.COMPLETED and run.recoveries == 1 and run.attempts == 0


async def test_a_paused_worker_cannot_overwrite_the_take_over(client: Any, start_worker: Any, tmp_path: Path) -> None:
    stalled = start_worker("stalled", lease_ms=600)
    handle = await client.run(WORKFLOW, {"dir": str(tmp_path)})
    await wait_until(lambda: steps_started(tmp_path, "two-start"), what="step two to start")

    stalled.freeze()  # a long GC pause, a partition: it keeps believing it owns the run
    rescuer = start_worker("rescuer", lease_ms=600)
    await wait_until(lambda: rescuer.pid in steps_started(tmp_path, "two-start"), what="the take-over")
    (tmp_path / "release").touch()
    result = await handle.result(timeout=30)
    assert result == {"two_ran_in": rescuer.pid, "finished_in": rescuer.pid}

    os.kill(stalled.pid, signal.SIGCONT)  # it wakes up, finishes step two, and tries to write
    await wait_until(lambda: "lease" in stalled.log() and "lost" in stalled.log(), what="the stale worker to notice")
    run = await handle.info(with_steps=True)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"two_ran_in": rescuer.pid, "finished_in": rescuer.pid}
    assert {s.name: s.output for s in run.steps}["two"] == rescuer.pid


async def test_a_worker_told_by_its_heartbeat_that_it_lost_a_lease_counts_the_loss(
    client: Any, start_worker: Any, tmp_path: Path
) -> None:
    """The heartbeat's answer, not a refused write, stops the attempt (its step is still in flight): its span
    says lease_lost, the outcome the lease-losses metric counts. It said "unknown"."""
    spans_file = tmp_path / "stalled-spans.jsonl"
    stalled = start_worker("stalled", lease_ms=600, spans_file=str(spans_file))
    handle = await client.run(WORKFLOW, {"dir": str(tmp_path)})
    await wait_until(lambda: steps_started(tmp_path, "two-start"), what="step two to start")

    stalled.freeze()
    rescuer = start_worker("rescuer", lease_ms=600)
    await wait_until(lambda: rescuer.pid in steps_started(tmp_path, "two-start"), what="the take-over")
    os.kill(stalled.pid, signal.SIGCONT)  # step two still waits for the release file
    await wait_until(lambda: "lost the lease" in stalled.log(), what="the heartbeat to tell the stale worker")
    outcomes = await wait_until(lambda: attempt_outcomes(spans_file), what="the stale worker's attempt span")
    assert outcomes == ["lease_lost"]
    (tmp_path / "release").touch()
    assert await handle.result(timeout=30) == {"two_ran_in": rescuer.pid, "finished_in": rescuer.pid}


def attempt_outcomes(spans_file: Path) -> list[str]:
    lines = spans_file.read_text().splitlines() if spans_file.exists() else []
    spans = [json.loads(line) for line in lines]
    return [s["attributes"]["sonamu_tasks.outcome"] for s in spans if s["name"].startswith("workflow ")]


async def test_a_worker_stopped_past_its_lease_starts_no_step_when_it_resumes(
    client: Any, start_worker: Any, tmp_path: Path
) -> None:
    """Its pool threads resume with its loop: one would take the next queued step at once, before the loop
    hears that the lease is gone; and a refused checkpoint must stop the map's next item too."""
    stalled = start_worker("stalled", lease_ms=600, workflows="mapped")
    handle = await client.run({"name": "mapped", "version": "1"}, {"dir": str(tmp_path)})
    await wait_until(lambda: len(starts_by(tmp_path, stalled.pid)) == 2, what="two items to start (the third queues)")

    stalled.freeze()
    rescuer = start_worker("rescuer", lease_ms=600, workflows="mapped")
    await wait_until(lambda: starts_by(tmp_path, rescuer.pid), what="the take-over")
    (tmp_path / "release").touch()
    assert await handle.result(timeout=30) == list(range(6))

    os.kill(stalled.pid, signal.SIGCONT)  # its two items finish; its queued third must not start
    await wait_until(lambda: "lease" in stalled.log() and "lost" in stalled.log(), what="the stale worker to notice")
    stalled.terminate()
    assert sorted(starts_by(tmp_path, stalled.pid)) == ["m0-start", "m1-start"]
    assert sorted(starts_by(tmp_path, rescuer.pid)) == [f"m{index}-start" for index in range(6)]


def starts_by(directory: Path, pid: int) -> list[str]:
    return [name for name, by in audit_lines(directory) if by == pid and name.endswith("-start")]


async def test_sigterm_lets_the_running_step_finish_and_hands_the_run_back(
    client: Any, start_worker: Any, tmp_path: Path
) -> None:
    leaving = start_worker("leaving", lease_ms=60_000, grace_ms=20_000)
    handle = await client.run(WORKFLOW, {"dir": str(tmp_path)})
    await wait_until(lambda: steps_started(tmp_path, "two-start"), what="step two to start")

    leaving.process.send_signal(signal.SIGTERM)
    (tmp_path / "release").touch()  # the step in flight finishes inside the grace period
    assert leaving.process.wait(timeout=20) == 0
    run = await handle.info(with_steps=True)
    # Handed back at the step boundary: claimable now, not after the 60 s lease.
    assert run.status is RunStatus.PENDING and run.attempts == 0
    assert [s.name for s in run.steps] == ["one", "two"]

    successor = start_worker("successor", lease_ms=60_000)
    result = await handle.result(timeout=20)
    assert result == {"two_ran_in": leaving.pid, "finished_in": successor.pid}
    assert Counter(name for name, _ in audit_lines(tmp_path)) == {
        "one": 1,
        "two-start": 1,
        "two-done": 1,
        "three": 1,
    }


async def test_sigterm_after_the_grace_period_releases_the_run_at_once(
    client: Any, start_worker: Any, tmp_path: Path
) -> None:
    spans_file = tmp_path / "leaving-spans.jsonl"
    leaving = start_worker("leaving", lease_ms=60_000, grace_ms=300, spans_file=str(spans_file))
    handle = await client.run(WORKFLOW, {"dir": str(tmp_path)})
    await wait_until(lambda: steps_started(tmp_path, "two-start"), what="step two to start")

    leaving.process.send_signal(signal.SIGTERM)  # step two never finishes within 300 ms
    assert leaving.process.wait(timeout=20) == 0
    assert await handle.status() is RunStatus.PENDING
    assert attempt_outcomes(spans_file) == ["handed_back"]  # its span and metrics said "unknown"

    (tmp_path / "release").touch()
    successor = start_worker("successor", lease_ms=60_000)
    assert (await handle.result(timeout=20))["finished_in"] == successor.pid
    assert Counter(name for name, _ in audit_lines(tmp_path))["one"] == 1
