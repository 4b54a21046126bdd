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
event waits for the test to `send` or `emit` it. Besides, the clock moves one microsecond after each emitted
event, so that a run created after an `emit` is created after it, as on a real clock (`wait_for_event` sees
the events emitted since the run was created, not one emitted before it at the same test instant).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from ..backends.base import FOREVER
from ..backends.sqlite import SqliteBackend
from ..config import define_config
from ..definition import WorkflowDefinition
from ..duration import Duration, parse_duration
from ..errors import ResultTimeout, SonamuTasksError, WorkflowNotRegistered
from ..handle import R_co, RunHandle
from ..manager import WorkflowManager
from ..queue import Queue, served_queues
from ..run_creation import R, WorkflowSpec
from .mocks import StepMocks, stand_in

# Leases far longer than any advance: a run executing while the test moves the clock keeps its claim (with
# one worker there is nobody to take it over anyway).
TEST_LEASE_MS = 10 * 365 * 86_400_000
IDLE_CHECK_S = 0.002
# A run waiting with no timeout is parked at FOREVER: only a message, event or child can wake it. Its due
# moment comes back as float seconds from now, a few µs either side of FOREVER, so anything this close is it.
PARKED_FOREVER = FOREVER - timedelta(days=1)
INSTANT = timedelta(microseconds=1)
"""How far the clock moves after an emitted event: the database's clock counts microseconds."""


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
        self.backend: SqliteBackend = _TestBackend(database, self.clock)
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
        self.mocks = StepMocks()
        """The step stand-ins (`mock_step`), handed to the worker when the environment starts."""
        self._running = False
        self._registering: asyncio.Task[None] | None = None  # storing what `register` added after the start

    async def __aenter__(self) -> Self:
        await self.manager.start()
        worker = self.manager.worker
        assert worker is not None  # the config enables it
        worker.step_mocks = self.mocks
        self._running = True
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Stop the engine. When the test passed, a mock that stood in for no step fails it (AssertionError):
        most often a typo in the step name, which would otherwise let the real function run unnoticed."""
        self._running = False
        try:
            if self._registering is not None:
                if kind is None:
                    await self._registering
                else:  # the test's own error says more
                    with contextlib.suppress(Exception):
                        await self._registering
        finally:
            self._registering = None
            await self.manager.stop()
        unused = self.mocks.unused()
        if kind is None and unused is not None:
            raise AssertionError(unused)

    # what a test does

    def now(self) -> datetime:
        return self.clock.now()

    def register(self, *definitions: WorkflowDefinition[Any, Any]) -> Registration:
        """Add workflows, as `workflows=` would have (the pytest fixture starts with none): the worker runs
        them, and their queues (with their limits), cron schedules and the worker's record of what it serves
        are stored. A plain call registers them at once and the rest is stored before the environment's next
        operation (`run`, `advance`, `until_idle`, `send`, `emit`, a handle's `result`); `await
        env.register(...)` waits until it is, for a test that looks at `env.manager` first."""
        for definition in definitions:
            self.manager.registry.register(definition)  # a wrong argument is refused here, at once
        if not self._running:
            return Registration(None)  # the start stores them
        self._registering = asyncio.get_running_loop().create_task(self._store_registered(self._registering))
        return Registration(self._registering)

    async def run(
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
    ) -> TestRunHandle[R]:
        """Start a run (see `WorkflowManager.run` for the options). A workflow not registered with the
        environment is refused (WorkflowNotRegistered): nothing would ever run it."""
        await self._ready("run")
        self._refuse_unregistered(workflow)
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
        return TestRunHandle(
            self, handle.id, handle.workflow_name, created=handle.created, output_type=handle.output_type
        )

    def handle(self, run_id: str) -> TestRunHandle:
        return TestRunHandle(self, run_id, "")

    async def send(
        self, run_id: str, message: Any, *, topic: str | None = None, idempotency_key: str | None = None
    ) -> bool:
        await self._ready("send")
        return await self.manager.send(run_id, message, topic=topic, idempotency_key=idempotency_key)

    async def emit(self, event: str, payload: Any, *, key: str | None = None) -> int:
        """Broadcast an event; the clock moves a microsecond after it (see the module's docstring)."""
        await self._ready("emit")
        return await self.manager.emit(event, payload, key=key)

    def mock_step(
        self, name: str, *, return_value: Any = None, side_effect: Any = None, optional: bool = False
    ) -> None:
        """Call a stand-in instead of step `name`'s function from now on (its result is checkpointed like a
        real one): `return_value`, or `side_effect`: an exception (class or instance) to raise, a callable
        called with the step's arguments, or an iterable of values (or exceptions) returned one per call (one
        call too many fails the run with MockExhausted, naming the mock).

        A mock of `name` also stands for each item `name[i]` of `step.map(name, ...)` without a mock of its
        own. A mock that stood in for no step fails the test at the environment's exit (a typo, most often),
        unless it is `optional` (the test may not reach that step) or was removed with `unmock_step`."""
        if not isinstance(name, str):
            raise TypeError(f"mock_step: the step name must be a string, got {name!r}")
        self.mocks.put(name, stand_in(name, return_value, side_effect), optional=optional)

    def unmock_step(self, name: str) -> None:
        self.mocks.remove(name)

    async def advance(self, duration: Duration) -> None:
        """Move the clock forward by `duration`, stopping at every moment something is due on the way
        (a sleep's end, a timeout, a retry, a delayed start, a cron fire), and return once the engine is idle
        at the end."""
        await self._ready("advance")
        target = self.clock.now() + parse_duration(duration, what="advance")
        await self.until_idle()
        while True:
            due = await self._next_due()
            if due is None or due > target:
                break
            await self._move_clock(due)
            await self._wake_and_settle()
        await self._move_clock(target)
        await self._wake_and_settle()

    async def until_idle(self, timeout: float = 30.0) -> None:
        """Wait (real time) until no run executes and none is due at the current test time."""
        await self._ready("until_idle")
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

    async def _ready(self, what: str) -> None:
        if not self._running:
            raise SonamuTasksError(
                f"WorkflowTestEnv.{what}(): the environment is not running; use it as "
                f"`async with WorkflowTestEnv(workflows=[...]) as env:` (or the workflow_env pytest fixture) "
                f"and call {what}() inside the block"
            )
        if self._registering is not None:
            await asyncio.shield(self._registering)  # a caller's timeout must not cancel the registration

    async def _store_registered(self, previous: asyncio.Task[None] | None) -> None:
        """What `WorkflowManager.synchronize` does for the registry as it is now: store the queues and their
        limits, publish the worker's workflows (else their runs look stranded) and store the schedules."""
        if previous is not None:
            await previous
        await self.manager.synchronize(list(self.manager.registry))

    def _refuse_unregistered(self, workflow: WorkflowSpec) -> None:
        version: Any
        if isinstance(workflow, WorkflowDefinition):
            name, version = workflow.key
        else:
            spec = {"name": workflow} if isinstance(workflow, str) else workflow
            if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
                return  # manager.run says what is wrong with it
            name, version = spec["name"], spec.get("version")
        keys = self.manager.registry.keys()
        versions = [v for n, v in keys if n == name]
        if versions and (version is None or str(version) in versions):
            return
        which = f"workflow {name!r}" + ("" if version is None else f" version {str(version)!r}")
        known = (
            f"registered versions of it: {', '.join(versions)}"
            if versions
            else "registered here: " + (", ".join(f"{n} version {v}" for n, v in keys) or "none")
        )
        raise WorkflowNotRegistered(
            f"{which} is not registered with this WorkflowTestEnv, so nothing would run it; pass it to "
            f"WorkflowTestEnv(workflows=[...]) or call env.register({name}) first ({known})"
        )

    async def _move_clock(self, moment: datetime) -> None:
        """Set the clock forward (never back: an emit may have moved it a microsecond past `moment`), and
        heartbeat the worker at the new time: it stays live (not stranding its runs) on the test clock."""
        self.clock.set(max(moment, self.clock.now()))
        worker = self.manager.worker
        if worker is not None:
            await self.backend.heartbeat(worker.id, (), timedelta(milliseconds=TEST_LEASE_MS))

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


class TestRunHandle(RunHandle[R_co]):
    """A RunHandle whose `result()` moves the test clock while the run only waits for time to pass."""

    __test__ = False

    def __init__(
        self,
        env: WorkflowTestEnv,
        run_id: str,
        workflow_name: str,
        *,
        created: bool = True,
        output_type: Any = None,
    ) -> None:
        super().__init__(env.manager, run_id, workflow_name, created=created, output_type=output_type)
        self._env = env

    async def result(self, timeout: float | None = 30.0) -> R_co:
        """The run's output, as the type its workflow declares (WorkflowFailed if it failed). While the engine
        is idle and the run unfinished, the clock skips to the next due moment. `timeout` is in real seconds."""
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


class Registration:
    """What `WorkflowTestEnv.register` returns: awaiting it waits until the workflows' queues, schedules and
    worker record are stored (the environment's next operation waits for that anyway)."""

    def __init__(self, storing: asyncio.Task[None] | None) -> None:
        self._storing = storing

    def __await__(self) -> Generator[Any, None, None]:
        if self._storing is not None:
            yield from asyncio.shield(self._storing).__await__()


class _TestBackend(SqliteBackend):
    """SQLite in the test clock's time, which moves a microsecond after each emitted event (whoever emits it:
    `env.emit`, `env.manager.emit`, a step): what is created after the emit is created after it."""

    def __init__(self, database: str, clock: TestClock) -> None:
        super().__init__(database, clock=clock.now)
        self._test_clock = clock

    async def emit_event(self, name: str, key: str, payload_json: str) -> int:
        try:
            return await super().emit_event(name, key, payload_json)
        finally:
            self._test_clock.set(self._test_clock.now() + INSTANT)
