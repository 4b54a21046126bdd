"""SyncClient: start runs and wait for their results from synchronous code (a Flask or Django view).

It runs a WorkflowManager without a worker on an event loop in a background thread of its own; every
method blocks the calling thread only. One client per process is enough; it is thread-safe.

    client = SyncClient(config)                 # at start-up
    handle = client.run({"name": "send_invoice", "version": "1"}, {"order_id": 7})
    handle.result(timeout=30)                   # blocks this thread; raises WorkflowFailed
    client.close()                              # at shutdown
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from .backends.base import RunRecord
from .config import Config, define_config
from .duration import Duration
from .manager import WorkflowManager
from .queue import Queue
from .run_creation import WorkflowSpec
from .status import RunStatus

T = TypeVar("T")


class SyncRunHandle:
    def __init__(self, client: SyncClient, run_id: str, created: bool) -> None:
        self._client = client
        self.id = run_id
        self.created = created

    def status(self) -> RunStatus:
        return self.info().status

    def info(self, *, with_steps: bool = False) -> RunRecord:
        return self._client._call(self._client.manager.get_run(self.id, with_steps=with_steps))

    def result(self, timeout: float | None = None) -> Any:
        return self._client._call(self._client.manager.wait_for_result(self.id, timeout=timeout))

    def get_event(self, key: str, timeout: float | None = None) -> Any:
        return self._client.get_event(self.id, key, timeout=timeout)

    def cancel(self) -> RunStatus:
        return self._client._call(self._client.manager.cancel(self.id))

    def pause(self) -> RunStatus:
        return self._client._call(self._client.manager.pause(self.id))

    def resume(self) -> RunStatus:
        return self._client._call(self._client.manager.resume(self.id))

    def retry(self) -> RunStatus:
        return self._client._call(self._client.manager.retry(self.id))

    def send(self, message: Any = None, *, topic: str | None = None, idempotency_key: str | None = None) -> bool:
        return self._client.send(self.id, message, topic=topic, idempotency_key=idempotency_key)


class SyncClient:
    def __init__(self, config: Config | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = define_config()
        elif isinstance(config, Mapping):
            config = define_config(**config)
        config = dataclasses.replace(config, tasks=dataclasses.replace(config.tasks, enable_worker=False))
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
        workflow: WorkflowSpec,
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
    ) -> SyncRunHandle:
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
        return SyncRunHandle(self, handle.id, handle.created)

    def send(
        self, run_id: str, message: Any = None, *, topic: str | None = None, idempotency_key: str | None = None
    ) -> bool:
        """Send a message to a run (see `WorkflowManager.send`)."""
        return self._call(self.manager.send(run_id, message, topic=topic, idempotency_key=idempotency_key))

    def emit(self, event: str, payload: Any = None, *, key: str | None = None) -> int:
        """Broadcast an event (see `WorkflowManager.emit`)."""
        return self._call(self.manager.emit(event, payload, key=key))

    def get_event(self, run_id: str, key: str, *, timeout: float | None = None) -> Any:
        """A value a run published (see `WorkflowManager.get_event`); blocks this thread only."""
        return self._call(self.manager.get_event(run_id, key, timeout=timeout))

    def run_many(
        self,
        workflow: WorkflowSpec,
        inputs: Iterable[Any],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        start_at: datetime | Duration | None = None,
        deadline: datetime | Duration | None = None,
        queue: Queue | str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        concurrency_keys: Sequence[str | None] | None = None,
    ) -> list[SyncRunHandle]:
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
        return [SyncRunHandle(self, handle.id, handle.created) for handle in handles]

    def handle(self, run_id: str) -> SyncRunHandle:
        return SyncRunHandle(self, run_id, created=False)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self.manager.stop())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
