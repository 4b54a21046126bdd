"""The engine embedded in a web process: a SyncClient closed while request threads wait on it, used after a
fork, called from its own callbacks or after close; a manager started again after stop (a second lifespan);
a run whose insert committed though its answer was lost; calls still made while Python exits. On every backend
(see BACKENDS)."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import queue
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from sonamu_tasks import SyncClient, WorkflowManager, workflow
from sonamu_tasks.backends.group_commit import GroupCommit
from sonamu_tasks.backends.postgres.backend import COPY_AT_LEAST
from sonamu_tasks.errors import BackendClosed, BackendUnavailable, SonamuTasksError
from sonamu_tasks.reconnect import connection_wait, until_available

from .conftest import ConfigFactory

NOBODY_SERVES_THIS = {"name": "nobody_serves_this", "version": "1"}
HANG = 20.0
"""How long a thread may take to answer before the test calls it hung (they answer in milliseconds)."""


@workflow(version="1")
async def embed_echo(input: Any, step: Any) -> Any:
    return await step.define("echo", lambda: {"echo": input}).run()


@pytest.fixture
def client(make_config: ConfigFactory) -> Iterator[SyncClient]:
    sync_client = SyncClient(make_config(enable_worker=False))
    yield sync_client
    sync_client.close()


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """`call()` on a thread of its own (a request thread); the list gets what it returned or raised."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("timeout", [None, 60.0])
def test_closing_a_sync_client_ends_the_waits_of_other_threads_with_backend_closed(
    client: SyncClient, timeout: float | None
) -> None:
    # Given request threads waiting on a run nothing executes
    handle = client.run(NOBODY_SERVES_THIS, {})
    calls = [
        lambda: handle.result(timeout=timeout),
        lambda: handle.get_event("state", timeout=timeout),
        lambda: client.wait_until_finished(handle.id, timeout=timeout),
    ]
    waiting = [in_thread(call) for call in calls]
    waiters = client.manager.waiters._events  # registered: the threads are inside their waits
    wait_for(lambda: len(waiters.get(handle.id, ())) == len(calls), "the threads to wait")

    # When another thread (the server's shutdown) closes the client
    client.close()

    # Then every wait ends now with BackendClosed, not at its timeout, nor never
    for thread, outcome in waiting:
        thread.join(HANG)
        assert not thread.is_alive(), "a thread waiting on the client still waits after close()"
        assert isinstance(outcome[0], BackendClosed), outcome


def test_a_sync_client_used_after_close_raises_backend_closed(client: SyncClient) -> None:
    handle = client.run(NOBODY_SERVES_THIS, {})
    client.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BackendClosed, match="closed"):
            client.run(NOBODY_SERVES_THIS, {})
        with pytest.raises(BackendClosed):
            handle.result(timeout=1)
        gc.collect()  # a coroutine made and never awaited warns when it is collected
    assert [str(w.message) for w in caught] == []
    client.close()  # a second close does nothing


def test_a_sync_client_made_before_a_fork_refuses_calls_in_the_child(client: SyncClient) -> None:
    # Given a client made before the fork (gunicorn --preload), used in the parent
    client.run(NOBODY_SERVES_THIS, {})
    answers: multiprocessing.Queue[tuple[str, str]] = multiprocessing.get_context("fork").Queue()

    def child() -> None:
        try:
            client.run(NOBODY_SERVES_THIS, {})
            answers.put(("ok", ""))
        except BaseException as error:
            answers.put((type(error).__name__, str(error)))
        client.close()  # the parent's to close: nothing to do here, and no hang

    # When the child calls it
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    try:
        kind, message = answers.get(timeout=HANG)
    except queue.Empty:
        pytest.fail("a client call in a forked child did not return")
    finally:
        process.join(HANG)
        if process.is_alive():
            process.kill()

    # Then it is refused at once, saying what to do; the parent's client goes on working
    assert kind == "SonamuTasksError", message
    assert "before a fork" in message and "after forking" in message
    assert process.exitcode == 0
    assert len(client.list_runs().items) == 1


async def test_a_manager_started_before_a_fork_refuses_to_start_in_the_child(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)
    answers: multiprocessing.Queue[str] = multiprocessing.get_context("fork").Queue()

    def child() -> None:
        try:
            asyncio.run(manager.start())
            answers.put("started")
        except SonamuTasksError as error:
            answers.put(str(error))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    answer = await asyncio.to_thread(answers.get, timeout=HANG)
    await asyncio.to_thread(process.join, HANG)
    assert "before a fork" in answer


def test_a_sync_client_called_from_its_own_thread_refuses_instead_of_deadlocking(client: SyncClient) -> None:
    # Given a finished run to purge, and a progress callback (run on the client's thread) that calls the client
    client.cancel(client.run(NOBODY_SERVES_THIS, {}).id)

    def progress(deleted: int, total: int) -> None:
        client.list_runs()

    # When purge calls it
    thread, outcome = in_thread(lambda: client.purge("0s", progress=progress))
    thread.join(HANG)

    # Then the call is refused with an error that says why, and the client still serves every thread
    assert not thread.is_alive(), "a client call from the client's own thread deadlocked it"
    assert isinstance(outcome[0], SonamuTasksError) and "own thread" in str(outcome[0]), outcome
    thread, outcome = in_thread(lambda: client.list_runs())
    thread.join(HANG)
    assert not thread.is_alive() and not isinstance(outcome[0], BaseException), outcome


def test_a_manager_starts_again_after_it_was_stopped(make_config: ConfigFactory) -> None:
    # A module-level manager whose lifespan runs twice (a test client per test), each time on a new event loop.
    manager = WorkflowManager(make_config(), workflows=[embed_echo])

    async def lifespan(value: int) -> Any:
        async with manager:
            handle = await manager.run(embed_echo, value)
            return await handle.result(timeout=HANG)

    assert asyncio.run(lifespan(1)) == {"echo": 1}
    assert asyncio.run(lifespan(2)) == {"echo": 2}


def losing_the_first_answer(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`call`, whose first answer is lost after its commit (a connection dropped before the reply)."""
    answered = []

    async def lossy(*args: Any, **kwargs: Any) -> Any:
        result = await call(*args, **kwargs)
        if not answered:
            answered.append(result)
            raise BackendUnavailable("connection lost after the commit, before the answer")
        return result

    return lossy


async def test_a_run_whose_insert_committed_but_lost_its_answer_is_reported_created(manager_for: Any) -> None:
    # Given inserts whose first commit's answer is lost (the call is made again, finding the run it inserted)
    manager = await manager_for([], enable_worker=False)
    backend = manager.backend
    backend.create_run = losing_the_first_answer(backend.create_run)  # type: ignore[method-assign]
    create_runs = backend.create_runs
    backend.create_runs = losing_the_first_answer(create_runs)  # type: ignore[method-assign]

    # When run() and run_many() are called without idempotency keys
    handle = await manager.run(NOBODY_SERVES_THIS, {"order": 1})
    handles = await manager.run_many(NOBODY_SERVES_THIS, [{"order": 2}, {"order": 3}])

    # Then each run was stored once, and each call says it created its run (created=False means "found by key")
    assert handle.created
    assert [h.created for h in handles] == [True, True]
    assert len((await manager.list_runs()).items) == 3
    # And so does a run_many large enough for PostgreSQL's COPY (sent again, it finds the ids it committed)
    backend.create_runs = losing_the_first_answer(create_runs)  # type: ignore[method-assign]
    many = await manager.run_many(NOBODY_SERVES_THIS, [{"order": n} for n in range(COPY_AT_LEAST + 20)])
    assert all(h.created for h in many) and len({h.id for h in many}) == COPY_AT_LEAST + 20
    assert len((await manager.list_runs(limit=1000)).items) == 3 + COPY_AT_LEAST + 20


async def test_a_run_claimed_at_insert_whose_answer_was_lost_is_reported_created(manager_for: Any) -> None:
    # This process's worker serves it: inserted already claimed (create_claimed_run)
    manager = await manager_for([embed_echo])
    backend = manager.backend
    backend.create_claimed_run = losing_the_first_answer(backend.create_claimed_run)  # type: ignore[method-assign]
    handle = await manager.run(embed_echo, 7)
    assert handle.created
    assert await handle.result(timeout=HANG) == {"echo": 7}  # claimed again once the lost claim's lease ends
    assert len((await manager.list_runs()).items) == 1


async def test_a_group_commit_batch_waits_for_a_connection_no_longer_than_its_callers() -> None:
    # The wait for a pooled connection (connection_wait) during an outage is what outlasted run()'s 30 s.
    waits: list[float] = []

    async def flush(items: list[str]) -> list[bool]:
        waits.append(connection_wait(30.0))
        return [True for _ in items]

    group: GroupCommit[str, bool] = GroupCommit(flush, in_flight=1)

    def submitting(item: str, give_up_after_s: float | None) -> Awaitable[bool]:
        return until_available(lambda: group.submit(item), what="start run", give_up_after_s=give_up_after_s)

    # A lone caller's batch gives up with it
    await submitting("a", 2.0)
    assert waits[-1] <= 2.0
    # A batch of callers waits for the one that gives up last, and not beyond
    waits.clear()
    await asyncio.gather(submitting("first", 1.0), submitting("b", 2.0), submitting("c", 4.0))
    assert 2.0 < waits[-1] <= 4.0
    # A caller without a deadline: the pool's own timeout
    await asyncio.gather(submitting("first", 1.0), submitting("d", None))
    assert waits[-1] == 30.0


EXIT_SCRIPT = """
import sys, threading
from sonamu_tasks import SyncClient
from sonamu_tasks.errors import BackendClosed

client = SyncClient({"database_url": sys.argv[1], "tasks": {"enable_worker": False}})
handle = client.run({"name": "nobody_serves_this", "version": "1"}, {})

def waiter():
    try:
        handle.result(timeout=5)
    except BaseException as error:
        print("waiter:", type(error).__name__, error, flush=True)

threading.Thread(target=waiter).start()  # not a daemon: still waiting when the main thread ends
"""


def test_a_call_made_while_python_exits_raises_backend_closed_on_sqlite(tmp_path: Any) -> None:
    script = tmp_path / "exiting.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    url = f"sqlite:///{tmp_path / 'exit.db'}"
    done = subprocess.run([sys.executable, str(script), url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "waiter: BackendClosed" in done.stdout, done.stdout + done.stderr


ATEXIT_SCRIPT = """
import atexit, sys
from sonamu_tasks import SyncClient

config = {"database_url": sys.argv[1], "schema": sys.argv[2], "tasks": {"enable_worker": False}}
client = SyncClient(config)
client.run({"name": "nobody_serves_this", "version": "1"}, {})
atexit.register(client.close)  # a plain atexit handler: runs after Python stopped its thread pools
"""


def test_a_sync_client_closes_cleanly_from_a_plain_atexit_handler(
    tmp_path: Any, database_url: str, schema: str
) -> None:
    script = tmp_path / "atexit_close.py"
    script.write_text(textwrap.dedent(ATEXIT_SCRIPT))
    command = [sys.executable, str(script), database_url, schema]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Error" not in done.stderr, done.stderr
