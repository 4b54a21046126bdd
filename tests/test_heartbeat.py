"""Leases do not depend on the event loop being free (issue 11, finding 5).

A workflow that blocks its worker's event loop (CPU work or `time.sleep` in an `async def`) keeps its lease,
because heartbeats come from a thread of their own; the blocked loop is logged; a loop blocked past
`blocked_loop_limit_ms` gives its runs up to other workers. Real worker processes, short leases.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sonamu_tasks import Queue, RunStatus, WorkflowManager, workflow
from sonamu_tasks.backends.base import Backend, NewRun
from sonamu_tasks.heartbeat import heartbeat_failures
from sonamu_tasks.ids import new_run_id

from .conftest import wait_until
from .support.attempts import first_attempt_vanishes
from .support.processes import WorkerProcess, audit_lines

BLOCKS = {"name": "blocks_the_loop", "version": "1"}
LEASE_MS = 1000


@pytest.fixture
def start_worker(database_url: str, schema: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str, **settings: float | str) -> WorkerProcess:
        worker = WorkerProcess(database_url, schema, tmp_path, name, workflows="blocks_the_loop", **settings)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
async def client(make_config: Any) -> Any:
    """The test's own process: starts runs and reads them, executes nothing."""
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        yield manager


def blocks_started(directory: Path) -> list[int]:
    return [pid for name, pid in audit_lines(directory) if name == "block-start"]


def line_with(log: str, text: str) -> str:
    """The first line of a worker's log containing `text`."""
    for line in log.splitlines():
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} in the worker's log:\n{log}")


@pytest.mark.parametrize("spin", [False, True], ids=["sleeping", "computing"])
async def test_a_step_that_blocks_the_event_loop_past_the_lease_runs_exactly_once(
    client: Any, start_worker: Any, tmp_path: Path, spin: bool
) -> None:
    # Given two workers on one database, both looking for runs,
    workers = {w.pid: w for w in (start_worker("first", lease_ms=LEASE_MS), start_worker("second", lease_ms=LEASE_MS))}
    await wait_until(lambda: _count_workers(client, 2), what="both workers to register")

    # when a step holds its worker's event loop for two and a half leases without awaiting,
    handle = await client.run(BLOCKS, {"dir": str(tmp_path), "seconds": 2.5 * LEASE_MS / 1000, "spin": spin})
    result = await handle.result(timeout=30)

    # then the other worker never took it over: the step started once and the run completed where it began,
    assert blocks_started(tmp_path) == [result["blocked_in"]]
    assert result["finished_in"] == result["blocked_in"]
    run = await handle.info()
    assert run.status is RunStatus.COMPLETED and run.recoveries == 0 and run.attempts == 0
    # and the blocked worker said so, naming the run, and again when its loop came back.
    blocked = workers[result["blocked_in"]]
    await wait_until(lambda: "running again after being blocked for" in blocked.log(), what="the unblocked line")
    warning = line_with(blocked.log(), "blocked for")
    assert "WARNING" in warning and handle.id in warning
    assert "past blocked_loop_limit_ms" not in blocked.log()
    idle = next(w for pid, w in workers.items() if pid != result["blocked_in"])
    assert handle.id not in idle.log()


async def test_a_worker_whose_loop_stays_blocked_past_the_limit_gives_its_run_up(
    client: Any, start_worker: Any, tmp_path: Path
) -> None:
    # Given a worker whose loop may stay blocked no longer than a lease,
    stuck = start_worker("stuck", lease_ms=LEASE_MS, blocked_loop_limit_ms=1)  # counts as the lease
    handle = await client.run(BLOCKS, {"dir": str(tmp_path)})
    # when a step blocks its loop until the test releases it,
    await wait_until(lambda: blocks_started(tmp_path) == [stuck.pid], what="the step to block the loop")

    # then it stops extending the lease, and another worker takes the run over;
    rescuer = start_worker("rescuer", lease_ms=LEASE_MS)
    await wait_until(lambda: rescuer.pid in blocks_started(tmp_path), timeout=30, what="the take-over")
    error = line_with(stuck.log(), "past blocked_loop_limit_ms")
    assert "ERROR" in error and handle.id in error

    # when both steps are released, only the new owner's result is kept.
    (tmp_path / "release").touch()
    result = await handle.result(timeout=30)
    assert result == {"blocked_in": rescuer.pid, "finished_in": rescuer.pid}
    run = await handle.info()
    assert run.status is RunStatus.COMPLETED and run.recoveries == 1
    await wait_until(lambda: "lease lost" in stuck.log() or "lost the lease" in stuck.log(), what="the drop")
    assert stuck.process.poll() is None  # a worker that gave its runs up goes on serving


async def test_sigterm_stops_the_heartbeat_thread_and_the_process_exits(
    client: Any, start_worker: Any, tmp_path: Path
) -> None:
    leaving = start_worker("leaving", lease_ms=LEASE_MS, grace_ms=20_000)
    handle = await client.run(BLOCKS, {"dir": str(tmp_path), "seconds": 0.2})
    assert (await handle.result(timeout=30))["finished_in"] == leaving.pid

    leaving.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.process.wait, 20) == 0
    assert "stopped" in leaving.log() and "did not stop" not in leaving.log()


# In this process: a backend passed in as an object, and a clean stop.

SLEEPS: Counter[str] = Counter()


async def _sleep_past_the_lease(run_key: str, seconds: float) -> str:
    SLEEPS[run_key] += 1
    await asyncio.sleep(seconds)
    return run_key


@workflow(version="1", name="outlives_its_lease")
async def outlives_its_lease(input: Any, step: Any) -> str:
    return str(await step.define("sleep", _sleep_past_the_lease).run(input["key"], input["seconds"]))


def _backend_from_object(database_url: str, schema: str) -> Backend:
    """A backend built by the caller, as `WorkflowManager(backend=...)` receives it: nothing to copy it from."""
    if database_url.startswith("sqlite:///"):
        from sonamu_tasks.backends.sqlite import SqliteBackend

        return SqliteBackend.from_url(database_url)
    from sonamu_tasks.backends.postgres import PostgresBackend

    return PostgresBackend(database_url, schema=schema)


async def test_a_backend_passed_as_an_object_is_heartbeated_from_the_event_loop(
    make_config: Any, database_url: str, schema: str
) -> None:
    # 600 ms: the loop's heartbeat shares SQLite's one connection thread with the claims, and a 300 ms lease
    # was taken back now and then on a loaded machine (1 in 7 runs at the end of the sixth session): by the
    # worker's own claim, after a heartbeat commit that stalled past the lease. Fixed since (the claim passes
    # the runs its worker holds; see the late-heartbeat test below).
    config = make_config(lease_ms=600)
    async with WorkflowManager(
        config, workflows=[outlives_its_lease], backend=_backend_from_object(database_url, schema)
    ) as manager:
        assert manager.worker is not None and not manager.worker._heartbeat.keeps_leases
        handle = await manager.run(outlives_its_lease, {"key": f"object-{schema}", "seconds": 2.4})
        assert await handle.result(timeout=20) == f"object-{schema}"
        run = await handle.info()
    # Four leases long, and neither taken back by its own worker's claim loop nor run again.
    assert run.recoveries == 0 and SLEEPS[f"object-{schema}"] == 1
    assert not _heartbeat_threads()


async def test_the_heartbeat_thread_keeps_leases_and_ends_with_the_worker(make_config: Any, schema: str) -> None:
    async with WorkflowManager(make_config(lease_ms=300), workflows=[outlives_its_lease]) as manager:
        assert manager.worker is not None and manager.worker._heartbeat.keeps_leases
        assert len(_heartbeat_threads()) == 1
        handle = await manager.run(outlives_its_lease, {"key": f"thread-{schema}", "seconds": 1.2})
        assert await handle.result(timeout=20) == f"thread-{schema}"
        run = await handle.info()
    assert run.recoveries == 0 and SLEEPS[f"thread-{schema}"] == 1
    assert not _heartbeat_threads()


@pytest.mark.parametrize("heartbeats_from", ["loop", "thread"])
async def test_a_heartbeat_answered_after_the_lease_does_not_let_the_worker_take_its_own_run_back(
    make_config: Any, database_url: str, schema: str, heartbeats_from: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat whose commit stalls past the lease (SQLite's p99 was 200 ms on the audit's disk) leaves the
    run's lease expired in the database until the next one lands. The worker executing the run must not claim
    it from itself meanwhile: that gave it a new lease token, stopped the live attempt and ran the step again."""
    key = f"late-{heartbeats_from}-{schema}"
    lease_ms = 600
    backend = _backend_from_object(database_url, schema)
    real_heartbeat = type(backend).heartbeat
    beats_holding_runs = 0

    async def late_heartbeat(self: Backend, worker_id: str, held: Any, lease: Any) -> dict[str, str | None]:
        nonlocal beats_holding_runs
        answer = await real_heartbeat(self, worker_id, held, lease)  # the lease is written, counted from now
        if held:
            beats_holding_runs += 1
            if beats_holding_runs == 2:  # the step is running: this commit takes two leases to come back
                await asyncio.sleep(2 * lease_ms / 1000)  # (the thread gives up waiting after one lease)
        return answer

    # The class, not the instance: the heartbeat thread builds a backend of its own.
    monkeypatch.setattr(type(backend), "heartbeat", late_heartbeat)
    if heartbeats_from == "loop":
        manager = WorkflowManager(make_config(lease_ms=lease_ms), workflows=[outlives_its_lease], backend=backend)
    else:
        manager = WorkflowManager(make_config(lease_ms=lease_ms), workflows=[outlives_its_lease])
    # Started by another process's client: the worker claims it, and its claim loop then watches the lease
    # (seconds_until_due), as it watches every run it claimed.
    async with manager, WorkflowManager(make_config(enable_worker=False)) as client:
        assert manager.worker is not None
        assert manager.worker._heartbeat.keeps_leases == (heartbeats_from == "thread")
        handle = await client.run(outlives_its_lease, {"key": key, "seconds": 3.0})
        assert await handle.result(timeout=20) == key
        run = await handle.info()
    assert beats_holding_runs >= 3  # the late one, and some after it
    assert run.recoveries == 0 and SLEEPS[key] == 1


async def test_a_run_its_own_dead_attempt_left_running_is_recovered_by_the_same_worker(
    make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim passes the runs whose lease tokens the worker holds, not the runs of its worker id: a run
    that an attempt of this worker left behind, its lease still on the row, is taken back once it runs out."""
    attempts = first_attempt_vanishes(monkeypatch)
    async with WorkflowManager(make_config(lease_ms=300), workflows=[outlives_its_lease]) as manager:
        handle = await manager.run(outlives_its_lease, {"key": "left-behind", "seconds": 0})
        assert await handle.result(timeout=20) == "left-behind"
        run = await handle.info()
    assert attempts.started == 2 and run.recoveries == 1  # its only worker took it back


async def test_a_claim_passes_the_runs_its_worker_holds_and_takes_the_others(make_config: Any) -> None:
    """At the storage seam: a running run whose expired lease is under a token in `held` is neither claimed
    nor due; every other due run is, a run left by a token no longer held included."""
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        backend = manager.backend
        streams = [("held", "1")]
        held_id, _ = await backend.create_run(NewRun(new_run_id(), "held", "1", "null"))
        (first,) = await backend.claim_runs("w", streams, 1, timedelta(milliseconds=100))
        await asyncio.sleep(0.2)  # its lease runs out in the database; the worker's attempt is alive
        held = [(held_id, first.lease_token)]
        assert await backend.seconds_until_due(streams, held=held) is None
        assert await backend.claim_runs("w", streams, 1, timedelta(seconds=30), held=held) == []

        other_id, _ = await backend.create_run(NewRun(new_run_id(), "held", "1", "null"))
        due = await backend.seconds_until_due(streams, held=held)
        assert due is not None and due <= 0
        (other,) = await backend.claim_runs("w", streams, 2, timedelta(seconds=30), held=held)
        assert other.id == other_id
        assert await backend.seconds_until_due(streams, held=held) == pytest.approx(30, abs=5)

        # Its attempt gone, the same worker holding only the other run: the first is recovered.
        now_held = [(other_id, other.lease_token)]
        due = await backend.seconds_until_due(streams, held=now_held)
        assert due is not None and due <= 0
        (again,) = await backend.claim_runs("w", streams, 2, timedelta(seconds=30), held=now_held)
        assert again.id == held_id and again.recoveries == 1 and again.lease_token != first.lease_token


@pytest.mark.parametrize("limit", ["concurrency", "worker_concurrency", "per_key_concurrency"])
async def test_a_queue_limit_counts_the_runs_its_worker_holds_whose_lease_looks_expired(
    make_config: Any, schema: str, limit: str
) -> None:
    """The claim passes a held run whose lease looks expired (a late heartbeat): it must count it as executing
    too, or its slot goes to another run and Queue(concurrency=1) runs two at once until the first ends."""
    queue = Queue(f"one-{schema}", **{limit: 1})  # type: ignore[arg-type]
    async with WorkflowManager(make_config(enable_worker=False)) as manager:
        await manager.declare_queue(queue)
        backend = manager.backend
        streams = [("held", "1")]
        key = "k" if limit == "per_key_concurrency" else None
        held_id, _ = await backend.create_run(
            NewRun(new_run_id(), "held", "1", "null", queue=queue.name, concurrency_key=key)
        )
        (first,) = await backend.claim_runs("w", streams, 2, timedelta(milliseconds=100), queues=[queue.name])
        await asyncio.sleep(0.2)  # its lease runs out in the database; the worker's attempt is alive
        held = [(held_id, first.lease_token)]
        await backend.create_run(NewRun(new_run_id(), "held", "1", "null", queue=queue.name, concurrency_key=key))
        claim = backend.claim_runs("w", streams, 2, timedelta(seconds=30), queues=[queue.name], held=held)
        assert await claim == []  # the one slot is the held run's

        # Its attempt gone (held no more), the slot is free: the first run is taken back before the other.
        (again,) = await backend.claim_runs("w", streams, 2, timedelta(seconds=30), queues=[queue.name])
        assert again.id == held_id and again.recoveries == 1


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sonamu-heartbeat") and t.is_alive()]


async def _count_workers(client: Any, expected: int) -> bool:
    return len(await client.list_workers()) == expected


async def test_a_worker_with_a_long_lease_still_heartbeats_often_enough_to_count_as_live(
    manager_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lists take a worker silent for a minute as gone; a third of a long lease (100 s of 300) would make a
    healthy worker look gone. The heartbeat comes at least every HEARTBEAT_AT_LEAST_EVERY_S (20 s; 0.2 here)."""
    monkeypatch.setattr("sonamu_tasks.worker.HEARTBEAT_AT_LEAST_EVERY_S", 0.2)
    manager = await manager_for([], lease_ms=300_000)
    (first,) = await manager.list_workers()

    async def heartbeat_moved() -> bool:
        (now,) = await manager.list_workers()
        return now.heartbeat_at > first.heartbeat_at

    await wait_until(heartbeat_moved, timeout=5, what="a second heartbeat well before a third of the lease")


def test_failed_heartbeats_are_said_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    """An outage fails every heartbeat: one warning for it, one when they go through again (a warning each
    lease period through an outage, 43 in 75 s, said nothing useful)."""
    failures = heartbeat_failures()
    with caplog.at_level(logging.DEBUG, logger="sonamu_tasks.heartbeat"):
        for _ in range(5):
            failures.failed("PostgreSQL unavailable")
        failures.succeeded()
        failures.succeeded()
        failures.failed("PostgreSQL unavailable")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split(" (")[0].split(",")[0] for m in warnings] == [
        "heartbeat failed",
        "heartbeats go through again",
        "heartbeat failed",
    ]
