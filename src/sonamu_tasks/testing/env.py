"""WorkflowTestEnv: the real engine in memory, on a clock the test moves.

    async with WorkflowTestEnv(workflows=[send_invoice]) as env:
        handle = await env.run(send_invoice, {"order_id": 7})
        await env.advance("30m")                       # durable sleeps and timeouts due by then fire now
        assert await handle.result() == {"sent": True}

It is not a re-implementation: a WorkflowManager with its worker and cron scheduler runs on the SQLite
backend in memory, whose transactions read the test clock. So durable sleeps, receive and event timeouts,
retry delays, deadlines, delayed starts and schedules all follow the clock, and a workflow that sleeps a week
is tested in milliseconds. Steps run for real unless mocked (`mock_step`).

The clock moves only when the test says so: `advance(duration)` walks it forward from one due moment to the
next (every run and cron fire due on the way happens, in order) and returns once the engine is idle.
`handle.result()` of a run started here skips time the same way while nothing else can happen (the run
only waits for time to pass), like Temporal's time-skipping test server; a run waiting for a message or an
event waits for the test to `send` or `emit` it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from ..backends.base import FOREVER
from ..backends.sqlite import SqliteBackend
from ..config import define_config
from ..definition import WorkflowDefinition
from ..duration import Duration, parse_duration
from ..errors import ResultTimeout
from ..handle import RunHandle
from ..manager import WorkflowManager
from ..queue import Queue, served_queues
from ..run_creation import WorkflowSpec

# Leases far longer than any advance: a run executing while the test moves the clock keeps its claim (with
# one worker there is nobody to take it over anyway).
TEST_LEASE_MS = 10 * 365 * 86_400_000
IDLE_CHECK_S = 0.002
# A run waiting with no timeout is parked at FOREVER: only a message, event or child can wake it. Its due
# moment comes back as float seconds from now, a few µs either side of FOREVER, so anything this close is it.
PARKED_FOREVER = FOREVER - timedelta(days=1)


class TestClock:
    """The time the engine runs at; it moves only when told."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError(f"the test clock needs a timezone-aware start, got {start!r}")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def set(self, moment: datetime) -> None:
        if moment < self._now:
            raise ValueError(f"the test clock does not go back ({moment.isoformat()} < {self._now.isoformat()})")
        self._now = moment


class WorkflowTestEnv:
    """The engine in memory with a test clock. Use it as an async context manager (or the pytest fixture
    `workflow_env`). `database` may name a file instead of ":memory:" to look at the tables afterwards."""

    __test__ = False

    def __init__(
        self,
        workflows: Iterable[WorkflowDefinition[Any, Any]] = (),
        *,
        start: datetime | None = None,
        concurrency: int = 8,
        timezone: str = "UTC",
        context_provider: Callable[[dict[str, Any]], Any] | None = None,
        database: str = ":memory:",
    ) -> None:
        self.clock = TestClock(start)
        self.backend = SqliteBackend(database, clock=self.clock.now)
        config = define_config(
            database_url="sqlite:///unused-the-backend-is-given.db",
            timezone=timezone,
            tasks={
                "worker_options": {
                    "concurrency": concurrency,
                    "listen_delay": 0,
                    "lease_ms": TEST_LEASE_MS,
                    "poll_interval_ms": 50,
                },
                "context_provider": context_provider,
            },
        )
        self.manager = WorkflowManager(config, workflows=workflows, backend=self.backend, clock=self.clock.now)

    async def __aenter__(self) -> Self:
        await self.manager.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.manager.stop()

    # what a test does

    def now(self) -> datetime:
        return self.clock.now()

    def register(self, *definitions: WorkflowDefinition[Any, Any]) -> None:
        """Add workflows after the start (the pytest fixture starts with none)."""
        self.manager.register(*definitions)
        worker = self.manager.worker
        if worker is not None:
            worker.wake()

    async def run(
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
    ) -> TestRunHandle:
        """Start a run (see `WorkflowManager.run` for the options)."""
        handle = await self.manager.run(
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
        return TestRunHandle(self, handle.id, handle.workflow_name, created=handle.created)

    def handle(self, run_id: str) -> TestRunHandle:
        return TestRunHandle(self, run_id, "")

    async def send(
        self, run_id: str, message: Any = None, *, topic: str | None = None, idempotency_key: str | None = None
    ) -> bool:
        return await self.manager.send(run_id, message, topic=topic, idempotency_key=idempotency_key)

    async def emit(self, event: str, payload: Any = None, *, key: str | None = None) -> int:
        return await self.manager.emit(event, payload, key=key)

    def mock_step(self, name: str, *, return_value: Any = None, side_effect: Any = None) -> None:
        """Call a stand-in instead of step `name`'s function from now on (its result is checkpointed like a
        real one): `return_value`, or `side_effect`: an exception (class or instance) to raise, a callable
        called with the step's arguments, or an iterable of values (or exceptions) returned one per call."""
        worker = self.manager.worker
        assert worker is not None
        worker.step_mocks[name] = _stand_in(return_value, side_effect)

    def unmock_step(self, name: str) -> None:
        worker = self.manager.worker
        assert worker is not None
        worker.step_mocks.pop(name, None)

    async def advance(self, duration: Duration) -> None:
        """Move the clock forward by `duration`, stopping at every moment something is due on the way
        (a sleep's end, a timeout, a retry, a delayed start, a cron fire), and return once the engine is idle
        at the end."""
        target = self.clock.now() + parse_duration(duration, what="advance")
        await self.until_idle()
        while True:
            due = await self._next_due()
            if due is None or due > target:
                break
            self.clock.set(max(due, self.clock.now()))
            await self._wake_and_settle()
        self.clock.set(target)
        await self._wake_and_settle()

    async def until_idle(self, timeout: float = 30.0) -> None:
        """Wait (real time) until no run executes and none is due at the current test time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        calm = 0
        while calm < 3:  # idle three looks in a row: a run just finishing may start another
            await asyncio.sleep(IDLE_CHECK_S)
            worker = self.manager.worker
            due = await self._next_due()
            busy = (worker is not None and not worker.idle) or (due is not None and due <= self.clock.now())
            calm = 0 if busy else calm + 1
            if busy and worker is not None:
                worker.wake()
            if loop.time() > deadline:
                raise TimeoutError(f"the engine did not go idle within {timeout:g}s of real time")

    # helpers

    async def _wake_and_settle(self) -> None:
        scheduler = self.manager.scheduler
        if scheduler is not None:
            await scheduler.tick()  # fires due schedules at the new time now, not at its next real-time look
        worker = self.manager.worker
        if worker is not None:
            worker.wake()
        await self.until_idle()

    async def _next_due(self) -> datetime | None:
        """The earliest moment something this environment serves is due: a run or a cron fire."""
        keys = self.manager.registry.keys()
        moments: list[datetime] = []
        queues = served_queues(self.manager.config.tasks.worker_options.queues, self.manager.registry)
        seconds = await self.backend.seconds_until_due(keys, queues) if keys else None
        if seconds is not None:
            moments.append(self.clock.now() + timedelta(seconds=seconds))
        served = {name for name, _ in keys}
        moments.extend(s.next_fire_at for s in await self.manager.list_schedules() if s.workflow_name in served)
        return min((moment for moment in moments if moment < PARKED_FOREVER), default=None)


class TestRunHandle(RunHandle):
    """A RunHandle whose `result()` moves the test clock while the run only waits for time to pass."""

    __test__ = False

    def __init__(self, env: WorkflowTestEnv, run_id: str, workflow_name: str, *, created: bool = True) -> None:
        super().__init__(env.manager, run_id, workflow_name, created=created)
        self._env = env

    async def result(self, timeout: float | None = 30.0) -> Any:
        """The run's output (WorkflowFailed if it failed). While the engine is idle and the run unfinished,
        the clock skips to the next due moment. `timeout` is in real seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                return await super().result(timeout=0.02)
            except ResultTimeout:
                pass
            if deadline is not None and loop.time() > deadline:
                raise ResultTimeout(self.id, (await self.status()).value, timeout or 0)
            await self._env.until_idle()
            if (await self.status()).finished:
                continue
            due = await self._env._next_due()
            if due is not None and due > self._env.now():  # nothing can happen before then: skip to it
                await self._env.advance(due - self._env.now())


def _stand_in(return_value: Any, side_effect: Any) -> Callable[..., Any]:
    if side_effect is None:
        return lambda *args, **kwargs: return_value
    if isinstance(side_effect, BaseException) or (
        isinstance(side_effect, type) and issubclass(side_effect, BaseException)
    ):
        error = side_effect

        def raise_it(*args: Any, **kwargs: Any) -> Any:
            raise error

        return raise_it
    if callable(side_effect):
        return side_effect  # type: ignore[no-any-return]
    values: Iterator[Any] = iter(side_effect)

    def next_value(*args: Any, **kwargs: Any) -> Any:
        value = next(values)
        if isinstance(value, BaseException) or (isinstance(value, type) and issubclass(value, BaseException)):
            raise value
        return value

    return next_value
