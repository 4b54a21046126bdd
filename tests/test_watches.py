"""A result() waiting in another process asks to be notified of the run's end (a watch, migration 0031), on
PostgreSQL. The watch takes no lock on the run's row, so a claim never passes a watched run over; and a finish
never misses a watch set as it finishes: a finish waits for a watch in flight to commit, and a watch meeting a
finish in flight asks again until it has committed (migration 0032)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from sonamu_tasks import Queue, WorkflowManager, workflow
from sonamu_tasks.backends.postgres.queries import QUERIES

from .conftest import wait_until
from .test_wakeups import Listener


@pytest.fixture(params=["postgres", "postgres-pgbouncer-transaction"])
def backend_name(request: pytest.FixtureRequest) -> str:
    """Watches and notifications exist only on PostgreSQL; through a pooler in transaction mode a watch is sent
    as one query (BEGIN to COMMIT). The tests' own connections go to the server directly (postgres_url)."""
    return str(request.param)


@workflow(version="1")
async def noted(input: Any) -> Any:
    return input


async def connect(url: str, schema: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(psycopg.sql.Identifier(schema)))
    return conn


async def watch_in_open_transaction(conn: psycopg.AsyncConnection[Any], run_id: str) -> list[Any]:
    """The watch statement result() sends, its transaction left open: a watch in flight, caught mid-way."""
    await conn.execute("BEGIN")
    return await (await conn.execute(QUERIES["watch_runs"], {"run_ids": [run_id]})).fetchall()


async def stripe(conn: psycopg.AsyncConnection[Any], run_id: str) -> int:
    row = await (await conn.execute("SELECT watch_stripe(%s::uuid)", [run_id])).fetchone()
    assert row is not None
    return int(row[0])


async def blocked(task: asyncio.Task[Any], seconds: float = 0.5) -> bool:
    """True when `task` is still waiting after `seconds` (a lock wait: it would finish in milliseconds)."""
    done, _ = await asyncio.wait([task], timeout=seconds)
    return not done


async def test_a_claim_takes_a_run_whose_result_is_being_watched(
    make_config: Any, manager_for: Any, postgres_url: str, schema: str
) -> None:
    started: list[str] = []

    @workflow(version="1", name="in_order", queue=Queue("in-order", concurrency=1))
    async def in_order(input: Any) -> Any:
        started.append(input)
        return input

    async with WorkflowManager(make_config(enable_worker=False), workflows=[in_order]) as producer:
        # Given two runs in line, the first one's result() watch in flight (uncommitted) as the worker claims
        first = await producer.run(in_order, "first")
        await producer.run(in_order, "second")
        async with await connect(postgres_url, schema) as watcher:
            assert len(await watch_in_open_transaction(watcher, first.id)) == 1  # watched
            await manager_for([in_order], concurrency=1)
            # Then the claim takes the first run, not the one behind it (it passed a locked row over before)
            await wait_until(lambda: started, what="a run to start")
            assert started == ["first"]
            await watcher.execute("COMMIT")  # the first run's finish waits for it (see the next test)
        await wait_until(lambda: len(started) == 2, what="the second run to start")
    assert started == ["first", "second"]


async def test_a_finish_waits_for_a_watch_in_flight_and_notifies_it(
    make_config: Any, postgres_url: str, schema: str
) -> None:
    async with (
        WorkflowManager(make_config(enable_worker=False), workflows=[noted]) as client,
        Listener(postgres_url, schema) as listener,
    ):
        handle = await client.run(noted, "x")
        async with await connect(postgres_url, schema) as watcher, await connect(postgres_url, schema) as finisher:
            # Given a watch in flight (its statement done, its transaction not committed)
            await watch_in_open_transaction(watcher, handle.id)
            # When the run finishes meanwhile (a cancel of the pending run)
            cancel = asyncio.create_task(
                finisher.execute("UPDATE runs SET status = 'canceled' WHERE id = %s", [handle.id])
            )
            # Then the finish waits for the watch's commit, and then finds the watch: it notifies
            assert await blocked(cancel)
            await watcher.execute("COMMIT")
            await cancel
            assert f"f:{handle.id}" in await listener.until_marker()
            # and the watch is gone with the run's end
            assert await (await finisher.execute("SELECT count(*) FROM run_watches")).fetchone() == (0,)


async def test_a_watch_during_a_finish_is_answered_once_it_commits_and_finds_the_run_finished(
    make_config: Any, postgres_url: str, schema: str
) -> None:
    async with WorkflowManager(make_config(enable_worker=False), workflows=[noted]) as client:
        handle = await client.run(noted, "x")
        async with await connect(postgres_url, schema) as finisher:
            # Given a finish in flight (its trigger has looked for watches, its transaction not committed)
            await finisher.execute("BEGIN")
            await finisher.execute("UPDATE runs SET status = 'canceled' WHERE id = %s", [handle.id])
            # When result() asks to be notified meanwhile
            watch = asyncio.create_task(client.backend.watch_run(handle.id))
            # Then it is not answered before the finish commits, and then the run is unwatched (finished: read it)
            assert await blocked(watch)
            await finisher.execute("COMMIT")
            assert await watch is False
            assert await (await finisher.execute("SELECT count(*) FROM run_watches")).fetchone() == (0,)
            assert (await client.get_run(handle.id)).status.value == "canceled"


async def three_of_one_stripe(client: WorkflowManager, conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """Ids of three pending runs whose watches share a stripe (300 runs over 256 stripes: some stripe has 3)."""
    while True:
        handles = await client.run_many(noted, list(range(300)))
        ids = [handle.id for handle in handles]
        rows = await (
            await conn.execute(
                "SELECT array_agg(id::text ORDER BY id) FROM runs WHERE id = ANY(%s::uuid[])"
                " GROUP BY watch_stripe(id) HAVING count(*) >= 3 LIMIT 1",
                [ids],
            )
        ).fetchall()
        if rows:
            return list(rows[0][0][:3])


FINISH = "UPDATE runs SET status = 'completed', output = '1', finished_at = now() WHERE id = %s"


async def test_a_finish_never_queues_behind_a_watch_waiting_for_another_finish(
    make_config: Any, postgres_url: str, schema: str
) -> None:
    async with (
        WorkflowManager(make_config(enable_worker=False), workflows=[noted]) as client,
        await connect(postgres_url, schema) as first,
        await connect(postgres_url, schema) as second,
        await connect(postgres_url, schema) as check,
    ):
        finishing, watched, other = await three_of_one_stripe(client, check)
        # Given a finish held open on a stripe, and a result() watch of another run of that stripe meanwhile
        await first.execute("BEGIN")
        await first.execute(FINISH, [finishing])
        watch = asyncio.create_task(client.backend.watch_run(watched))
        assert await blocked(watch, 0.2)
        # When a third run of the stripe finishes
        await second.execute("BEGIN")
        # Then that finish goes through at once: nothing waits in the stripe's lock queue ahead of it (a watch
        # waiting there made it wait for the first finish's commit)
        await asyncio.wait_for(second.execute(FINISH, [other]), timeout=5)
        await second.execute("COMMIT")
        assert not watch.done()
        await first.execute("COMMIT")
        assert await watch is True  # the watched run is still pending: now watched


async def test_result_of_a_finished_run_is_not_held_up_by_an_open_finish_of_its_stripe(
    make_config: Any, postgres_url: str, schema: str
) -> None:
    async with (
        WorkflowManager(make_config(enable_worker=False), workflows=[noted]) as client,
        await connect(postgres_url, schema) as finisher,
        await connect(postgres_url, schema) as check,
    ):
        done, finishing, _ = await three_of_one_stripe(client, check)
        await check.execute(FINISH, [done])
        # Given another run of the same stripe finishing, its transaction open
        await finisher.execute("BEGIN")
        await finisher.execute(FINISH, [finishing])
        # Then result() on the run completed before answers with its output, within its timeout (it waited
        # for the stripe before reading the status, and timed out with "the database did not answer")
        assert await client.handle(done).result(timeout=2) == 1
        await finisher.execute("COMMIT")


async def test_watches_of_several_runs_never_wait_holding_a_stripe(
    make_config: Any, postgres_url: str, schema: str
) -> None:
    async with (
        WorkflowManager(make_config(enable_worker=False), workflows=[noted]) as client,
        await connect(postgres_url, schema) as conn,
        await connect(postgres_url, schema) as finisher,
    ):
        # Given two pending runs of different stripes, the first one finishing (uncommitted)
        handles = [await client.run(noted, i) for i in range(2)]
        while await stripe(conn, handles[0].id) == await stripe(conn, handles[1].id):
            handles[1] = await client.run(noted, "another")
        finishing, other = handles
        await finisher.execute("BEGIN")
        await finisher.execute("UPDATE runs SET status = 'canceled' WHERE id = %s", [finishing.id])
        # When one statement watches both (result() calls in flight together share it)
        both = asyncio.create_task(client.backend._watch_runs([finishing.id, other.id]))
        # Then the other run's watch is committed at once, without waiting for the finish (no stripe is held
        # while the finishing run is asked again), and once the finish commits that run is finished: unwatched
        await wait_until(
            lambda: _watched(conn, other.id),
            what="the other run's watch to commit while the finishing run's waits",
        )
        assert not both.done()
        await finisher.execute("COMMIT")
        assert await both == [False, True]


async def _watched(conn: psycopg.AsyncConnection[Any], run_id: str) -> bool:
    row = await (await conn.execute("SELECT count(*) FROM run_watches WHERE run_id = %s", [run_id])).fetchone()
    return row == (1,)


async def test_every_watch_that_meets_a_finish_is_notified(
    make_config: Any, manager_for: Any, postgres_url: str, schema: str
) -> None:
    # Given a worker in another manager (its finishes reach this client only by notification), and result()
    # asked at staggered moments after each run(), so that many watches land while their run is finishing
    await manager_for([noted], concurrency=32)
    async with (
        WorkflowManager(make_config(enable_worker=False), workflows=[noted]) as client,
        Listener(postgres_url, schema) as listener,
    ):
        watched: set[str] = set()
        watch_run = client.backend.watch_run

        async def recording_watch(run_id: str) -> bool:
            is_watched = await watch_run(run_id)
            if is_watched:
                watched.add(run_id)
            return is_watched

        client.backend.watch_run = recording_watch  # type: ignore[method-assign]

        async def run_and_wait(index: int) -> Any:
            handle = await client.run(noted, index)
            await asyncio.sleep((index % 17) / 2000)
            return await handle.result(timeout=30)

        outputs = await asyncio.gather(*(run_and_wait(i) for i in range(600)))
        assert sorted(outputs) == list(range(600))
        # Then every run whose watch was set got its "finished" notification: none was left to the 5 s re-read
        notified = {payload.split(":")[1] for payload in await listener.until_marker() if payload[:2] in ("o:", "f:")}
        assert watched, "no watch was set: the test raced nothing"
        assert watched <= notified, f"{len(watched - notified)} watched runs finished without a notification"
