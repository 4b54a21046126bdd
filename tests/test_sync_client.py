"""SyncClient, what a web process (Flask, Django) holds: every WorkflowManager call such a process makes, with the
same parameters, results and errors, blocking the calling thread only. On every backend (see BACKENDS), and on
PostgreSQL through PgBouncer, where web processes usually connect."""

from __future__ import annotations

import asyncio
import inspect
import threading
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, TypeVar

import pydantic
import pytest

from sonamu_tasks import (
    InvalidDuration,
    InvalidValue,
    NonRetryableError,
    Queue,
    ResultTimeout,
    RunHandle,
    RunNotFound,
    RunStatus,
    Schedule,
    SyncClient,
    SyncRunHandle,
    WorkflowFailed,
    WorkflowManager,
    workflow,
)
from sonamu_tasks.records import CutValue

from .conftest import BACKENDS, PGBOUNCER_BACKENDS, ConfigFactory, wait_until

T = TypeVar("T")

NOBODY_SERVES_THIS = {"name": "nobody_serves_this", "version": "1"}

NOT_MIRRORED = {
    "metrics_text": "what the dashboard's /metrics serves; a web process serves its metrics with prometheus_client",
    "start": "SyncClient() starts its manager when it is made",
    "stop": "SyncClient.close() stops its manager",
    "serve": "runs a worker until SIGTERM: a worker process's job; a SyncClient runs no worker",
    "register": "hands workflow code to this process's worker; a SyncClient runs none (it starts runs by spec)",
    "synchronize": "re-registers code and schedules for this process's worker after a reload; a SyncClient has none",
    "migrate": "SyncClient() migrates when it starts; `sonamu-tasks migrate` does it on demand",
    "run_available": "a notification the backend's listener delivers to the manager, not a call",
    "run_woken": "a notification the backend's listener delivers to the manager, not a call",
    "run_finished": "a notification the backend's listener or the worker delivers to the manager, not a call",
    "run_requested": "a notification the backend's listener delivers to the manager, not a call",
    "reconnected": "a notification the backend delivers to the manager after a reconnect, not a call",
}
"""Public WorkflowManager methods SyncClient deliberately does not have, and why."""


@pytest.fixture(params=BACKENDS + PGBOUNCER_BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(make_config: ConfigFactory) -> AsyncIterator[SyncClient]:
    """A web process's SyncClient on this test's database, made and closed off the event loop."""
    sync_client = await asyncio.to_thread(SyncClient, make_config())
    yield sync_client
    await asyncio.to_thread(sync_client.close)


async def blocking(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)` on a thread of its own, as a view makes it; the test's worker goes on meanwhile."""
    return await asyncio.to_thread(call, *args, **kwargs)


@workflow(version="1")
async def web_greet(input: Any, step: Any) -> Any:
    return await step.define("greet", lambda: {"hello": input}).run()


@workflow(version="1")
async def web_refuse() -> None:
    raise NonRetryableError("refused")


@workflow(version="1")
async def web_parent(input: Any, step: Any) -> Any:
    return [await step.run_workflow(f"kid-{index}", web_greet, index) for index in range(input)]


@workflow(version="1")
async def web_approval(step: Any) -> Any:
    await step.set_event("progress", {"done": 40})
    return await step.receive("wait-approval", topic="approval", timeout="1h")


@workflow(version="1", queue=Queue("web_mail", concurrency=2), schedules=[Schedule("0 9 * * *")])
async def web_mailer(input: Any) -> Any:
    return input


class Greeting(pydantic.BaseModel):
    hello: str


@workflow(version="1")
async def web_typed(input: str) -> Greeting:
    return Greeting(hello=input)


# what a web process does, on every backend


async def test_a_web_process_gets_outputs_as_the_type_the_workflow_declares(
    manager_for: Any, client: SyncClient
) -> None:
    await manager_for([web_typed])
    handle = await blocking(client.run, web_typed, "ada")
    assert await blocking(handle.result, timeout=15) == Greeting(hello="ada")
    [batch] = await blocking(client.run_many, web_typed, ["bob"])
    assert await blocking(batch.result, timeout=15) == Greeting(hello="bob")
    # a handle made from an id alone does not know the workflow: the output comes as stored
    assert await blocking(client.handle(handle.id).result, timeout=15) == {"hello": "ada"}


async def test_a_web_process_reads_runs_and_waits_for_their_results_by_id(manager_for: Any, client: SyncClient) -> None:
    manager = await manager_for([web_greet, web_refuse, web_parent])
    # given runs started from the web process
    greeted = await blocking(client.run, web_greet, 5)
    refused = await blocking(client.run, web_refuse)
    parent = await blocking(client.run, web_parent, 2)

    # when it waits for them by id, then it gets their outputs, or their errors
    assert await blocking(client.wait_for_result, greeted.id, timeout=15) == {"hello": 5}
    with pytest.raises(WorkflowFailed, match="refused"):
        await blocking(client.wait_for_result, refused.id, timeout=15)
    assert (await blocking(client.wait_until_finished, refused.id, timeout=15)).status is RunStatus.FAILED
    assert await blocking(client.wait_for_result, parent.id, timeout=15) == [{"hello": 0}, {"hello": 1}]

    # and it reads what the manager reads
    record = await blocking(client.get_run, greeted.id, with_steps=True)
    assert record == await manager.get_run(greeted.id, with_steps=True)
    assert record.output == {"hello": 5} and [step.name for step in record.steps] == ["greet"]
    cut = await blocking(client.get_run, greeted.id, value_limit=0)
    assert isinstance(cut.output, CutValue) and cut == await manager.get_run(greeted.id, value_limit=0)

    first = await blocking(client.list_runs, workflow="web_greet", status="completed", limit=2)
    assert first == await manager.list_runs(workflow="web_greet", status="completed", limit=2)
    rest = await blocking(client.list_runs, workflow="web_greet", limit=2, cursor=first.next_cursor)
    assert len(first.items) == 2 and len(rest.items) == 1 and rest.next_cursor is None
    children = await blocking(client.list_runs, parent_id=parent.id)
    assert sorted(run.input for run in children.items) == [0, 1]
    assert await blocking(client.count_children, parent.id) == {RunStatus.COMPLETED: 2}

    # its handles carry the workflow's name, as RunHandles do
    assert greeted.workflow_name == "web_greet" and repr(greeted) == f"<SyncRunHandle web_greet {greeted.id}>"
    assert client.handle(greeted.id).workflow_name == ""
    assert client.handle(greeted.id, "web_greet").workflow_name == "web_greet"


async def test_a_web_process_steers_and_forks_runs_by_id(manager_for: Any, client: SyncClient) -> None:
    calls: list[str] = []

    def load(order: int) -> int:
        calls.append("load")
        return order

    def make(version: str, factor: int) -> Any:
        def charge(amount: int) -> int:
            calls.append(f"charge-v{version}")
            return amount * factor

        async def web_checkout(input: Any, step: Any) -> Any:
            loaded = await step.define("load", load).run(input)
            return await step.define("charge", charge).run(loaded)

        return workflow(web_checkout, version=version)

    await manager_for([make("1", 2), make("2", 3)])

    # given a run that waits for a worker, steered by id
    later = await blocking(client.run, NOBODY_SERVES_THIS, None, start_at="1h")
    steering = [client.pause, client.resume, client.cancel, client.retry, client.cancel]
    statuses = [await blocking(steer, later.id) for steer in steering]
    assert statuses == [RunStatus.PAUSED, RunStatus.PENDING, RunStatus.CANCELED, RunStatus.PENDING, RunStatus.CANCELED]

    # given a finished run, when it is forked from its second step, on its version and on another
    source = await blocking(client.run, {"name": "web_checkout", "version": "1"}, 7)
    assert await blocking(source.result, 15) == 14
    again = await blocking(client.fork, source.id, "charge")
    fixed = await blocking(client.fork, source.id, from_step="charge", version="2")

    # then each fork is a new run that kept the first step's checkpoint
    assert isinstance(again, SyncRunHandle) and again.workflow_name == "web_checkout" and again.created
    assert len({source.id, again.id, fixed.id}) == 3
    assert await blocking(again.result, 15) == 14 and await blocking(fixed.result, 15) == 21
    assert (await blocking(fixed.info)).version == "2"
    assert sorted(calls) == ["charge-v1", "charge-v1", "charge-v2", "load"]  # "load" ran once


async def test_a_web_process_lists_a_runs_messages_and_events(manager_for: Any, client: SyncClient) -> None:
    manager = await manager_for([web_approval])
    # given a run waiting for a message, which published an event
    waiting = await blocking(client.run, web_approval)

    async def is_waiting() -> bool:
        return await blocking(waiting.status) is RunStatus.WAITING

    await wait_until(is_waiting, what="the run to wait for its message")

    # when the web process sends it messages on a topic it does not wait on
    assert await blocking(client.send, waiting.id, {"n": 1}, topic="other", idempotency_key="mail-1")
    assert await blocking(client.send, waiting.id, {"n": 2}, topic="other")

    # then it lists them, oldest first, and the run's events, as the manager does
    messages = await blocking(client.list_messages, waiting.id)
    assert [(m.topic, m.payload, m.idempotency_key) for m in messages] == [
        ("other", {"n": 1}, "mail-1"),
        ("other", {"n": 2}, None),
    ]
    assert messages == await manager.list_messages(waiting.id)
    assert await blocking(client.list_messages, waiting.id, limit=1) == messages[:1]
    events = await blocking(client.list_events, waiting.id)
    assert [(e.key, e.value) for e in events] == [("progress", {"done": 40})]
    assert events == await manager.list_events(waiting.id)

    # and the message it waits for finishes it
    await blocking(waiting.send, {"approved": True}, topic="approval")
    assert await blocking(client.wait_for_result, waiting.id, timeout=15) == {"approved": True}


async def test_a_web_process_sees_workers_schedules_queues_and_stranded_runs(
    manager_for: Any, client: SyncClient
) -> None:
    manager = await manager_for([web_mailer])
    # given a worker serving web_mailer, a mail due in an hour, and a run of a version nobody serves
    await blocking(client.run, web_mailer, None, start_at="1h")
    await blocking(client.run, NOBODY_SERVES_THIS)

    # then the web process sees the worker and its schedule
    workers = await blocking(client.list_workers)
    assert [(w.id, ("web_mailer", "1") in w.workflows) for w in workers] == [(manager.worker.id, True)]
    schedules = await blocking(client.list_schedules)
    assert [s.name for s in schedules] == ["web_mailer[0 9 * * *]"]
    assert schedules == await manager.list_schedules()

    # the runs nothing will execute: only the unserved version's, unless the worker counts as gone
    stranded = await blocking(client.stranded_runs)
    assert [(s.workflow, s.version, s.counts) for s in stranded] == [
        ("nobody_serves_this", "1", {RunStatus.PENDING: 1})
    ]
    all_gone = await blocking(client.stranded_runs, stale_after=-1)
    assert [s.workflow for s in all_gone] == ["nobody_serves_this", "web_mailer"]

    # and the queue with its limit and the live workers that claim from it
    queues = {queue.name: queue for queue in await blocking(client.queue_stats)}
    assert (queues["web_mail"].concurrency, queues["web_mail"].workers) == (2, 1)
    queues = {queue.name: queue for queue in await blocking(client.queue_stats, stale_after=-1)}
    assert queues["web_mail"].workers == 0


async def test_a_web_process_purges_finished_runs(manager_for: Any, client: SyncClient) -> None:
    await manager_for([web_greet, web_refuse])
    # given three completed runs and a failed one
    done = [await blocking(client.run, web_greet, n) for n in range(3)]
    for handle in done:
        await blocking(handle.result, 15)
    refused = await blocking(client.run, web_refuse)
    await blocking(client.wait_until_finished, refused.id, timeout=15)

    # when the web process counts, then deletes them
    assert await blocking(client.purge, "0s", dry_run=True) == 4
    assert await blocking(client.purge, "0s", ["failed"], None, True) == 1  # positional, as the manager's
    assert await blocking(client.purge, "0s", statuses="failed", workflow="web_refuse") == 1
    progress: list[tuple[int, int, str]] = []

    def report(deleted: int, total: int) -> None:
        progress.append((deleted, total, threading.current_thread().name))

    assert await blocking(client.purge, "0s", workflow="web_greet", batch_size=2, progress=report) == 3

    # then they are gone, and progress was reported after each batch, on the client's thread
    assert [(deleted, total) for deleted, total, _ in progress] == [(0, 3), (2, 3), (3, 3)]
    assert {thread for _, _, thread in progress} == {"sonamu-sync-client"}
    with pytest.raises(RunNotFound):
        await blocking(client.get_run, done[0].id)


async def test_a_web_process_gets_the_errors_the_manager_raises(manager_for: Any, client: SyncClient) -> None:
    manager = await manager_for([web_greet])
    done = await blocking(client.run, web_greet, 1)
    await blocking(done.result, 15)
    pending = await blocking(client.run, NOBODY_SERVES_THIS)
    unknown = str(uuid.uuid4())
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any], type[Exception]]] = [
        ("get_run", (unknown,), {}, RunNotFound),
        ("get_run", ("not-a-run-id",), {}, RunNotFound),
        ("wait_for_result", (unknown,), {"timeout": 1}, RunNotFound),
        ("wait_for_result", (pending.id,), {"timeout": 0.2}, ResultTimeout),
        ("wait_until_finished", (unknown,), {"timeout": 1}, RunNotFound),
        ("wait_until_finished", (pending.id,), {"timeout": 0.2}, ResultTimeout),
        ("cancel", (unknown,), {}, RunNotFound),
        ("pause", (unknown,), {}, RunNotFound),
        ("resume", (unknown,), {}, RunNotFound),
        ("retry", (unknown,), {}, RunNotFound),
        ("fork", (unknown, "greet"), {}, RunNotFound),
        ("fork", (done.id, "no-such-step"), {}, InvalidValue),
        ("count_children", ("not-a-run-id",), {}, RunNotFound),
        ("list_messages", ("not-a-run-id",), {}, RunNotFound),
        ("list_events", ("not-a-run-id",), {}, RunNotFound),
        ("send", (unknown, {}), {}, RunNotFound),
        ("list_runs", (), {"status": "finished"}, InvalidValue),
        ("list_runs", (), {"limit": 0}, InvalidValue),
        ("list_runs", (), {"cursor": "page-2"}, InvalidValue),
        ("list_runs", (), {"parent_id": "not-a-run-id"}, InvalidValue),
        ("list_runs", (), {"created_after": datetime(2024, 1, 1)}, InvalidValue),  # no timezone
        ("list_runs", (), {"workflow": "nul\x00"}, InvalidValue),
        ("list_runs", (), {"value_limit": -1}, InvalidValue),
        ("purge", ("soon",), {}, InvalidDuration),
        ("purge", ("1d",), {"statuses": ["running"]}, InvalidValue),
        ("purge", ("1d",), {"batch_size": 0}, InvalidValue),
    ]
    for name, args, kwargs, error in calls:
        # when the manager and the web process make the same bad call
        with pytest.raises(error) as by_manager:
            await getattr(manager, name)(*args, **kwargs)
        with pytest.raises(error) as by_client:
            await blocking(getattr(client, name), *args, **kwargs)
        # then both raise the same error, saying the same thing
        assert type(by_client.value) is type(by_manager.value), name
        assert str(by_client.value) == str(by_manager.value), name


# the counterparts themselves


def _public_methods(cls: type) -> set[str]:
    return {name for name, member in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def _as_sync(annotation: Any) -> Any:
    """A manager method's return type as its SyncClient counterpart returns it: handles are SyncRunHandles."""
    if annotation is RunHandle:
        return SyncRunHandle
    if typing.get_origin(annotation) is RunHandle:  # RunHandle[R]: the same output type
        return SyncRunHandle[typing.get_args(annotation)]  # type: ignore[misc]
    if typing.get_origin(annotation) is list:
        [item] = typing.get_args(annotation)
        return list[_as_sync(item)]  # type: ignore[misc]
    return annotation


def _same_signature(name: str, original: Any, counterpart: Any) -> None:
    expected = inspect.signature(original, eval_str=True)
    got = inspect.signature(counterpart, eval_str=True)
    expected_parameters, got_parameters = list(expected.parameters.values()), list(got.parameters.values())
    assert got_parameters == expected_parameters, f"{name}: {got} is not {expected}"
    assert got.return_annotation == _as_sync(expected.return_annotation), f"{name} returns {got.return_annotation}"


def test_every_manager_method_a_web_process_calls_has_a_sync_client_counterpart() -> None:
    # given the public methods of WorkflowManager, less those a SyncClient deliberately does without
    wanted = _public_methods(WorkflowManager) - NOT_MIRRORED.keys()
    # then SyncClient has each of them, and every exception still names a manager method
    missing = sorted(wanted - _public_methods(SyncClient))
    assert not missing, f"add these to SyncClient, or to NOT_MIRRORED with the reason: {missing}"
    assert not NOT_MIRRORED.keys() - _public_methods(WorkflowManager), "NOT_MIRRORED names a method that is gone"


@pytest.mark.parametrize("name", sorted(_public_methods(WorkflowManager) - NOT_MIRRORED.keys()))
def test_a_sync_client_method_takes_the_managers_parameters_and_returns_its_type(name: str) -> None:
    _same_signature(name, getattr(WorkflowManager, name), getattr(SyncClient, name))


def test_a_sync_run_handle_has_what_a_run_handle_has() -> None:
    # the same methods, taking the same parameters and returning the same types
    for name in _public_methods(RunHandle):
        assert hasattr(SyncRunHandle, name), f"SyncRunHandle has no {name}"
        _same_signature(name, getattr(RunHandle, name), getattr(SyncRunHandle, name))
    # and the same attributes, made the same way (a client where a RunHandle has its manager)
    made_from = [list(inspect.signature(cls).parameters)[1:] for cls in (RunHandle, SyncRunHandle)]
    assert made_from[0] == made_from[1]
    run_id = str(uuid.uuid4())
    handles = [RunHandle(typing.cast(Any, None), run_id, "w"), SyncRunHandle(typing.cast(Any, None), run_id, "w")]
    attributes = [{key: value for key, value in vars(h).items() if not key.startswith("_")} for h in handles]
    assert attributes[0] == attributes[1] == {"id": run_id, "workflow_name": "w", "created": True, "output_type": None}
