"""Waiting in this process for runs to finish or publish an event, and the in-process fan-out of what
wakes the waiters.

A waiter is woken by the database's "finished" notification (PostgreSQL NOTIFY, asked for on demand with
`watch_run`; it carries the output of a run that completed with a small one), by this process's worker
letting go of the run (with the output when it completed it), or by a reconnect (a notification may have been
lost). A waiter given the output returns it without reading the run. Re-reading is only the safety net: every
`recheck` seconds with notifications, every 50 ms without (SQLite across processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from .backends.base import Backend
from .errors import BackendClosed, BackendUnavailable, ResultTimeout, RunNotFound
from .reconnect import until_available
from .records import RunRecord
from .waiting import wait_for_event

PUSHED_RECHECK_S = 5.0
POLLED_RECHECK_S = 0.05
UNWATCHED_RECHECK_S = 0.25  # a read-only manager's waiters: they read again, unwatched, four times a second
GIVE_UP_S = 30.0  # without a timeout: how long a read rides out an outage before BackendUnavailable
READ_FLOOR_S = 1.0  # a read begun at the caller's deadline still gets this long

T = TypeVar("T")


class _Unanswered(enum.Enum):
    UNANSWERED = "unanswered"


_UNANSWERED = _Unanswered.UNANSWERED
"""No answer by the caller's deadline (the database is away): result() raises ResultTimeout, get_event None."""


class ResultWaiters:
    def __init__(
        self,
        backend: Backend,
        read_run: Callable[[str], Awaitable[RunRecord]],
        runs_here: Callable[[str], bool],
        *,
        watch: bool = True,
    ) -> None:
        """`watch`: ask for the "finished" notification of a run waited for (a write, `watch_runs`); a read-only
        manager's waiters, whose role may only read, read the run again instead."""
        self._backend = backend
        self._watch = watch
        self._read_run = read_run
        self._runs_here = runs_here
        self._events: dict[str, set[asyncio.Event]] = {}
        # Outputs of runs just completed (by this process's worker, or as a notification said), kept only while a
        # waiter here wants them.
        self._completed_here: dict[str, str] = {}
        self._reconnects = 0  # a watch set before a reconnect may have been lost with the server: set it again
        self.listening = False
        """True while notifications from other processes arrive (the listener is up)."""
        self._stopped = False  # the manager stopped: every waiter raises BackendClosed (see `stop`)

    async def wait(self, run_id: str, timeout: float | None) -> RunRecord | str:
        """The finished run's record, or its output JSON when this process's worker just completed it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        recheck = self._recheck()
        with self._registered(run_id) as event:
            watched = None  # self._reconnects when the watch was asked for
            while True:
                event.clear()
                self._refuse_if_stopped(run_id)
                output = self._completed_here.get(run_id)
                if output is not None:
                    return output
                if self._runs_here(run_id):
                    # This process's worker holds it and sets the event when it lets go: no read until then.
                    await wait_for_event(event, recheck if deadline is None else min(recheck, deadline - loop.time()))
                    if deadline is None or loop.time() < deadline:
                        continue
                elif self._watch and watched != self._reconnects:
                    # Ask for the "finished" notification first: one statement, and when it says the run is
                    # unfinished (the watch is set) nothing is read until the notification or the recheck.
                    watched = self._reconnects
                    watching = await self._by(deadline, lambda: self._backend.watch_run(run_id), "watch run")
                    if watching is _UNANSWERED:
                        raise ResultTimeout(run_id, ResultTimeout.UNKNOWN, timeout or 0)
                    if watching and (deadline is None or loop.time() < deadline):
                        await wait_for_event(
                            event, recheck if deadline is None else min(recheck, deadline - loop.time())
                        )
                        continue
                record = await self._by(deadline, lambda: self._read_run(run_id), None)
                if record is _UNANSWERED:
                    raise ResultTimeout(run_id, ResultTimeout.UNKNOWN, timeout or 0)
                if record.status.finished:
                    return record
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise ResultTimeout(run_id, record.status.value, timeout or 0)
                await wait_for_event(event, recheck if remaining is None else min(recheck, remaining))

    async def _by(self, deadline: float | None, read: Callable[[], Awaitable[T]], what: str | None) -> T | _Unanswered:
        """`read` (through until_available, unless `what` is None: it retries itself), given up at `deadline`
        (the caller's timeout, a loop time): then _UNANSWERED. Without a deadline, as long as any call.

        A read is cut short at the deadline, even mid-statement: nothing is left unknown by that (a watch is
        a hint, set again if lost). A read begun at the deadline still gets READ_FLOOR_S: a timeout of 0 asks
        for one look, not for none."""
        call = read if what is None else lambda: until_available(read, what=what, give_up_after_s=GIVE_UP_S)
        if deadline is None:
            return await call()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(max(deadline, loop.time() + READ_FLOOR_S)):
                return await call()
        except (TimeoutError, BackendUnavailable):
            return _UNANSWERED

    def _recheck(self) -> float:
        if not self._watch:
            return UNWATCHED_RECHECK_S
        return PUSHED_RECHECK_S if self._backend.pushes_notifications and self.listening else POLLED_RECHECK_S

    @contextlib.contextmanager
    def _registered(self, run_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events.setdefault(run_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(run_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[run_id]
                    self._completed_here.pop(run_id, None)

    async def wait_for_event(self, run_id: str, key: str, timeout: float | None) -> Any:
        """The value run `run_id` published under `key` (step.set_event): at once if set, else when it is
        set; None when the run finished without setting it or `timeout` passed first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        with self._registered(run_id) as event:
            watching = False
            while True:
                event.clear()
                self._refuse_if_stopped(run_id)
                read = await self._by(deadline, lambda: self._backend.get_run_event(run_id, key), "read event")
                if read is _UNANSWERED:
                    return None
                status, found, value = read
                if status is None:
                    raise RunNotFound(f"no run with id {run_id}")
                if found:
                    return value
                if status.finished:
                    return None
                if not watching and self._watch:
                    # Ask to be notified of the run's changes, then read again: it may have set it meanwhile.
                    if await self._by(deadline, lambda: self._backend.watch_run(run_id), "watch run") is _UNANSWERED:
                        return None
                    watching = True
                    continue
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                recheck = self._recheck()
                await wait_for_event(event, recheck if remaining is None else min(recheck, remaining))

    def finished(self, run_id: str) -> None:
        """The run finished (a notification) or left this process's worker: its waiters look again."""
        for event in self._events.get(run_id, ()):
            event.set()

    def completed(self, run_id: str, output_json: str | None) -> None:
        """The run finished (a notification, or this process's worker let go of it); `output_json` is its output
        when it completed and the output came along: its waiters return it without a read."""
        if output_json is not None and run_id in self._events:
            self._completed_here[run_id] = output_json
        self.finished(run_id)

    def start(self) -> None:
        """The manager (re)started: waits are served again."""
        self._stopped = False

    def stop(self) -> None:
        """The manager stops: every waiter raises BackendClosed now, rather than at its next read (up to
        PUSHED_RECHECK_S later), which a SyncClient's close would not wait for."""
        self._stopped = True
        for events in self._events.values():
            for event in events:
                event.set()

    def _refuse_if_stopped(self, run_id: str) -> None:
        if self._stopped:
            raise BackendClosed(f"the manager was stopped while waiting for run {run_id}")

    def wake_all(self) -> None:
        """Notifications may have been lost (a reconnect): every waiter reads again, and watches again."""
        self._reconnects += 1
        for events in self._events.values():
            for event in events:
                event.set()
