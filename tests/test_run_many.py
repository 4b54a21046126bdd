"""run_many: many runs in one statement, on every backend (see BACKENDS)."""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
import pytest

from sonamu_tasks import InvalidInput, InvalidName, SerializationError, workflow


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
    with pytest.raises(ValueError, match="2 inputs but 1 idempotency_keys"):
        await manager.run_many(confirm, [{"order_id": 1}, {"order_id": 2}], idempotency_keys=["a"])
    assert (await manager.list_runs()).items == []
    assert await manager.run_many(confirm, []) == []
