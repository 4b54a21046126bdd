"""Group commit (shared by both backends): no write is ever left waiting, batches form under load."""

from __future__ import annotations

import asyncio

import pytest

from sonamu_tasks.backends.group_commit import GroupCommit


class Recorder:
    def __init__(self, *, fenced: set[str] = frozenset(), fail: bool = False) -> None:  # type: ignore[assignment]
        self.batches: list[list[str]] = []
        self.fenced = fenced
        self.fail = fail

    async def flush(self, batch: list[str]) -> list[bool]:
        self.batches.append(batch)
        await asyncio.sleep(0.01)  # a commit takes a while: writes arriving meanwhile queue up
        if self.fail:
            raise ConnectionError("server went away")
        return [key not in self.fenced for key in batch]


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_a_write_submitted_right_after_the_previous_one_returned_is_committed(in_flight: int) -> None:
    # The pattern of every run: a checkpoint returns, the next write follows in the same event-loop step,
    # while the drain that committed the first is finishing. It must not be stranded behind that drain.
    recorder = Recorder()
    group = GroupCommit(recorder.flush, in_flight=in_flight)
    async with asyncio.timeout(5):  # in this task, not a new one: the next submit follows at once
        for index in range(20):
            assert await group.submit(f"run-{index}")
    assert [key for batch in recorder.batches for key in batch] == [f"run-{i}" for i in range(20)]


async def test_concurrent_writes_share_batches_and_each_learns_its_fence() -> None:
    recorder = Recorder(fenced={"run-3"})
    group = GroupCommit(recorder.flush, in_flight=2)
    written = await asyncio.wait_for(asyncio.gather(*(group.submit(f"run-{i}") for i in range(50))), timeout=5)
    assert written == [i != 3 for i in range(50)]
    assert len(recorder.batches) < 50  # batched, not one commit per write
    assert sorted(key for batch in recorder.batches for key in batch) == sorted(f"run-{i}" for i in range(50))


async def test_a_failed_commit_raises_in_every_writer_of_its_batch_and_the_next_ones_go_on() -> None:
    recorder = Recorder(fail=True)
    group = GroupCommit(recorder.flush)
    results = await asyncio.gather(*(group.submit(f"run-{i}") for i in range(10)), return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    recorder.fail = False
    assert await asyncio.wait_for(group.submit("later"), timeout=5)
