"""Waking workers across processes on PostgreSQL: one NOTIFY after the commit, from the process that started
the runs (migration 0013), never inside the inserting transaction, and none where no worker needs waking."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pydantic
import pytest

from sonamu_tasks import WorkflowManager, workflow
from sonamu_tasks.backends.postgres.backend import COPY_AT_LEAST

from .conftest import wait_until
from .test_processes import start_worker  # noqa: F401 - fixture

ONE_STEP = {"name": "one_step", "version": "1"}


@pytest.fixture
def backend_name() -> str:
    return "postgres"  # notifications across processes exist only there


@workflow(version="1")
async def local(input: Any, step: Any) -> Any:
    return await step.define("echo", _echo).run(input)


async def _echo(value: Any) -> Any:
    return value


@workflow(version="1")
async def receives(input: Any, step: Any) -> Any:
    return await step.receive("message", topic="t")


@workflow(version="1")
async def awaits(input: Any, step: Any) -> Any:
    return await step.wait_for_event("event", "ready", key=input)


@workflow(version="1")
async def parent(input: Any, step: Any) -> Any:
    return {"child": await step.run_workflow("child", receives, input)}


def _workflow_of(payload: str) -> str:
    """A payload without the run it names: the notification of one new run names it after a unit separator."""
    return payload.partition("\x1f")[0]


class Listener:
    """A LISTEN on the schema's channel; `until_marker` collects the payloads received before our own marker."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.channel = f"sonamu_tasks:{schema}"
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> Listener:
        self.conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        await self.conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        await self.conn.close()

    async def until_marker(self) -> list[str]:
        """Notifications are delivered in commit order: everything committed before the marker comes first."""
        assert self.conn is not None
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as other:
            await other.execute("SELECT pg_notify(%s, 'marker')", [self.channel])
        payloads = []
        async for notify in self.conn.notifies(timeout=15):
            if notify.payload == "marker":
                return payloads
            payloads.append(notify.payload)
        raise AssertionError("the marker notification did not arrive within 15 s")


async def test_a_run_started_in_another_process_is_picked_up_by_its_notification_not_by_polling(
    make_config: Any,
    start_worker: Any,  # noqa: F811
) -> None:
    # Given a worker process that would poll only once a minute, started and idle
    worker = start_worker("idle", poll_ms=60_000, workflows="one_step")
    async with WorkflowManager(make_config(enable_worker=False)) as client:
        await wait_until(client.list_workers, what="the worker to register")
        loop = asyncio.get_running_loop()
        for index in range(3):
            # When a process without a worker starts a run
            began = loop.time()
            result = await client.run(ONE_STEP, index)
            # Then the worker runs it at once: woken by the NOTIFY sent after the insert's commit
            assert await result.result(timeout=20) == {"input": index, "ran_in": worker.pid}
            assert loop.time() - began < 20  # far below the minute the worker would otherwise sleep


async def test_a_message_or_event_from_another_process_wakes_a_waiting_run_by_notification_not_polling(
    make_config: Any,
    start_worker: Any,  # noqa: F811
    database_url: str,
    schema: str,
) -> None:
    # Given runs waiting for a message and for an event on a worker process that would poll only once a minute
    start_worker("idle", poll_ms=60_000, workflows="collect,awaits_event")
    collect = {"name": "collect", "version": "1"}
    awaits = {"name": "awaits_event", "version": "1"}
    async with Listener(database_url, schema) as listener, WorkflowManager(make_config(enable_worker=False)) as client:
        await wait_until(client.list_workers, what="the worker to register")
        receiving = await client.run(collect, {"n": 2})
        waiting = [await client.run(awaits, "k") for _ in range(3)]

        async def all_waiting() -> bool:
            runs = [await client.get_run(h.id) for h in (receiving, *waiting)]
            return all(run.status == "waiting" for run in runs)

        await wait_until(all_waiting, what="the runs to wait")
        await listener.until_marker()  # what the starts sent
        # When a process without a worker sends the messages (concurrently) and emits the event
        await asyncio.gather(client.send(receiving.id, "one", topic="t"), client.send(receiving.id, "two", topic="t"))
        assert sorted(await receiving.result(timeout=20)) == ["one", "two"]  # far below the worker's minute of polling
        assert await client.emit("ready", {"go": True}, key="k") == 3
        assert [await h.result(timeout=20) for h in waiting] == [{"go": True}] * 3
        # Then the workers were woken by the senders' NOTIFYs (sent by this process, not by the status trigger
        # inside the sending transactions, which PostgreSQL would deliver just the same: see migration 0015)
        received = await listener.until_marker()
    assert {"w:collect", "w:awaits_event"} <= set(received)  # woken runs: "w:", claimed without listen_delay


async def test_a_woken_run_is_claimed_at_once_while_new_runs_wait_out_listen_delay(
    make_config: Any, database_url: str, schema: str
) -> None:
    # Given a worker that claims new runs 5 s after their notification and polls once a minute, and a manager
    # without a worker (a web server, say), each listening on its own connection
    worker = WorkflowManager(
        make_config(listen_delay=5000, poll_interval_ms=60_000), workflows=[receives, awaits, parent, local]
    )
    async with (
        Listener(database_url, schema) as listener,
        worker,
        WorkflowManager(make_config(enable_worker=False)) as sender,
    ):
        # And runs started where the worker is (inserted already claimed, they start at once): a parent
        # waiting for its child, which waits for a message, and a run waiting for an event
        waiting_parent = await worker.run(parent, None)
        waiting = await worker.run(awaits, "k")

        async def all_waiting() -> list[Any] | None:
            children = (await sender.list_runs(parent_id=waiting_parent.id)).items
            runs = [await sender.get_run(h.id) for h in (waiting_parent, waiting)] + children
            return children if [r.status for r in runs] == ["waiting"] * 3 else None

        [child] = await wait_until(all_waiting, what="the runs to wait")
        # When the other manager sends the child its message, the child resumes and finishes, and its end
        # wakes the parent: both well within the listen_delay (each waited out the 5 s before)
        await sender.send(child.id, "hello", topic="t")
        assert await sender.handle(waiting_parent.id).result(timeout=2) == {"child": "hello"}
        # And so does a run woken by an event the other manager emits
        assert await sender.emit("ready", "go", key="k") == 1
        assert await sender.handle(waiting.id).result(timeout=2) == "go"
        # While a new run started elsewhere is still claimed only after listen_delay, batching claims
        later = await sender.run(local, "later")
        await asyncio.sleep(1)
        assert (await sender.get_run(later.id)).status == "pending"
        assert await later.result(timeout=20) == "later"
        received = await listener.until_marker()
    # Woken runs are announced as "w:", claimed at once; new runs as "a:", claimed after listen_delay. A lone
    # run()'s notification names the run too
    assert {"w:receives", "w:parent", "w:awaits", "a:local"} <= {_workflow_of(p) for p in received}
    assert f"a:local\x1f{later.id}" in received


@pytest.mark.parametrize("count", [50, COPY_AT_LEAST + 50])  # by INSERT, and by COPY
async def test_run_many_sends_one_notification_after_its_commit(
    make_config: Any, database_url: str, schema: str, count: int
) -> None:
    async with Listener(database_url, schema) as listener:
        client = WorkflowManager(make_config(enable_worker=False))
        await client.start()
        try:
            await client.run_many(local, list(range(count)))
        finally:
            await client.stop()  # sends what is still to send, then closes
        assert await listener.until_marker() == ["a:local"]


class Slow(pydantic.BaseModel):
    n: int

    @pydantic.field_validator("n")
    @classmethod
    def slowly(cls, value: int) -> int:
        time.sleep(0.0003)  # an expensive check: a batch takes a while to prepare, 77 ms per chunk of 256
        return value


@workflow(version="1", schema=Slow)
async def slow_input(input: Slow) -> int:
    return input.n


async def test_a_large_run_many_does_not_hold_back_the_wake_up_of_a_run_started_meanwhile(
    make_config: Any, database_url: str, schema: str
) -> None:
    # A run_many streams its COPY while it validates its inputs; a run() the same process makes meanwhile must
    # reach the workers at once, not once the COPY commits (they would find it at their next poll, 5 s later)
    async with (
        Listener(database_url, schema) as listener,
        WorkflowManager(make_config(enable_worker=False)) as client,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watcher,
    ):

        async def copying() -> bool:
            rows = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY runs %%' AND state = 'active'"
            )
            return (await rows.fetchone())[0] > 0  # type: ignore[index]

        inputs = [{"n": n} for n in range(10_000)]  # 3-4 s of checks: the COPY outlasts the run()
        many = asyncio.create_task(client.run_many(slow_input, inputs))
        await wait_until(copying, what="the run_many's COPY to start", timeout=20)
        await client.run(local, 1)
        assert listener.conn is not None
        async for notify in listener.conn.notifies(timeout=10):
            if _workflow_of(notify.payload) == "a:local":
                break
        else:
            raise AssertionError("no notification for the run() within 10 s")
        # Heard while the COPY was still going: none of its runs committed yet
        stored = await watcher.execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}.runs WHERE workflow_name = 'slow_input'").format(
                psycopg.sql.Identifier(schema)
            )
        )
        assert (await stored.fetchone())[0] == 0  # type: ignore[index]
        assert len(await many) == 10_000


async def test_concurrent_runs_from_one_process_each_follow_a_notification(
    make_config: Any, database_url: str, schema: str
) -> None:
    async with Listener(database_url, schema) as listener:
        client = WorkflowManager(make_config(enable_worker=False))
        await client.start()
        try:
            await asyncio.gather(*(client.run(local, i) for i in range(32)))
        finally:
            await client.stop()
        received = await listener.until_marker()
        # Coalesced: at most one per run (usually far fewer), all the same, and at least one after the last commit
        assert received and {_workflow_of(p) for p in received} == {"a:local"} and len(received) <= 32


async def test_a_run_inserted_already_claimed_by_this_process_notifies_no_worker(
    make_config: Any, database_url: str, schema: str
) -> None:
    async with Listener(database_url, schema) as listener:
        manager = WorkflowManager(make_config(), workflows=[local])
        await manager.start()
        try:
            handle = await manager.run(local, "here")
            assert await handle.result(timeout=10) == "here"
        finally:
            await manager.stop()
        assert [p for p in await listener.until_marker() if p.startswith("a:")] == []


async def test_a_delayed_run_is_not_notified_and_is_found_at_its_start_time(manager_for: Any) -> None:
    manager = await manager_for([local])
    handle = await manager.run(local, "later", start_at="300ms")
    assert await handle.result(timeout=10) == "later"


async def test_result_in_another_process_gets_the_output_from_the_notification_or_by_reading(
    make_config: Any,
    start_worker: Any,  # noqa: F811
    database_url: str,
    schema: str,
) -> None:
    async with Listener(database_url, schema) as listener, WorkflowManager(make_config(enable_worker=False)) as client:
        # Given two runs whose result() waiters here asked to be notified, before any worker runs them
        small = await client.run(ONE_STEP, "small")
        large = await client.run(ONE_STEP, "x" * 10_000)
        results = [asyncio.create_task(handle.result(timeout=30)) for handle in (small, large)]

        async def both_watched() -> bool:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                query = psycopg.sql.SQL("SELECT count(*) FROM {}.run_watches").format(psycopg.sql.Identifier(schema))
                row = await (await conn.execute(query)).fetchone()
                return row is not None and row[0] == 2

        await wait_until(both_watched, what="both waiters to watch their runs")
        # When a worker process runs them
        worker = start_worker("worker", workflows="one_step")
        # Then both waiters get their output: a small one travels in the notification ("o:" + id + ":" + JSON);
        # one too large for a NOTIFY payload does not ("f:" + id), and its waiter reads the run
        assert await results[0] == {"input": "small", "ran_in": worker.pid}
        assert await results[1] == {"input": "x" * 10_000, "ran_in": worker.pid}
        received = await listener.until_marker()
    assert any(p.startswith(f"o:{small.id}:") for p in received)
    assert f"f:{large.id}" in received and not any(p.startswith(f"o:{large.id}") for p in received)


async def test_a_worker_with_a_free_slot_takes_a_notified_new_run_by_its_id(make_config: Any) -> None:
    # The notification of a lone run() names the run: a worker in another process with a free slot and nothing
    # else due takes it by its id (one statement), instead of a claim walking its streams and then asking when
    # the next run is due. (No polls here: a poll's claim in flight would rightly take the run instead.)
    worker = WorkflowManager(make_config(poll_interval_ms=600_000), workflows=[local])
    async with worker, WorkflowManager(make_config(enable_worker=False)) as client:
        backend = worker.backend
        tried: list[str] = []
        taken: list[str] = []
        claimed: list[str] = []
        real_take, real_claim = backend.take_run, backend.claim_runs

        async def take_run(worker_id: str, run_id: str, *args: Any, **kwargs: Any) -> Any:
            tried.append(run_id)
            run = await real_take(worker_id, run_id, *args, **kwargs)
            taken.extend([] if run is None else [run.id])
            return run

        async def claim_runs(*args: Any, **kwargs: Any) -> Any:
            runs = await real_claim(*args, **kwargs)
            claimed.extend(run.id for run in runs)
            return runs

        backend.take_run = take_run  # type: ignore[method-assign]
        backend.claim_runs = claim_runs  # type: ignore[method-assign]
        # The first may meet the worker's first claim in flight; after it, the worker is caught up each time
        first = await client.run(local, 0)
        assert await first.result(timeout=10) == 0
        ids = []
        for n in range(1, 6):
            handle = await client.run(local, n)
            assert await handle.result(timeout=10) == n
            ids.append(handle.id)
        assert taken[-5:] == ids and not set(ids) & set(claimed)
        # A run of a workflow it does not register is not tried (notifications come in commit order: by the time
        # the next run is done, the worker heard the first one)
        elsewhere = await client.run({"name": "registered_elsewhere", "version": "1"}, None)
        after = await client.run(local, "after")
        assert await after.result(timeout=10) == "after"
        assert elsewhere.id not in tried
