"""The thread pool that runs synchronous step functions.

Its threads are daemons: a step stuck past the shutdown grace period must not keep the worker process
alive (the standard ThreadPoolExecutor joins its threads at exit). Its run was already handed back, and
the step runs again elsewhere (steps are at-least-once).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("sonamu_tasks.threads")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class StepThreads(Executor):
    def __init__(self, max_workers: int, name: str = "sonamu-step") -> None:
        self._max_workers = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # Counted exactly, under the lock: the threads waiting for work, and the steps queued that no thread
        # has taken yet. A step needs a new thread when the queued ones outnumber the idle threads.
        self._idle = 0
        self._queued = 0
        self._closed = False
        self._abandoned = 0  # threads still running a step whose attempt gave up on it (a timeout)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a step: the worker is shutting down")
            future: Future[T] = Future()
            self._queue.put((future, fn, args, kwargs))
            self._queued += 1
            self._grow()
            return future

    def _grow(self) -> None:
        """Start a thread if a queued step has no idle thread to take it and there is room (under the lock)."""
        # A thread running an abandoned step does not count against the pool: the others stay available.
        room = self._max_workers + self._abandoned
        while self._queued > self._idle and len(self._threads) < room:
            name = f"{self._name}-{len(self._threads)}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._idle += 1  # it takes a queued step as soon as it starts
            thread.start()
            self._threads.append(thread)

    def abandon(self, future: Future[Any], what: str) -> None:
        """The step running as `future` timed out: a thread cannot be stopped, so it runs on and its result
        is discarded. The pool grows by one thread while it does, and says so, so that abandoned steps never
        quietly take every slot."""
        with self._lock:
            if future.done():
                return
            self._abandoned += 1
            abandoned = self._abandoned
            self._grow()  # a step queued behind the abandoned one gets a thread of its own now
        future.add_done_callback(self._reclaimed)
        log = logger.error if abandoned >= self._max_workers else logger.warning
        log(
            "%s timed out; its thread cannot be stopped and runs on (%d such thread(s) now, beside %d for steps)",
            what,
            abandoned,
            self._max_workers,
        )

    def _reclaimed(self, future: Future[Any]) -> None:
        with self._lock:
            self._abandoned -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        work = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if work is not None:
                        self._queued -= 1
                        work[0].cancel()
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        # Starts counted idle (by _grow); each step taken makes it busy until the step ends.
        while True:
            work = self._queue.get()
            if work is None:
                return
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))  # an abandoned step's end is counted (_reclaimed)
                except BaseException as error:
                    future.set_exception(error)
            with self._lock:
                if len(self._threads) > self._max_workers + self._abandoned:
                    # The pool grew for a step that was abandoned, and that step has ended: one thread too many
                    # now, which would let more sync steps run at once than `concurrency`. This one leaves.
                    self._threads.remove(threading.current_thread())
                    return
                self._idle += 1
