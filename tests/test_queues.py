"""Queues and flow control, on every backend: the limits hold with any number of workers because the claim
enforces them in the database. Real worker processes show the fleet-wide limit and a kill -9."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sonamu_tasks import (
    ConfigError,
    InvalidValue,
    Queue,
    ResultTimeout,
    RunStatus,
    SerializationError,
    WorkflowManager,
    workflow,
)
from sonamu_tasks.backends.base import NewRun
from sonamu_tasks.errors import BackendUnavailable
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.queue import parse_rate
from sonamu_tasks.records import WorkerRecord
from sonamu_tasks.run_creation import RunOptions, prepare_run

from .conftest import wait_until
from .support.process_workflows import PER_TENANT
from .test_processes import client, start_worker  # noqa: F401 - fixtures


class Spans:
    """When each step ran, in this process: the most that ran at once, overall and per key."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float, str]] = []
        self.running: dict[str, int] = {}

    async def run(self, key: str, seconds: float) -> str:
        began = time.monotonic()
        await asyncio.sleep(seconds)
        self.spans.append((began, time.monotonic(), key))
        return key

    def most_at_once(self, key: str | None = None) -> int:
        return most_at_once([(a, b) for a, b, k in self.spans if key is None or k == key])


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, change in events:  # an end sorts before a start at the same instant: touching spans do not overlap
        now += change
        most = max(most, now)
    return most


async def test_a_queue_concurrency_limit_holds_however_many_slots_the_worker_has(manager_for: Any) -> None:
    spans = Spans()
    capped = Queue("capped", concurrency=2)

    @workflow(version="1", queue=capped)
    async def capped_work(input: Any, step: Any) -> str:
        return str(await step.define("work", spans.run).run("all", 0.15))

    manager = await manager_for([capped_work], concurrency=8)
    handles = [await manager.run(capped_work, i) for i in range(8)]
    for handle in handles:
        assert await handle.result(timeout=30) == "all"
    assert spans.most_at_once() == 2
    run = await handles[0].info()
    assert run.queue == "capped"


async def test_sleeping_runs_hold_no_slot_of_their_queue(manager_for: Any) -> None:
    spans = Spans()
    one = Queue("one-at-a-time", concurrency=1)

    @workflow(version="1", queue=one)
    async def naps(input: Any, step: Any) -> str:
        await step.sleep("nap", "1s")
        return str(await step.define("work", spans.run).run("all", 0.05))

    manager = await manager_for([naps], concurrency=4)
    handles = [await manager.run(naps, i) for i in range(3)]
    # All three reach their sleep: each in turn holds the one slot until it parks, then frees it.
    await wait_until(
        lambda: all_status([manager.backend.get_run(h.id) for h in handles], RunStatus.SLEEPING),
        what="every run asleep at once",
    )
    for handle in handles:
        await handle.result(timeout=30)
    assert spans.most_at_once() == 1


async def test_a_worker_waiting_on_a_full_queue_looks_rarely_and_takes_the_slot_its_own_run_frees(
    manager_for: Any,
) -> None:
    """Runs due that a full queue will not let it take: the worker looks again at once (a row lock lasts a
    commit), then ever more slowly, up to once a second (it looked 20 times a second for as long as the queue
    stayed full); when its own run ends it claims the next one at once."""
    spans = Spans()
    full = Queue("full", concurrency=1)

    @workflow(version="1", queue=full)
    async def holds_the_slot(input: Any, step: Any) -> str:
        return str(await step.define("work", spans.run).run("all", 2.0))

    manager = await manager_for([holds_the_slot], concurrency=4)
    looks: list[float] = []
    claim = manager.backend.claim_runs

    async def counted(*args: Any, **kwargs: Any) -> Any:
        looks.append(time.monotonic())
        return await claim(*args, **kwargs)

    manager.backend.claim_runs = counted
    handles = [await manager.run(holds_the_slot, i) for i in range(2)]
    for handle in handles:
        assert await handle.result(timeout=30) == "all"
    assert spans.most_at_once() == 1
    starts = sorted(began for began, _, _ in spans.spans)
    ends = sorted(ended for _, ended, _ in spans.spans)
    # Past the first second of the first run the worker has slowed down to its poll interval (SQLite's is
    # 250 ms) or a second: a few looks until the run ends, not 14.
    settled = [t for t in looks if starts[0] + 1.2 <= t <= starts[0] + 1.9]
    assert len(settled) <= 4, len(settled)
    gap = starts[1] - ends[0]
    assert gap < 0.3, gap  # woken by its own run's end, not by its next look (up to 1 s later)


async def all_status(reads: list[Any], status: RunStatus) -> bool:
    runs = await asyncio.gather(*reads)
    return all(run.status is status for run in runs)


async def test_per_key_concurrency_runs_one_run_per_key_and_other_keys_alongside(manager_for: Any) -> None:
    spans = Spans()
    tenants = Queue("tenants", per_key_concurrency=1)

    @workflow(version="1", queue=tenants)
    async def report(input: Any, step: Any) -> str:
        return str(await step.define("work", spans.run).run(input, 0.1))

    manager = await manager_for([report], concurrency=6)
    keys = ["a", "a", "a", "a", "b", "b", "c"]
    handles = [await manager.run(report, key, concurrency_key=key) for key in keys]
    assert [await h.result(timeout=30) for h in handles] == keys
    assert spans.most_at_once("a") == spans.most_at_once("b") == 1
    assert spans.most_at_once() >= 2  # "b" and "c" did not wait for the four runs of "a"
    stats = {s.name: s for s in await manager.queue_stats()}
    assert stats["tenants"].per_key_concurrency == 1 and stats["tenants"].parked_on_key == 0


async def test_a_queue_given_only_to_run_has_its_limits_stored_and_held(manager_for: Any) -> None:
    """`run(queue=Queue(...))` for a queue neither the config nor a workflow declares: its limits were dropped
    (only the name was kept) and the runs ran four at once."""
    spans = Spans()
    adhoc = Queue("adhoc", concurrency=1)

    @workflow(version="1")
    async def export(input: Any, step: Any) -> str:
        return str(await step.define("work", spans.run).run(input, 0.1))

    @workflow(version="1")
    async def exports(step: Any) -> list[str]:
        children = await step.start_workflows("each", export, ["c0", "c1"], queue=adhoc)
        return [str(await child.result()) for child in children]

    manager = await manager_for([export, exports], concurrency=6, queues=["default", "adhoc"])
    handles = [await manager.run(export, f"r{i}", queue=adhoc) for i in range(3)]
    parent = await manager.run(exports)
    assert [await h.result(timeout=30) for h in handles] == ["r0", "r1", "r2"]
    assert await parent.result(timeout=30) == ["c0", "c1"]
    assert spans.most_at_once() == 1
    stats = {s.name: s for s in await manager.queue_stats()}
    assert stats["adhoc"].concurrency == 1
    with pytest.raises(InvalidValue, match=r"'adhoc'.*differs"):
        await manager.run(export, "r9", queue=Queue("adhoc", concurrency=5))


async def test_a_refused_call_given_a_queue_stores_nothing_the_queue_neither(manager_for: Any) -> None:
    @workflow(version="1")
    async def item(input: Any) -> Any:
        return input

    manager = await manager_for([item], enable_worker=False)
    fresh = Queue("refused", concurrency=1)
    with pytest.raises(SerializationError, match="input"):
        await manager.run(item, object(), queue=fresh)
    with pytest.raises(InvalidValue, match="start_at"):
        await manager.run(item, 1, queue=fresh, start_at=datetime(2030, 1, 1))  # no time zone
    with pytest.raises(SerializationError, match=r"inputs\[1\]"):
        await manager.run_many(item, [1, object()], queue=fresh)
    assert "refused" not in {stats.name for stats in await manager.queue_stats()}
    assert (await manager.list_runs()).items == []


async def test_storing_a_queue_gives_up_as_run_does_while_the_database_is_away(manager_for: Any) -> None:
    manager = await manager_for([], enable_worker=False)

    async def away(*args: Any) -> None:
        raise BackendUnavailable("the database is away")

    manager.backend.register_queues = away
    began = time.monotonic()
    with pytest.raises(BackendUnavailable, match="could not store queue"):
        await manager.declare_queue(Queue("later", concurrency=1), give_up_after_s=0.5)
    assert time.monotonic() - began < 5


async def test_a_key_freed_for_a_version_nobody_serves_reaches_the_parked_run_of_a_served_one(
    manager_for: Any,
) -> None:
    # A rolling deploy: version 1's workers are gone, version 2's serve the queue.
    gate = asyncio.Event()
    tenants = Queue("deploying", per_key_concurrency=1)

    async def work(tag: str) -> str:
        if tag == "holder":
            await gate.wait()
        return tag

    @workflow(version="1", name="sync_tenant", queue=tenants)
    async def old(input: Any, step: Any) -> str:
        return str(await step.define("work", work).run(input))

    @workflow(version="2", name="sync_tenant", queue=tenants)
    async def new(input: Any, step: Any) -> str:
        return str(await step.define("work", work).run(input))

    new_workers = await manager_for([new], poll_interval_ms=100)
    old_workers = await manager_for([old], poll_interval_ms=100)
    holder = await new_workers.run(new, "holder", concurrency_key="t-1")
    await wait_until(lambda: running_count(new_workers, "deploying", 1), what="the holder to take the key")
    # Given: the key's oldest parked run is of version 1, the next one of version 2.
    orphan = await old_workers.run(old, "orphan", concurrency_key="t-1")
    await wait_until(lambda: parked_on_key(new_workers, "deploying", 1), what="version 1's run parked")
    served = await new_workers.run(new, "served", concurrency_key="t-1")
    await wait_until(lambda: parked_on_key(new_workers, "deploying", 2), what="version 2's run parked")
    await old_workers.stop()
    # When: the holder finishes, and its key's slot goes to the oldest parked run, which nobody serves.
    gate.set()
    assert await holder.result(timeout=15) == "holder"
    # Then: the claim's periodic sweep (every 5 s per queue) brings back version 2's run, which runs.
    assert await served.result(timeout=20) == "served"
    assert (await new_workers.get_run(orphan.id)).status is RunStatus.PENDING  # the slot went to it: unused


async def parked_on_key(manager: WorkflowManager, queue: str, expected: int) -> bool:
    stats = {s.name: s for s in await manager.queue_stats()}
    return queue in stats and stats[queue].parked_on_key == expected


async def test_a_rate_limit_never_lets_more_starts_into_any_window(manager_for: Any) -> None:
    paced = Queue("paced", rate_limit="3/1s")

    @workflow(version="1", queue=paced)
    async def call_api(input: Any) -> int:
        return int(input)

    manager = await manager_for([call_api], concurrency=8)
    handles = [await manager.run(call_api, i) for i in range(7)]
    assert [await h.result(timeout=30) for h in handles] == list(range(7))
    starts = sorted([(await h.info()).started_at for h in handles])  # type: ignore[type-var]
    # Any four consecutive starts span at least the window: never four in one second.
    for first, fourth in zip(starts, starts[3:], strict=False):
        assert fourth - first >= timedelta(seconds=1)
    assert starts[-1] - starts[0] >= timedelta(seconds=2)  # 7 starts at 3 per second need three windows


async def test_priority_orders_a_queue_and_is_fifo_within_a_priority(manager_for: Any, make_config: Any) -> None:
    order: list[str] = []

    @workflow(version="1")
    async def job(input: Any) -> str:
        order.append(input)
        return str(input)

    async with WorkflowManager(make_config(enable_worker=False), workflows=[job]) as producer:
        for label, priority in [("p5", 5), ("p1-first", 1), ("p3", 3), ("p1-second", 1), ("p0", 0), ("p-2", -2)]:
            await producer.run(job, label, priority=priority)
        # concurrency 1: the claim takes one run at a time, so the order of execution is the claim order
        await manager_for([job], concurrency=1)
        await wait_until(lambda: len(order) == 6, what="every run")
    assert order == ["p-2", "p0", "p1-first", "p1-second", "p3", "p5"]


async def test_a_claim_takes_its_workflows_runs_in_one_order_and_passes_over_runs_nobody_serves(
    manager_for: Any,
) -> None:
    """The claim reads each (workflow, version) it serves on its own and merges them into one order: priority,
    then due time, then creation. Runs of a version nobody serves are neither taken nor waited for, even at a
    better priority, and the worker's next due time ignores them too."""
    backend = (await manager_for([], enable_worker=False)).backend
    now = datetime.now(UTC)
    served = [("a", "1"), ("b", "1")]
    # given, created in this order by one call: due at one moment unless told otherwise
    given = {
        "a p5": ("a", "1", 5, None),
        "b p0": ("b", "1", 0, None),
        "a@2 p0": ("a", "2", 0, None),
        "a p0": ("a", "1", 0, None),
        "ghost p-1": ("ghost", "1", -1, None),
        "b p5": ("b", "1", 5, None),
        "a p0 again": ("a", "1", 0, None),
        "b p0 due an hour ago": ("b", "1", 0, now - timedelta(hours=1)),
        "ghost p-1 due an hour ago": ("ghost", "1", -1, now - timedelta(hours=1)),
    }
    runs = {
        label: NewRun(new_run_id(), name, version, "null", priority=priority, start_at=start_at)
        for label, (name, version, priority, start_at) in given.items()
    }
    await backend.create_runs(list(runs.values()))
    label_of = {run.id: label for label, run in runs.items()}

    # when claims of 1, 2, 2 and 10 take them (the runs of one claim come in no promised order)
    taken = [
        {label_of[run.id] for run in await backend.claim_runs("w", served, limit, timedelta(seconds=30))}
        for limit in (1, 2, 2, 10)
    ]

    # then
    assert taken == [{"b p0 due an hour ago"}, {"b p0", "a p0"}, {"a p0 again", "a p5"}, {"b p5"}]
    assert await backend.claim_runs("w", served, 10, timedelta(seconds=30)) == []

    # and the next due time: a later level's earlier run counts, runs nobody serves do not
    later = {
        "c p0 in an hour": NewRun(new_run_id(), "c", "1", "null", start_at=now + timedelta(hours=1)),
        "c p5 in a minute": NewRun(new_run_id(), "c", "1", "null", priority=5, start_at=now + timedelta(minutes=1)),
        "c@2 due now": NewRun(new_run_id(), "c", "2", "null"),
    }
    await backend.create_runs(list(later.values()))
    assert await backend.seconds_until_due([("c", "1")]) == pytest.approx(60, abs=10)
    assert await backend.seconds_until_due([("nobody", "1")]) is None


def one_at_a_time(started: list[Any]) -> Any:
    """A workflow of a concurrency=1 queue that records the order its runs start in: the claim order."""

    @workflow(version="1", name="in_line", queue=Queue("in-line", concurrency=1))
    async def in_line(input: Any) -> Any:
        started.append(input)
        return input

    return in_line


async def watch_for_a_moment(handles: list[Any]) -> None:
    """result() on runs still pending, until it times out: on PostgreSQL it asked to be notified by marking each
    run's row (before migration 0031), and an updated row moves on disk, which decided the order of runs due at
    the same moment before migration 0020."""
    for handle in handles:
        with pytest.raises(ResultTimeout):
            await handle.result(timeout=0.05)


async def all_started(started: list[Any], count: int) -> None:
    """Wait for the runs to start without result(), which is not what these tests look at (a watch in flight
    meeting a claim has its own test, test_a_claim_takes_a_run_whose_result_is_being_watched)."""
    await wait_until(lambda: len(started) == count, timeout=60, what=f"{count} runs to start")


async def test_runs_created_by_one_run_many_start_in_creation_order_within_a_priority(
    manager_for: Any, make_config: Any
) -> None:
    started: list[Any] = []
    in_line = one_at_a_time(started)
    async with WorkflowManager(make_config(enable_worker=False), workflows=[in_line]) as producer:
        batch = await producer.run_many(in_line, [f"b{i:02d}" for i in range(40)])
        urgent = await producer.run_many(in_line, [f"u{i:02d}" for i in range(10)], priority=-1)
        await watch_for_a_moment([batch[0], batch[17], urgent[0], urgent[5]])
        await manager_for([in_line], concurrency=4)
        await all_started(started, 50)
    assert started == [f"u{i:02d}" for i in range(10)] + [f"b{i:02d}" for i in range(40)]


async def test_runs_started_together_by_gathered_run_calls_start_in_call_order(
    manager_for: Any, make_config: Any
) -> None:
    started: list[Any] = []
    in_line = one_at_a_time(started)
    async with WorkflowManager(make_config(enable_worker=False), workflows=[in_line]) as producer:
        # In flight together: on PostgreSQL one insert (the group commit), so one available_at for them all.
        handles = await asyncio.gather(*(producer.run(in_line, i) for i in range(40)))
        await watch_for_a_moment([handles[0], handles[1], handles[30]])
        await manager_for([in_line], concurrency=4)
        await all_started(started, 40)
    assert started == list(range(40))


async def test_runs_of_one_key_created_together_get_its_slot_in_creation_order(
    manager_for: Any, make_config: Any
) -> None:
    """The run a freed key slot goes to (the trigger, the claim's sweep) breaks ties by id as the claim does."""
    started: list[Any] = []

    @workflow(version="1", name="per_tenant", queue=Queue("per-tenant-order", per_key_concurrency=1))
    async def per_tenant(input: Any) -> Any:
        started.append(input)
        await asyncio.sleep(0.01)  # the others are claimed meanwhile and set aside for the key
        return input

    async with WorkflowManager(make_config(enable_worker=False), workflows=[per_tenant]) as producer:
        handles = await producer.run_many(per_tenant, list(range(20)), concurrency_key="tenant-1")
        await watch_for_a_moment([handles[0], handles[7], handles[13]])
        await manager_for([per_tenant], concurrency=8)
        await all_started(started, 20)
        await asyncio.gather(*(h.result(timeout=60) for h in handles))  # all started: no claim left to pass one by
    assert started == list(range(20))


async def test_a_run_handed_back_at_shutdown_keeps_its_place_in_its_keys_line(
    manager_for: Any, make_config: Any
) -> None:
    """A worker stopping hands its run back; the run, started before the others of its key, starts again
    before them, not after (per-key FIFO: it went to the back of the line)."""
    started: list[Any] = []
    hold = asyncio.Event()

    @workflow(version="1", name="in_order", queue=Queue("per-key-handback", per_key_concurrency=1))
    async def in_order(input: Any, step: Any) -> Any:
        async def work() -> Any:
            started.append(input)
            if input == 0 and len(started) == 1:
                await hold.wait()  # the first execution of run 0 is still in its step at the shutdown
            return input

        return await step.define("work", work).run()

    async with WorkflowManager(make_config(enable_worker=False), workflows=[in_order]) as producer:
        handles = await producer.run_many(in_order, list(range(4)), concurrency_key="customer-1")
        leaving = WorkflowManager(make_config(shutdown_grace_ms=100), workflows=[in_order])
        await leaving.start()
        await wait_until(lambda: started == [0], what="run 0 to start")
        await leaving.stop()  # past the grace: run 0 is handed back, its step not finished
        hold.set()
        await manager_for([in_order])
        assert await asyncio.gather(*(h.result(timeout=30) for h in handles)) == [0, 1, 2, 3]
    assert started == [0, 0, 1, 2, 3]


async def test_debounce_collapses_runs_with_one_key_into_one_run_with_the_latest_input(manager_for: Any) -> None:
    @workflow(version="1")
    async def sync_account(input: Any) -> Any:
        return input

    manager = await manager_for([sync_account])
    first = await manager.run(sync_account, {"n": 1}, debounce="1s", debounce_key="acct-7")
    second = await manager.run(sync_account, {"n": 2}, debounce="1s", debounce_key="acct-7")
    third = await manager.run(sync_account, {"n": 3}, debounce="1s", debounce_key="acct-7")
    other = await manager.run(sync_account, {"n": 9}, debounce="1s", debounce_key="acct-8")
    assert first.id == second.id == third.id != other.id
    assert first.created and not second.created and not third.created
    assert await first.result(timeout=15) == {"n": 3}
    assert await other.result(timeout=15) == {"n": 9}
    runs = await manager.list_runs(workflow="sync_account")
    assert len(runs.items) == 2
    # The window has closed and the run started: the key opens a new run.
    later = await manager.run(sync_account, {"n": 4}, debounce="1s", debounce_key="acct-7")
    assert later.id != first.id and await later.result(timeout=15) == {"n": 4}


async def test_a_debounced_run_sent_again_after_a_lost_answer_is_this_call_s_run(manager_for: Any) -> None:
    # The call is made again when its commit's answer was lost: at once (the run still pending in its window),
    # or once the run has started (it left the debounce's index): either way the run is the call's own creation
    @workflow(version="1")
    async def sync_account(input: Any) -> Any:
        return input

    manager = await manager_for([sync_account])
    new_run = prepare_run(
        "sync_account", "1", sync_account, {"n": 1}, RunOptions(debounce="100ms", debounce_key="acct-9")
    )
    assert await manager.backend.create_debounced_run(new_run) == (new_run.id, True)
    assert await manager.backend.create_debounced_run(new_run) == (new_run.id, True)  # still in its window
    assert await manager.handle(new_run.id).result(timeout=15) == {"n": 1}
    assert await manager.backend.create_debounced_run(new_run) == (new_run.id, True)  # started and finished
    assert len((await manager.list_runs(workflow="sync_account")).items) == 1


async def test_bad_run_options_are_refused_by_name_before_anything_is_stored(manager_for: Any) -> None:
    @workflow(version="1")
    async def noop(input: Any) -> None:
        return None

    manager = await manager_for([noop])
    with pytest.raises(InvalidValue, match="debounce_key"):
        await manager.run(noop, debounce="1s")
    with pytest.raises(InvalidValue, match="idempotency_key"):
        await manager.run(noop, debounce="1s", debounce_key="k", idempotency_key="x")
    with pytest.raises(InvalidValue, match="priority"):
        await manager.run(noop, priority=2**40)
    with pytest.raises(InvalidValue, match="queue"):
        await manager.run(noop, queue="  ")
    assert (await manager.list_runs()).items == []


async def test_a_run_started_by_name_elsewhere_goes_to_its_workflows_queue(manager_for: Any, make_config: Any) -> None:
    @workflow(version="1", queue=Queue("named", concurrency=3))
    async def named_work(input: Any) -> int:
        return int(input)

    await manager_for([named_work])  # registers the workflow's queue
    async with WorkflowManager(make_config(enable_worker=False)) as producer:  # no definitions at all
        handle = await producer.run({"name": "named_work", "version": "1"}, 5)
        assert (await handle.info()).queue == "named"
        assert await handle.result(timeout=15) == 5
        moved = await producer.run({"name": "named_work", "version": "1"}, 6, queue="elsewhere")
        assert (await moved.info()).queue == "elsewhere"


async def test_a_worker_serves_only_the_queues_it_is_given(manager_for: Any, make_config: Any) -> None:
    @workflow(version="1", queue="reports")
    async def nightly(input: Any) -> str:
        return "done"

    busy = await manager_for([nightly], queues=["billing"])
    handle = await busy.run(nightly)
    await asyncio.sleep(0.3)  # give the wrong worker its chance to claim
    assert (await handle.info()).status is RunStatus.PENDING
    await manager_for([nightly], queues=["reports"])
    assert await handle.result(timeout=15) == "done"


async def test_a_changed_limit_holds_without_restarting_the_worker(manager_for: Any, make_config: Any) -> None:
    spans = Spans()
    gate = asyncio.Event()

    async def hold() -> str:
        began = time.monotonic()
        await gate.wait()
        spans.spans.append((began, time.monotonic(), "all"))
        return "ok"

    def define(limit: int) -> Any:
        @workflow(version="1", name="gated", queue=Queue("gated", concurrency=limit))
        async def gated(input: Any, step: Any) -> str:
            return str(await step.define("hold", hold).run())

        return gated

    manager = await manager_for([define(1)], concurrency=6)
    handles = [await manager.run(define(1), i) for i in range(4)]
    await wait_until(lambda: running_count(manager, "gated", 1), what="one run executing")
    # Another process deploys the queue with a higher limit: this worker's next claims obey it.
    async with WorkflowManager(make_config(enable_worker=False), workflows=[define(3)]):
        pass
    manager.worker.wake()  # type: ignore[union-attr]
    await wait_until(lambda: running_count(manager, "gated", 3), what="three runs executing")
    gate.set()
    for handle in handles:
        assert await handle.result(timeout=15) == "ok"


async def running_count(manager: WorkflowManager, queue: str, expected: int) -> bool:
    stats = {s.name: s for s in await manager.queue_stats()}
    return queue in stats and stats[queue].running == expected


def test_one_queue_declared_twice_with_different_limits_is_refused() -> None:
    from sonamu_tasks.queue import collect_queues

    with pytest.raises(ConfigError, match="'q' is declared twice"):
        collect_queues([Queue("q", concurrency=1), Queue("q", concurrency=2)], [])


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]), st.integers(1, 500))
def test_rate_limits_parse_as_starts_per_window(count: int, unit: str, amount: int) -> None:
    starts, window = parse_rate(f"{count}/{amount}{unit}")
    assert starts == count
    assert window == timedelta(seconds=amount * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit])


@given(st.text(max_size=20))
def test_anything_else_given_as_a_rate_is_refused_by_name(text: str) -> None:
    try:
        parse_rate(text, what="queue 'x' rate_limit")
    except InvalidValue as error:
        assert "queue 'x' rate_limit" in str(error)


@pytest.mark.parametrize("bad", [{"concurrency": 0}, {"per_key_concurrency": -1}, {"rate_limit": "0/1s"}])
def test_a_queue_with_an_impossible_limit_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidValue, match=next(iter(bad))):
        Queue("q", **bad)


# real worker processes


async def test_two_worker_processes_never_run_more_than_the_queues_limit_at_once(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Two slots per worker, three for the queue: three at once needs both workers, four would break the limit.
    handles = [await client.run({"name": "limited", "version": "1"}, {"dir": str(tmp_path)}) for _ in range(16)]
    for name in ("a", "b"):
        start_worker(name, workflows="limited", concurrency=2)
    for handle in handles:
        await handle.result(timeout=60)
    assert most_at_once(process_spans(tmp_path)) == 3


async def test_a_freed_key_slot_starts_the_next_run_of_the_key_at_once_whatever_the_listen_delay(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    backend_name: str,
) -> None:
    """The run that waited for its key is woken, as a run waiting for a message is: not a new run, whose claim
    `listen_delay` batches."""
    start_worker("w", workflows="keyed_sleep", concurrency=4, listen_delay=3000)
    # Each run long enough for the next ones to be claimed meanwhile and set aside to wait for the key.
    handles = [await client.run({"name": "keyed_sleep", "version": "1"}, 0.3, concurrency_key="k") for _ in range(4)]
    for handle in handles:
        await handle.result(timeout=60)
    runs = sorted([await handle.info() for handle in handles], key=lambda run: run.started_at or datetime.max)
    gaps = [
        (later.started_at - earlier.finished_at).total_seconds()
        for earlier, later in itertools.pairwise(runs)
        if later.started_at is not None and earlier.finished_at is not None
    ]
    assert len(gaps) == 3, gaps
    if backend_name == "postgres":  # notified (a few ms; it was 0.7 s); SQLite's workers poll every 250 ms
        assert max(gaps) < 0.5, gaps


async def test_a_debounced_run_starts_when_its_window_ends_on_a_worker_of_another_process(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
) -> None:
    """Not at the worker's next poll, up to 5 s later on PostgreSQL (which also let a call made after the
    window merge into the run that should have started). The run is started just after the worker's first
    claim, so that its next poll is about 5 s away."""
    start_worker("w", workflows="one_step")
    await wait_until(client.list_workers, what="the worker to register")
    handle = await client.run({"name": "one_step", "version": "1"}, 1, debounce="1s", debounce_key="customer-7")
    await handle.result(timeout=30)
    run = await handle.info()
    assert run.started_at is not None
    waited = (run.started_at - run.created_at).total_seconds()
    assert 1.0 <= waited < 3.0, waited


async def test_a_killed_workers_slots_come_back_when_its_leases_expire(
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    doomed = start_worker("doomed", workflows="limited", concurrency=4, lease_ms=1000)
    blocked = [
        await client.run({"name": "limited", "version": "1"}, {"dir": str(tmp_path), "seconds": -1}) for _ in range(3)
    ]
    more = [await client.run({"name": "limited", "version": "1"}, {"dir": str(tmp_path)}) for _ in range(3)]
    await wait_until(lambda: process_starts(tmp_path) == 3, what="the queue's three slots taken")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    (tmp_path / "release").touch()
    start_worker("heir", workflows="limited", concurrency=4, lease_ms=1000)
    for handle in [*blocked, *more]:
        await handle.result(timeout=60)
    # The killed worker's runs held their slots until their leases expired; then the heir ran them again.
    assert [(await h.info()).recoveries for h in blocked] == [1, 1, 1]
    spans = process_spans(tmp_path, leaving_out=doomed.pid)
    assert len(spans) == 6 and most_at_once(spans) <= 3


async def test_a_killed_workers_key_reaches_a_parked_run_of_another_version_when_its_lease_expires(
    manager_for: Any,
    client: Any,  # noqa: F811
    start_worker: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Given: version 1's only worker runs the holder of key t-1; version 2's run of the key is parked.
    doomed = start_worker("doomed", workflows="keyed", lease_ms=1000)
    holder = await client.run(
        {"name": "keyed", "version": "1"}, {"dir": str(tmp_path), "seconds": -1}, concurrency_key="t-1"
    )
    await wait_until(lambda: process_starts(tmp_path) == 1, what="the holder to take the key")

    async def work() -> str:
        return "ran"

    @workflow(version="2", name="keyed", queue=PER_TENANT)
    async def keyed_v2(input: Any, step: Any) -> str:
        return str(await step.define("work", work).run())

    manager = await manager_for([keyed_v2], poll_interval_ms=100)
    waiting = await manager.run(keyed_v2, concurrency_key="t-1")
    await wait_until(lambda: parked_on_key(manager, "per-tenant", 1), what="version 2's run parked")
    # When: the worker is killed, and no worker of version 1 is left to take its run over.
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    # Then: the key's slot comes back when the lease expires, not before, and the parked run takes it.
    assert await waiting.result(timeout=20) == "ran"
    held = await manager.backend.get_run(holder.id)
    started = (await waiting.info()).started_at
    assert held.status is RunStatus.RUNNING and held.worker_id is not None  # nobody took it over
    assert started is not None and started >= held.available_at  # held.available_at: when the lease expired


def process_spans(directory: Path, *, leaving_out: int | None = None) -> list[tuple[float, float]]:
    """The steps that ended, as (start, end) pairs that give the same count at every instant as the real ones
    (starts and ends in time order; which start an end belongs to does not change how many ran at once)."""
    starts, ends = [], []
    for line in (directory / "spans.log").read_text().splitlines():
        kind, pid, moment = line.split()
        if int(pid) != leaving_out:
            (starts if kind == "start" else ends).append(float(moment))
    return list(zip(sorted(starts), sorted(ends), strict=False))


def process_starts(directory: Path) -> int:
    path = directory / "spans.log"
    return sum(line.startswith("start") for line in path.read_text().splitlines()) if path.exists() else 0


async def test_children_take_queue_options_and_a_fork_keeps_them(manager_for: Any) -> None:
    @workflow(version="1")
    async def leaf(input: Any) -> Any:
        return input

    @workflow(version="1")
    async def parent(input: Any, step: Any) -> Any:
        return await step.run_workflow("kid", leaf, 1, queue="side", priority=4, concurrency_key="tenant-1")

    manager = await manager_for([parent, leaf], queues=["default", "side"])
    handle = await manager.run(parent, priority=2, concurrency_key="tenant-9")
    assert await handle.result(timeout=15) == 1
    [kid] = (await manager.list_runs(parent_id=handle.id)).items
    assert (kid.queue, kid.priority, kid.concurrency_key) == ("side", 4, "tenant-1")
    forked = await manager.fork(handle.id, "kid")
    fork = await forked.info()
    assert (fork.queue, fork.priority, fork.concurrency_key) == ("default", 2, "tenant-9")


async def test_queues_declared_in_the_config_are_stored_and_refused_when_malformed(
    database_url: str, schema: str
) -> None:
    from sonamu_tasks import define_config

    config = define_config(
        database_url=database_url,
        schema=schema,
        tasks={"enable_worker": False, "queues": [{"name": "reports", "concurrency": 2, "rate_limit": "10/1m"}]},
    )
    async with WorkflowManager(config) as manager:
        stats = {s.name: s for s in await manager.queue_stats()}
    assert stats["reports"].concurrency == 2
    assert (stats["reports"].rate_limit_starts, stats["reports"].rate_limit_window) == (10, timedelta(minutes=1))
    with pytest.raises(ConfigError, match="concurrenc"):
        define_config(tasks={"queues": [{"name": "reports", "concurrency": 0}]})
    with pytest.raises(ConfigError, match="speed"):
        define_config(tasks={"queues": [{"name": "reports", "speed": 3}]})


async def test_worker_concurrency_caps_each_worker_not_the_fleet(manager_for: Any) -> None:
    spans = Spans()
    per_worker = Queue("per-worker", worker_concurrency=1)

    @workflow(version="1", queue=per_worker)
    async def polite(input: Any, step: Any) -> str:
        return str(await step.define("work", spans.run).run("all", 0.15))

    first = await manager_for([polite], concurrency=4)
    handles = [await first.run(polite, i) for i in range(3)]
    for handle in handles:
        await handle.result(timeout=30)
    assert spans.most_at_once() == 1  # one worker: one at a time, whatever its slots
    spans.spans.clear()
    await manager_for([polite], concurrency=4)  # a second worker in this process: its own cap of one
    handles = [await first.run(polite, i) for i in range(8)]
    for handle in handles:
        await handle.result(timeout=30)
    assert spans.most_at_once() <= 2


async def test_workers_serving_several_limited_queues_never_deadlock(
    manager_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Claims of several limited queues (served in a rotating order) and completions releasing key slots
    in several queues at once take the queues' locks without ever waiting in a cycle."""
    left = Queue("left", concurrency=3, per_key_concurrency=1)
    right = Queue("right", rate_limit="1000/1s", per_key_concurrency=1)

    def define(queue: Queue) -> Any:
        @workflow(version="1", name=f"work_{queue.name}", queue=queue)
        async def work(input: Any, step: Any) -> Any:
            await step.define("a", lambda: None).run()
            return input

        return work

    workflows = [define(left), define(right)]
    first = await manager_for(workflows, concurrency=8)
    await manager_for(workflows, concurrency=8)
    handles = [await first.run(workflows[i % 2], i, concurrency_key=f"k{i % 5}") for i in range(60)]
    assert [await h.result(timeout=60) for h in handles] == list(range(60))
    assert not [r for r in caplog.records if "deadlock" in r.getMessage().lower()]


async def test_run_many_puts_every_run_in_its_queue_with_its_key(manager_for: Any) -> None:
    @workflow(version="1")
    async def item(input: Any) -> Any:
        return input

    manager = await manager_for([item], queues=["default", "bulk"])
    handles = await manager.run_many(item, [1, 2, 3], queue="bulk", priority=3, concurrency_keys=["a", None, "b"])
    assert [await h.result(timeout=15) for h in handles] == [1, 2, 3]
    runs = [await h.info() for h in handles]
    assert [(r.queue, r.priority, r.concurrency_key) for r in runs] == [
        ("bulk", 3, "a"),
        ("bulk", 3, None),
        ("bulk", 3, "b"),
    ]
    shared = await manager.run_many(item, [4, 5], concurrency_key="tenant")
    assert [(await h.info()).concurrency_key for h in shared] == ["tenant", "tenant"]
    with pytest.raises(ValueError, match="concurrency_key"):
        await manager.run_many(item, [6], concurrency_key="x", concurrency_keys=["y"])


async def test_queue_stats_count_the_live_workers_that_claim_from_each_queue(manager_for: Any) -> None:
    @workflow(version="1", queue=Queue("served"))
    async def served_work(input: Any) -> Any:
        return input

    @workflow(version="1", queue=Queue("orphaned"))
    async def orphaned_work(input: Any) -> Any:
        return input

    await manager_for([served_work], concurrency=2)
    await manager_for([served_work], concurrency=2)
    producer = await manager_for([orphaned_work], enable_worker=False)  # declares the queue, runs nothing
    await producer.run(orphaned_work, 1)
    stats = {s.name: s for s in await producer.queue_stats()}
    assert (stats["served"].workers, stats["orphaned"].workers, stats["orphaned"].due) == (2, 0, 1)
    # a worker whose heartbeat is older than stale_after no longer counts
    stale = {s.name: s for s in await producer.queue_stats(stale_after=-1)}
    assert stale["served"].workers == 0
    # a live worker of an older release, which did not record its queues: the counts are unknown, not 0
    now = datetime.now(UTC)
    await producer.backend.register_worker(WorkerRecord("old-release", "host", 1, [], 4, now, now, queues=None))
    assert {s.workers for s in await producer.queue_stats()} == {None}
