"""SyncClient: start runs and wait for their results from synchronous code (a Flask or Django view).

It runs a WorkflowManager without a worker on an event loop in a background thread of its own; every
method blocks the calling thread only. One client per process is enough; it is thread-safe. It has every
manager method a web process calls, taking the same parameters and returning or raising the same (its
handles are SyncRunHandles); tests/test_sync_client.py lists the manager's methods it leaves out, and why.

    client = SyncClient(config)                 # at start-up
    handle = client.run({"name": "send_invoice", "version": "1"}, {"order_id": 7})
    handle.result(timeout=30)                   # blocks this thread; raises WorkflowFailed
    client.close()                              # at shutdown
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, cast

from .backends.base import MessageRecord, QueueStats, RunEventRecord, RunRecord, ScheduleRecord, WorkerRecord
from .config import Config, define_config
from .duration import Duration
from .errors import BackendClosed, SonamuTasksError
from .handle import R_co, RunHandle, declared_output
from .manager import RunPage, StrandedRuns, WorkflowManager
from .queue import Queue
from .records import STALE_AFTER
from .retention import BATCH_SIZE, Progress
from .run_creation import R, WorkflowSpec
from .status import RunStatus

T = TypeVar("T")


class SyncRunHandle(Generic[R_co]):
    """`RunHandle` for synchronous code: the same attributes and methods, each blocking the calling thread."""

    def __init__(
        self,
        client: SyncClient,
        run_id: str,
        workflow_name: str,
        *,
        created: bool = True,
        output_type: Any = None,
    ) -> None:
        self._client = client
        self.id = run_id
        self.workflow_name = workflow_name
        """The workflow's name; "" for a handle made by `handle(run_id)` without one."""
        self.created = created
        """False when `run()` found an existing run for the idempotency key."""
        self.output_type = output_type
        """The type `result()` rebuilds the output as (see `RunHandle.output_type`)."""

    def __repr__(self) -> str:
        return f"<SyncRunHandle {self.workflow_name} {self.id}>"

    def status(self) -> RunStatus:
        return self.info().status

    def info(self, *, with_steps: bool = False) -> RunRecord:
        return self._client.get_run(self.id, with_steps=with_steps)

    def result(self, timeout: float | None = None) -> R_co:
        """The run's output, as the type its workflow declares (see `RunHandle.result`)."""
        output = self._client.wait_for_result(self.id, timeout=timeout)
        return cast(R_co, declared_output(self.id, self.workflow_name, self.output_type, output))

    def get_event(self, key: str, timeout: float | None = None) -> Any:
        return self._client.get_event(self.id, key, timeout=timeout)

    def cancel(self) -> RunStatus:
        return self._client.cancel(self.id)

    def pause(self) -> RunStatus:
        return self._client.pause(self.id)

    def resume(self) -> RunStatus:
        return self._client.resume(self.id)

    def retry(self) -> RunStatus:
        return self._client.retry(self.id)

    def send(self, message: Any, *, topic: str | None = None, idempotency_key: str | None = None) -> bool:
        return self._client.send(self.id, message, topic=topic, idempotency_key=idempotency_key)


class SyncClient:
    def __init__(self, config: Config | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = define_config()
        elif isinstance(config, Mapping):
            config = define_config(**config)
        config = dataclasses.replace(config, tasks=dataclasses.replace(config.tasks, enable_worker=False))
        # A forked child has a copy of this object but not the thread running its loop: a call there would
        # wait forever. The pid tells it apart.
        self._pid = os.getpid()
        # Set by close() before anything else: a call from then on is refused instead of sent to a loop that is
        # going away. The lock orders a call's check and its submission against close().
        self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sonamu-sync-client", daemon=True)
        self._thread.start()
        self.manager = WorkflowManager(config)
        try:
            self._call(self.manager.start())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def run(
        self,
        workflow: WorkflowSpec[R],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        start_at: datetime | Duration | None = None,
        deadline: datetime | Duration | None = None,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        debounce: Duration | None = None,
        debounce_key: str | None = None,
    ) -> SyncRunHandle[R]:
        """Start a run (see `WorkflowManager.run` for the options) and return its handle at once."""
        handle = self._call(
            self.manager.run(
                workflow,
                input,
                idempotency_key=idempotency_key,
                start_at=start_at,
                deadline=deadline,
                queue=queue,
                priority=priority,
                concurrency_key=concurrency_key,
                debounce=debounce,
                debounce_key=debounce_key,
            )
        )
        return self._sync(handle)

    def send(self, run_id: str, message: Any, *, topic: str | None = None, idempotency_key: str | None = None) -> bool:
        """Send a message to a run (see `WorkflowManager.send`)."""
        return self._call(self.manager.send(run_id, message, topic=topic, idempotency_key=idempotency_key))

    def emit(self, event: str, payload: Any, *, key: str | None = None) -> int:
        """Broadcast an event (see `WorkflowManager.emit`)."""
        return self._call(self.manager.emit(event, payload, key=key))

    def get_event(self, run_id: str, key: str, *, timeout: float | None = None) -> Any:
        """A value a run published (see `WorkflowManager.get_event`); blocks this thread only."""
        return self._call(self.manager.get_event(run_id, key, timeout=timeout))

    def run_many(
        self,
        workflow: WorkflowSpec[R],
        inputs: Iterable[Any],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        start_at: datetime | Duration | None = None,
        deadline: datetime | Duration | None = None,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        concurrency_keys: Sequence[str | None] | None = None,
    ) -> list[SyncRunHandle[R]]:
        """Start many runs in one statement (see `WorkflowManager.run_many`)."""
        handles = self._call(
            self.manager.run_many(
                workflow,
                inputs,
                idempotency_keys=idempotency_keys,
                start_at=start_at,
                deadline=deadline,
                queue=queue,
                priority=priority,
                concurrency_key=concurrency_key,
                concurrency_keys=concurrency_keys,
            )
        )
        return [self._sync(handle) for handle in handles]

    def handle(self, run_id: str, workflow_name: str = "") -> SyncRunHandle:
        """A handle for a run started elsewhere."""
        return SyncRunHandle(self, run_id, workflow_name, created=False)

    # reading runs

    def get_run(self, run_id: str, *, with_steps: bool = False, value_limit: int | None = None) -> RunRecord:
        """A run (and its steps); see `WorkflowManager.get_run`. RunNotFound for an unknown run."""
        return self._call(self.manager.get_run(run_id, with_steps=with_steps, value_limit=value_limit))

    def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        parent_id: str | None = None,
        version: str | None = None,
        queue: str | None = None,
        value_limit: int | None = None,
    ) -> RunPage:
        """Runs, newest first, a page at a time (see `WorkflowManager.list_runs`). InvalidValue for a bad filter."""
        return self._call(
            self.manager.list_runs(
                workflow=workflow,
                status=status,
                created_after=created_after,
                created_before=created_before,
                limit=limit,
                cursor=cursor,
                parent_id=parent_id,
                version=version,
                queue=queue,
                value_limit=value_limit,
            )
        )

    def count_children(self, run_id: str) -> dict[RunStatus, int]:
        """How many children a run started, per status (see `WorkflowManager.count_children`)."""
        return self._call(self.manager.count_children(run_id))

    def wait_for_result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """A run's output once it finishes (`handle.result()` by id): WorkflowFailed if it failed or was
        canceled, ResultTimeout after `timeout` seconds. Blocks this thread only."""
        return self._call(self.manager.wait_for_result(run_id, timeout=timeout))

    def wait_until_finished(self, run_id: str, *, timeout: float | None = None) -> RunRecord:
        """A run's record once it finishes, whatever its outcome; ResultTimeout after `timeout` seconds."""
        return self._call(self.manager.wait_until_finished(run_id, timeout=timeout))

    # steering

    def cancel(self, run_id: str) -> RunStatus:
        """Cancel a run (see `WorkflowManager.cancel`); returns the status after."""
        return self._call(self.manager.cancel(run_id))

    def pause(self, run_id: str) -> RunStatus:
        """Pause a run (see `WorkflowManager.pause`); returns the status after."""
        return self._call(self.manager.pause(run_id))

    def resume(self, run_id: str) -> RunStatus:
        """Resume a paused run; returns the status after."""
        return self._call(self.manager.resume(run_id))

    def retry(self, run_id: str) -> RunStatus:
        """Start a failed or canceled run again from its failed step (see `WorkflowManager.retry`)."""
        return self._call(self.manager.retry(run_id))

    def fork(self, run_id: str, from_step: str, version: str | None = None) -> SyncRunHandle:
        """A new run that keeps the source's checkpoints before `from_step` (see `WorkflowManager.fork`)."""
        return self._sync(self._call(self.manager.fork(run_id, from_step, version)))

    # messages and events

    def list_messages(self, run_id: str, *, limit: int = 100) -> list[MessageRecord]:
        """A run's messages not consumed yet, oldest first."""
        return self._call(self.manager.list_messages(run_id, limit=limit))

    def list_events(self, run_id: str) -> list[RunEventRecord]:
        """What a run published with `step.set_event`, the latest value per key."""
        return self._call(self.manager.list_events(run_id))

    # operations

    def purge(
        self,
        older_than: Duration,
        statuses: str | Iterable[str] | None = None,
        workflow: str | None = None,
        dry_run: bool = False,
        batch_size: int = BATCH_SIZE,
        progress: Progress | None = None,
    ) -> int:
        """Delete finished runs older than `older_than` (see `WorkflowManager.purge`); the number deleted.
        `progress` is called on the client's own thread, not the caller's."""
        return self._call(self.manager.purge(older_than, statuses, workflow, dry_run, batch_size, progress))

    def purge_events(self, *, dry_run: bool = False, progress: Progress | None = None) -> int:
        """Delete the broadcast events no stored run can read any more (see `WorkflowManager.purge_events`)."""
        return self._call(self.manager.purge_events(dry_run=dry_run, progress=progress))

    def declare_queue(self, queue: Queue, *, give_up_after_s: float | None = 30) -> None:
        """Store a Queue's limits (see `WorkflowManager.declare_queue`; `run(queue=Queue(...))` does it)."""
        self._call(self.manager.declare_queue(queue, give_up_after_s=give_up_after_s))

    def queue_stats(self, *, stale_after: float = STALE_AFTER) -> list[QueueStats]:
        """Every queue with limits or unfinished runs (see `WorkflowManager.queue_stats`)."""
        return self._call(self.manager.queue_stats(stale_after=stale_after))

    def list_workers(self) -> list[WorkerRecord]:
        """Workers that registered, with their workflows and last heartbeat."""
        return self._call(self.manager.list_workers())

    def list_schedules(self) -> list[ScheduleRecord]:
        """The stored cron schedules, with their next and last fire times."""
        return self._call(self.manager.list_schedules())

    def delete_schedule(self, name: str) -> ScheduleRecord:
        """Delete a stored schedule no live worker fires (its workflow left the code); see the manager's."""
        return self._call(self.manager.delete_schedule(name))

    def stranded_runs(self, *, stale_after: float = STALE_AFTER) -> list[StrandedRuns]:
        """Unfinished runs of versions no live worker registers (see `WorkflowManager.stranded_runs`)."""
        return self._call(self.manager.stranded_runs(stale_after=stale_after))

    def close(self) -> None:
        """Stop the manager and the client's thread. A call waiting meanwhile (a `result()` in another thread)
        raises BackendClosed at once; a call made after raises BackendClosed."""
        self._refuse_own_thread("close()")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            return  # a forked child's copy: the loop and the connections are the parent's to close
        try:
            asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop).result()
        finally:
            self._stop_loop()

    async def _shut_down(self) -> None:
        try:
            await self.manager.stop()  # its waiters raise BackendClosed now
        finally:
            # Any call still in flight is cancelled before the loop stops: a task left pending on a closed loop
            # never resolves its caller's future, and that thread would wait forever (`_call` maps the
            # cancellation to BackendClosed).
            current = asyncio.current_task()
            others = [task for task in asyncio.all_tasks() if task is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _sync(self, handle: RunHandle[R]) -> SyncRunHandle[R]:
        return SyncRunHandle(
            self, handle.id, handle.workflow_name, created=handle.created, output_type=handle.output_type
        )

    def _refuse_own_thread(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise SonamuTasksError(
                f"SyncClient.{what} was called on the client's own thread (from a callback it runs, such as "
                "purge's progress): it would wait for itself forever. Do the call after the method returns, "
                "or from another thread"
            )

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        name = getattr(coroutine, "__name__", "call")  # the manager method's: what the caller called
        try:
            if os.getpid() != self._pid:
                raise SonamuTasksError(
                    f"this SyncClient was made in process {self._pid}, before a fork; process {os.getpid()} "
                    "cannot use it (its thread and connections stayed in the parent). Make one per process "
                    "after forking: on first use, or in the server's post-fork hook (gunicorn's post_fork)"
                )
            self._refuse_own_thread(f"{name}()")
            with self._lock:
                if self._closed:
                    raise BackendClosed(f"SyncClient.{name}(): the client was closed")
                future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except BaseException:
            coroutine.close()  # never started: no "was never awaited" warning
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise BackendClosed(f"SyncClient.{name}(): the client was closed while this call waited") from None
