"""run_many: many runs in one statement, on every backend (see BACKENDS)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import psycopg
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonamu_tasks import InvalidInput, InvalidName, SerializationError, WorkflowManager, define_config, workflow
from sonamu_tasks.backends.base import NewRun
from sonamu_tasks.backends.postgres import backend as postgres_backend
from sonamu_tasks.backends.postgres.backend import COPY_AT_LEAST, PostgresBackend
from sonamu_tasks.errors import InvalidValue
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.run_creation import RunBatch, RunOptions, prepare_run

T = TypeVar("T")


class Order(pydantic.BaseModel):
    order_id: int


@workflow(version="1", schema=Order)
async def confirm(input: Order) -> int:
    return input.order_id * 10


async def test_run_many_starts_every_run_and_returns_handles_in_input_order(manager_for: Any) -> None:
    manager = await manager_for([confirm], concurrency=8)
    handles = await manager.run_many(confirm, [{"order_id": i} for i in range(500)])
    assert len(handles) == 500 and all(h.created for h in handles)
    results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    assert results == [i * 10 for i in range(500)]


async def test_run_many_keys_per_item_find_existing_runs(manager_for: Any) -> None:
    manager = await manager_for([confirm])
    first = await manager.run(confirm, {"order_id": 1}, idempotency_key="order-1")
    handles = await manager.run_many(
        confirm, [{"order_id": 1}, {"order_id": 2}, {"order_id": 2}], idempotency_keys=["order-1", "order-2", "order-2"]
    )
    assert handles[0].id == first.id and not handles[0].created
    assert handles[1].created and handles[2].id == handles[1].id and not handles[2].created
    assert [await h.result(timeout=15) for h in handles] == [10, 20, 20]


async def test_concurrent_run_calls_each_get_their_own_run_and_repeated_keys_one_run(manager_for: Any) -> None:
    # On PostgreSQL run() calls in flight together share one insert (a group commit): each caller must still
    # get its own run, and callers repeating a key the one run of that key, created for exactly one of them.
    manager = await manager_for([confirm], enable_worker=False)
    keys = [f"order-{i % 10}" if i % 2 else None for i in range(60)]
    handles = await asyncio.gather(*(manager.run(confirm, {"order_id": i}, idempotency_key=keys[i]) for i in range(60)))
    unkeyed = [handle for handle, key in zip(handles, keys, strict=True) if key is None]
    assert all(handle.created for handle in unkeyed) and len({handle.id for handle in unkeyed}) == 30
    for key in set(filter(None, keys)):
        same = [handle for handle, k in zip(handles, keys, strict=True) if k == key]
        assert len({handle.id for handle in same}) == 1 and sum(handle.created for handle in same) == 1
    stored = {run.id: run.input for run in (await manager.list_runs(limit=100)).items}
    assert len(stored) == 30 + len(set(filter(None, keys)))  # 5 keys
    for index, handle in enumerate(handles):
        if keys[index] is None:
            assert stored[handle.id] == {"order_id": index}


async def test_a_bad_item_refuses_the_whole_call_naming_it_and_stores_nothing(manager_for: Any) -> None:
    manager = await manager_for([confirm], enable_worker=False)
    with pytest.raises(InvalidInput, match=r"inputs\[2\]: order_id"):
        await manager.run_many(confirm, [{"order_id": 1}, {"order_id": 2}, {"order_id": "x"}])
    with pytest.raises(SerializationError, match=r"inputs\[1\]"):
        await manager.run_many({"name": "other", "version": "1"}, [1, object()])
    with pytest.raises(InvalidName, match=r"inputs\[0\]: idempotency_key"):
        await manager.run_many(confirm, [{"order_id": 1}], idempotency_keys=[" "])
    # An option of the whole call is named as such, not after the first input
    with pytest.raises(InvalidValue, match=r"^priority"):
        await manager.run_many(confirm, [{"order_id": 1}, {"order_id": 2}], priority=2**40)
    with pytest.raises(InvalidValue, match=r"^start_at must be a timezone-aware"):
        await manager.run_many(confirm, [{"order_id": 1}], start_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="2 inputs but 1 idempotency_keys"):
        await manager.run_many(confirm, [{"order_id": 1}, {"order_id": 2}], idempotency_keys=["a"])
    assert (await manager.list_runs()).items == []
    assert await manager.run_many(confirm, []) == []


async def stored_runs(manager: Any) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    cursor = None
    while True:
        page = await manager.list_runs(limit=1000, cursor=cursor)
        runs.update((run.id, run) for run in page.items)
        if (cursor := page.next_cursor) is None:
            return runs


# A large run_many: every item validated first, one statement.
LARGE = 4500


async def test_a_bad_item_far_into_a_large_call_refuses_the_whole_call_and_stores_nothing(manager_for: Any) -> None:
    manager = await manager_for([confirm], enable_worker=False)
    inputs: list[Any] = [{"order_id": i} for i in range(LARGE)]
    inputs[2345] = {"order_id": "x"}
    inputs[4321] = {"order_id": "y"}
    with pytest.raises(InvalidInput, match=r"inputs\[2345\]: order_id"):
        await manager.run_many(confirm, inputs)
    with pytest.raises(SerializationError, match=r"inputs\[4100\]"):
        await manager.run_many({"name": "other", "version": "1"}, [*range(4100), object(), *range(300)])
    keys: list[str | None] = [f"k{i}" for i in range(LARGE)]
    keys[LARGE - 1] = ""
    with pytest.raises(InvalidName, match=rf"inputs\[{LARGE - 1}\]: idempotency_key"):
        await manager.run_many(confirm, [{"order_id": i} for i in range(LARGE)], idempotency_keys=keys)
    assert (await manager.list_runs()).items == []
    # and the next call goes through
    assert len(await manager.run_many(confirm, [{"order_id": i} for i in range(LARGE)])) == LARGE


async def test_a_large_run_many_finds_existing_runs_by_key(manager_for: Any) -> None:
    manager = await manager_for([confirm], enable_worker=False)
    first = await manager.run(confirm, {"order_id": 2701}, idempotency_key="order-2701")
    keys: list[str | None] = [f"order-{i}" if i % 3 else None for i in range(LARGE)]
    keys[4400] = keys[4]  # the same key twice in the call: one run
    handles = await manager.run_many(confirm, [{"order_id": i} for i in range(LARGE)], idempotency_keys=keys)
    assert handles[2701].id == first.id and not handles[2701].created
    assert handles[4400].id == handles[4].id and handles[4].created and not handles[4400].created
    assert sum(h.created for h in handles) == LARGE - 2
    assert len({h.id for h in handles}) == LARGE - 1
    stored = await stored_runs(manager)
    assert len(stored) == LARGE - 1
    for index in (0, 1999, 2000, 2001, 4001, LARGE - 1):
        assert stored[handles[index].id].input == {"order_id": index}
        assert stored[handles[index].id].idempotency_key == keys[index]


@pytest.mark.parametrize("backend_name", ["postgres"])
@pytest.mark.parametrize("count", [2, LARGE])
async def test_a_batch_sent_again_gives_the_runs_it_stored(manager_for: Any, count: int) -> None:
    # The case a run_many retried after its commit's answer was lost: the same ids again. Each comes back as
    # created (this call's runs), stored once; created=False is for a run found by its idempotency key.
    manager = await manager_for([confirm], enable_worker=False)
    runs = list(
        RunBatch(
            confirm.name,
            confirm.version,
            confirm,
            [{"order_id": i} for i in range(count)],
            RunOptions(),
            [None] * count,
            [None] * count,
            what=str,
        )
    )
    # alike: LARGE goes by COPY, which then meets its own ids and hands over to the INSERT, which finds them
    assert await manager.backend.create_runs(runs, alike=True) == [(run.id, True) for run in runs]
    assert await manager.backend.create_runs(runs[::-1], alike=True) == [(run.id, True) for run in runs[::-1]]
    fresh = list(
        RunBatch(confirm.name, confirm.version, confirm, [{"order_id": -1}], RunOptions(), [None], [None], what=str)
    )
    mixed = [runs[0], *fresh, runs[-1]]
    assert await manager.backend.create_runs(mixed) == [(runs[0].id, True), (fresh[0].id, True), (runs[-1].id, True)]
    assert len(await stored_runs(manager)) == count + 1


def _days_across_a_daylight_saving_change(zone: str) -> int:
    """A number of days from now whose end is at another UTC offset in `zone` than now."""
    now = datetime.now(ZoneInfo(zone))
    for days in range(1, 400):
        if (now + timedelta(days=days)).utcoffset() != now.utcoffset():
            return days
    raise AssertionError(f"{zone} has no daylight saving within 400 days")


def _with_parameter(url: str, parameter: str) -> str:
    return url + ("&" if "?" in url else "?") + parameter


@pytest.mark.parametrize("backend_name", ["postgres"])
async def test_delays_are_elapsed_time_in_a_session_whose_time_zone_keeps_daylight_saving(
    backend_name: str, postgres_url: str, schema: str
) -> None:
    # A server whose TimeZone changes its offset within the delay: run(), a run_many by INSERT and one by COPY
    # all start and end their runs that much elapsed time later (a day is 86,400 s, not a calendar day)
    days = _days_across_a_daylight_saving_change("America/New_York")
    url = _with_parameter(postgres_url, "options=-c%20TimeZone%3DAmerica%2FNew_York")
    delay, deadline = timedelta(days=days), timedelta(days=days, hours=1)
    async with WorkflowManager(define_config(database_url=url, schema=schema, tasks={"enable_worker": False})) as m:
        ids = [(await m.run(confirm, {"order_id": 1}, start_at=delay, deadline=deadline)).id]
        for count in (3, COPY_AT_LEAST):
            handles = await m.run_many(confirm, [{"order_id": 2}] * count, start_at=delay, deadline=deadline)
            ids += [handle.id for handle in handles]
    query = (
        "SELECT DISTINCT extract(epoch FROM available_at) - extract(epoch FROM created_at),"
        " extract(epoch FROM deadline_at) - extract(epoch FROM created_at) FROM runs WHERE id = ANY(%s::uuid[])"
    )
    with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as conn:
        assert conn.execute(query, [ids]).fetchall() == [(delay.total_seconds(), deadline.total_seconds())]


@pytest.mark.parametrize("backend_name", ["postgres"])
async def test_names_go_in_the_connection_encoding(backend_name: str, postgres_url: str, schema: str) -> None:
    # A connection whose client_encoding is not UTF-8 (a LATIN1 database, or a URL asking for it): a run_many's
    # COPY stores its names and keys as run() does, not their UTF-8 bytes read as LATIN1
    url = _with_parameter(postgres_url, "client_encoding=LATIN1")
    spec = {"name": "café", "version": "é1"}
    async with WorkflowManager(define_config(database_url=url, schema=schema, tasks={"enable_worker": False})) as m:
        alone = await m.run(spec, {"n": 1}, queue="file-à-part", concurrency_key="clé")
        handles = await m.run_many(spec, [{"n": 2}] * COPY_AT_LEAST, queue="file-à-part", concurrency_key="clé")
    query = "SELECT DISTINCT workflow_name, version, queue, concurrency_key FROM runs WHERE id = ANY(%s::uuid[])"
    with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as conn:
        stored = conn.execute(query, [[alone.id, *(handle.id for handle in handles)]]).fetchall()
    assert stored == [("café", "é1", "file-à-part", "clé")]


class SlowOrder(pydantic.BaseModel):
    order_id: int

    @pydantic.field_validator("order_id")
    @classmethod
    def slowly(cls, value: int) -> int:
        time.sleep(0.002)  # an expensive check: 600 inputs take over a second to prepare
        return value


@workflow(version="1", schema=SlowOrder)
async def confirm_slowly(input: SlowOrder) -> int:
    return input.order_id


@pytest.mark.parametrize("backend_name", ["postgres"])
async def test_a_statement_timeout_counts_only_the_copy_not_the_inputs_preparation(
    backend_name: str, postgres_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A statement_timeout shorter than the inputs take to validate: the runs are all prepared before the COPY
    # begins, which then takes a few ms; streamed as prepared, the COPY would be cut by the timeout at every try
    url = _with_parameter(postgres_url, "options=-c%20statement_timeout%3D500")
    async with WorkflowManager(define_config(database_url=url, schema=schema, tasks={"enable_worker": False})) as m:
        with caplog.at_level(logging.WARNING):
            handles = await m.run_many(confirm_slowly, [{"order_id": n} for n in range(COPY_AT_LEAST + 100)])
    assert len({handle.id for handle in handles}) == COPY_AT_LEAST + 100
    assert not [record for record in caplog.records if "statement timeout" in record.getMessage()]


# Property: PostgreSQL's create_runs stores each run of any batch, whatever its runs share or not (workflow,
# times, parent, trace context, queue, keys...), as the single-row create_run stores it, and answers repeated
# keys the same way. Chunks of 3 here, so batches go in several statements too.


class Store:
    """A PostgresBackend on a schema of its own, in a thread with its own event loop (for hypothesis)."""

    def __init__(self, url: str) -> None:
        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="store", daemon=True)
        self.thread.start()
        self.backend = PostgresBackend(url, schema=self.schema)
        self.call(self.backend.open())
        self.call(self.backend.migrate())
        self.call(self.backend.register_queues([], [("a", "1", "qa"), ("b", "2", "qb")]))

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def rows(self, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """Each run as stored, its times relative to its creation unless absolute ones were given."""
        query = (
            "SELECT id::text, workflow_name, version, status, input, idempotency_key, available_at, deadline_at,"
            " available_at - created_at, deadline_at - created_at, parent_id::text, parent_step, detached,"
            " trace_context, queue, priority, concurrency_key FROM runs WHERE id = ANY(%s::uuid[])"
        )
        with psycopg.connect(self.url, options=f"-c search_path={self.schema}") as conn:
            return {row[0]: row[1:] for row in conn.execute(query, [ids]).fetchall()}

    def close(self) -> None:
        self.call(self.backend.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


@pytest.fixture(scope="module")
def store(postgres_url: str) -> Iterator[Store]:
    running = Store(postgres_url)
    yield running
    running.close()


MOMENT = datetime(2031, 5, 17, 8, 30, 15, 123456, tzinfo=UTC)
# Durations in whole milliseconds: a duration goes as seconds (float8) in a batch and as an interval alone,
# which can differ by a microsecond in long ones (as before these changes).
DELAYS = st.integers(min_value=0, max_value=10**10).map(lambda ms: timedelta(milliseconds=ms))
RUN_FIELDS = st.fixed_dictionaries(
    {
        "workflow": st.sampled_from([("a", "1"), ("b", "2"), ("c", "1")]),
        "input": st.none() | st.integers() | st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
        "key": st.sampled_from([None, None, "k1", "k2"]),
        "start_at": st.sampled_from([None, MOMENT]),
        "start_delay": st.none() | DELAYS,
        "deadline_at": st.sampled_from([None, MOMENT + timedelta(days=1)]),
        "deadline_delay": st.none() | DELAYS,
        "parent": st.sampled_from([None, ("01a23200-0000-7000-8000-000000000001", "step-1")]),
        "detached": st.booleans(),
        "trace_context": st.sampled_from([None, '{"traceparent": "00-abc-def-01"}']),
        "queue": st.sampled_from([None, None, "default", "q1"]),
        "priority": st.sampled_from([0, 0, -5, 7]),
        "concurrency_key": st.sampled_from([None, "c1", "c2"]),
    }
)
BATCHES = st.one_of(
    st.lists(RUN_FIELDS, min_size=2, max_size=8),  # mixed
    st.tuples(RUN_FIELDS, st.integers(2, 8)).map(lambda pair: [pair[0]] * pair[1]),  # all alike
)


def new_run(fields: dict[str, Any], prefix: str) -> NewRun:
    name, version = fields["workflow"]
    parent_id, parent_step = fields["parent"] or (None, None)
    start_at = fields["start_at"]
    return NewRun(
        id=new_run_id(),
        workflow_name=name,
        version=version,
        input_json=json.dumps(fields["input"]),
        idempotency_key=prefix + fields["key"] if fields["key"] else None,
        start_at=start_at,
        start_delay=fields["start_delay"] if start_at is None else None,
        deadline_at=fields["deadline_at"],
        deadline_delay=fields["deadline_delay"] if fields["deadline_at"] is None else None,
        parent_id=parent_id,
        parent_step=parent_step,
        detached=fields["detached"],
        trace_context=fields["trace_context"],
        queue=fields["queue"],
        priority=fields["priority"],
        concurrency_key=fields["concurrency_key"],
    )


def comparable(row: tuple[Any, ...], run: NewRun, prefix: str) -> tuple[Any, ...]:
    name, version, status, input, key, available_at, deadline_at, available_in, deadline_in, *rest = row
    return (
        name,
        version,
        status,
        input,
        key.removeprefix(prefix) if key else key,
        available_at if run.start_at else available_in,
        deadline_at if run.deadline_at else deadline_in,
        *rest,
    )


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=BATCHES)
def test_a_batch_stores_each_run_as_a_lone_insert_does(store: Store, batch: list[dict[str, Any]]) -> None:
    stored_as_alone(store, batch)


# The same for the runs a run_many sends by COPY (alike: no idempotency key, each run the first but for its input
# and concurrency key), with the COPY's threshold lowered so that these small batches go that way.
COPYABLE_BATCHES = st.tuples(RUN_FIELDS, st.lists(RUN_FIELDS, min_size=1, max_size=7)).map(
    lambda batch: [
        {**batch[0], "input": fields["input"], "concurrency_key": fields["concurrency_key"], "key": None}
        for fields in [batch[0], *batch[1]]
    ]
)


@contextlib.contextmanager
def copy_at_least(count: int) -> Iterator[None]:
    before = postgres_backend.COPY_AT_LEAST
    postgres_backend.COPY_AT_LEAST = count
    try:
        yield
    finally:
        postgres_backend.COPY_AT_LEAST = before


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=COPYABLE_BATCHES)
def test_a_copied_batch_stores_each_run_as_a_lone_insert_does(store: Store, batch: list[dict[str, Any]]) -> None:
    copied: list[int] = []
    copy_runs = store.backend._copy_runs

    async def counted(runs: Any, **options: Any) -> bool | None:
        copied.append(len(runs))
        return await copy_runs(runs, **options)

    store.backend._copy_runs = counted  # type: ignore[method-assign]
    try:
        with copy_at_least(2):
            stored_as_alone(store, batch, copied=True)
    finally:
        del store.backend._copy_runs
    assert copied == [len(batch)]  # the batch went by COPY


def stored_as_alone(store: Store, batch: list[dict[str, Any]], *, copied: bool = False) -> None:
    """create_runs(batch) stores each run as create_run stores it alone (and finds the same runs by key)."""
    example = uuid.uuid4().hex[:8]
    together = [new_run(fields, f"{example}-batch-") for fields in batch]
    alone = [new_run(fields, f"{example}-alone-") for fields in batch]
    created_together = store.call(store.backend.create_runs(together, alike=copied))
    created_alone = [store.call(store.backend.create_run(run)) for run in alone]
    # The same runs created, the same runs found for a repeated key (by position in the batch).
    assert [created for _, created in created_together] == [created for _, created in created_alone]
    ids_together, ids_alone = [run_id for run_id, _ in created_together], [run_id for run_id, _ in created_alone]
    assert [ids_together.index(run_id) for run_id in ids_together] == [ids_alone.index(i) for i in ids_alone]
    rows = store.rows([run.id for run in together + alone])
    for index, (run_together, run_alone) in enumerate(zip(together, alone, strict=True)):
        if created_together[index][1]:
            expected = comparable(rows[run_alone.id], run_alone, f"{example}-alone-")
            assert comparable(rows[run_together.id], run_together, f"{example}-batch-") == expected


# Property: RunBatch prepares each item as prepare_run does (what run_many did item by item before), or
# refuses the first bad item with prepare_run's error, naming its index.

KEYS = st.sampled_from([None, None, "key", "other", "", " ", "x" * 300, "a\x00b", "\ud800"])
ITEMS = st.one_of(
    st.fixed_dictionaries({"order_id": st.integers(-5, 5) | st.sampled_from(["x", "7", None, 1.5])}),
    st.sampled_from([{}, None, float("nan"), "\x00", {"order_id": 1, "extra": [1, 2]}]),
)


def prepared_one_by_one(
    definition: Any, items: list[Any], keys: list[str | None], concurrency: list[str | None], priority: Any
) -> list[NewRun]:
    runs = []
    for index, (item, key, concurrency_key) in enumerate(zip(items, keys, concurrency, strict=True)):
        try:
            runs.append(
                prepare_run(
                    "confirm",
                    "1",
                    definition,
                    item,
                    RunOptions(key, None, "1h", None, priority, concurrency_key),
                    what=f"inputs[{index}] of run_many('confirm')",
                )
            )
        except InvalidInput as error:
            raise InvalidInput("confirm", [f"inputs[{index}]: {problem}" for problem in error.problems]) from error
        except InvalidValue as error:
            if error.field not in ("idempotency_key", "concurrency_key"):
                raise  # the call's options: not named after an input
            raise type(error)(f"inputs[{index}]: {error}", field=error.field) from error
    return runs


@settings(max_examples=300, deadline=None, database=None)
@given(
    schema=st.booleans(),
    rows=st.lists(st.tuples(ITEMS, KEYS, KEYS), min_size=1, max_size=6),
    priority=st.sampled_from([0, 3, -1, 10**9, True]),
)
def test_a_run_batch_prepares_each_item_as_prepare_run_or_refuses_the_first_bad_one(
    schema: bool, rows: list[tuple[Any, str | None, str | None]], priority: Any
) -> None:
    definition = confirm if schema else None
    items, keys, concurrency = (list(column) for column in zip(*rows, strict=True))
    expected: list[NewRun] | Exception
    try:
        expected = prepared_one_by_one(definition, items, keys, concurrency, priority)
    except Exception as error:
        expected = error
    try:
        runs = list(
            RunBatch(
                "confirm",
                "1",
                definition,
                items,
                RunOptions(deadline="1h", priority=priority),
                keys,
                concurrency,
                what=lambda index: f"inputs[{index}] of run_many('confirm')",
            )
        )
    except Exception as error:
        assert isinstance(expected, Exception), error
        assert (type(error), str(error)) == (type(expected), str(expected))
        return
    assert isinstance(expected, list), expected
    assert [dataclasses.replace(run, id="") for run in runs] == [dataclasses.replace(run, id="") for run in expected]
    assert len({run.id for run in runs}) == len(runs)
