"""The heartbeat thread: keeps a worker's leases without its event loop, and watches that loop.

Workflows run on the worker's event loop. One that runs code without awaiting (CPU work, `time.sleep`,
blocking I/O in an `async def`) blocks that loop; heartbeats sent from the same loop would stop, the leases
would expire, and another worker would take the runs over while this one still executes them: the same step
running twice at once. So heartbeats are sent from a thread with an event loop and a backend of its own (a
second connection: a PostgreSQL pool or SQLite connection thread belongs to the loop that made it). The
thread reads the runs the worker holds from a snapshot the loop publishes, and hands every answer (tokens
still held, cancel or pause requested) back to the loop, which acts on it when it next runs.

The same thread watches the loop. The loop stamps the time every 100 ms; a stamp older than a second means
something on it does not await. Each blocked episode is logged once, as a warning naming the runs on the
worker and how long, and once more when the loop comes back, with the total. A loop that never comes back
must not hold its runs forever: past the limit (`blocked_loop_limit_ms`, never less than the lease) the
thread stops extending the leases and says so, and other workers take the runs over when the leases expire.
When the loop does come back, its writes for those runs are refused (fencing) and it drops them.

A worker whose backend cannot be built again (one passed in as an object) heartbeats from its loop instead;
the thread then only watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

from .backends.base import Backend
from .errors import BackendUnavailable
from .log import FailureEpisodes

logger = logging.getLogger("sonamu_tasks.heartbeat")

Held = tuple[tuple[str, str], ...]
"""(run id, lease token) of every run a worker executes."""

Answer = Callable[[Held, dict[str, str | None]], None]
"""Called on the worker's loop with what was sent and the backend's answer (see `Backend.heartbeat`)."""

STAMP_INTERVAL_S = 0.1  # how often the loop says it is alive
WATCH_INTERVAL_S = 0.1  # how often the thread looks (and notices a stop)
BLOCKED_WARNING_S = 1.0  # asyncio's debug mode warns at 100 ms; a worker's steps batch for longer than that
STOP_TIMEOUT_S = 10.0  # a heartbeat in flight is bounded by the lease; this bounds the wait for the thread

# How much of a lease a worker trusts without a newer heartbeat: the database counts it from its own commit,
# a little after the moment this process measures from (the sending of the claim or heartbeat).
TRUSTED_SHARE = 0.9


class LeaseTimes:
    """When each lease a worker holds was last known to be extended (monotonic, taken as its heartbeat was
    sent). Written by whoever heartbeats (the thread, or the loop), read by attempts and the step threads:
    a step must not start once the lease may have run out, even before the loop hears it was lost. A process
    stopped past its lease (SIGSTOP, a paused VM) resumes all its threads at once: a pool thread would take
    its next queued step before the loop could learn that another worker owns the run."""

    def __init__(self, lease: timedelta) -> None:
        self._trusted_s = lease.total_seconds() * TRUSTED_SHARE
        self._since: dict[str, float] = {}  # by lease token; a float assigned whole: no lock needed

    def kept(self, tokens: Iterable[str], since: float) -> None:
        for token in tokens:
            self._since[token] = since

    def forget(self, token: str) -> None:
        self._since.pop(token, None)

    def may_be_lost(self, token: str) -> bool:
        since = self._since.get(token)
        return since is not None and time.monotonic() - since > self._trusted_s


def heartbeat_failures() -> FailureEpisodes:
    """Failed heartbeats, said once per episode (an outage fails every one, each lease period), and once more
    when one goes through again."""
    return FailureEpisodes(
        logger,
        "heartbeat failed (%s); said again only when heartbeats go through",
        "heartbeats go through again, after %.1fs of failures",
    )


class HeartbeatThread:
    def __init__(
        self,
        *,
        worker_id: str,
        lease: timedelta,
        interval_s: float,
        blocked_limit_s: float,
        open_backend: Callable[[], Backend] | None,
        on_answer: Answer,
        leases: LeaseTimes,
    ) -> None:
        self.worker_id = worker_id
        self._lease = lease
        self._interval_s = interval_s
        self._blocked_limit_s = max(blocked_limit_s, lease.total_seconds())
        self._open_backend = open_backend
        self._on_answer = on_answer
        self._leases = leases
        self._held: Held = ()  # replaced whole by the loop, read by the thread: no lock needed
        self._stamped_at = time.monotonic()  # written by the loop, read by the thread
        self._stamper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"sonamu-heartbeat:{worker_id}", daemon=True)
        # Only the thread touches these.
        self._blocked_since: float | None = None  # the last stamp before the loop stopped stamping
        self._blocked_runs: Held = ()  # the runs on the worker when the episode was noticed
        self._gave_up = False
        self._failures = heartbeat_failures()

    @property
    def keeps_leases(self) -> bool:
        """True when this thread sends the heartbeats; False when the worker's loop must (it only watches)."""
        return self._open_backend is not None

    def publish(self, held: Held) -> None:
        """The runs the worker holds now (called on the loop whenever they change)."""
        self._held = held

    def start(self) -> None:
        """Start stamping on the running loop and start the thread."""
        self._loop = asyncio.get_running_loop()
        self._stamp()
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread and wait for it (its backend closed); stop stamping."""
        if self._stamper is not None:
            self._stamper.cancel()
            self._stamper = None
        self._stop.set()
        if not self._thread.is_alive():
            return
        # Joined from the default executor: the loop goes on serving the rest of the shutdown meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, STOP_TIMEOUT_S)
        if self._thread.is_alive():
            logger.warning("heartbeat thread of worker %s did not stop within %.0fs", self.worker_id, STOP_TIMEOUT_S)

    # on the worker's loop

    def _stamp(self) -> None:
        self._stamped_at = time.monotonic()
        assert self._loop is not None
        self._stamper = self._loop.call_later(STAMP_INTERVAL_S, self._stamp)

    # on the thread

    def _main(self) -> None:
        try:
            asyncio.run(self._watch_and_beat())
        except Exception:
            logger.exception("heartbeat thread of worker %s failed; its leases are no longer extended", self.worker_id)

    async def _watch_and_beat(self) -> None:
        backend = self._open_backend() if self._open_backend is not None else None
        beats: asyncio.Task[None] | None = None
        try:
            if backend is not None:
                await backend.open()
                beats = asyncio.create_task(self._beat_forever(backend), name="sonamu-heartbeat")
            last_look = time.monotonic()
            # A threading.Event, looked at every 100 ms: a stop asked before this loop existed is seen too.
            while not self._stop.is_set():
                await asyncio.sleep(WATCH_INTERVAL_S)
                now = time.monotonic()
                if now - last_look < BLOCKED_WARNING_S:
                    self._look_at_loop(now)
                # else this thread was not running either (the process was stopped, the machine suspended):
                # that is not the loop's doing, and the loop gets a chance to stamp before it is judged.
                last_look = now
        finally:
            if beats is not None:
                beats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beats
            if backend is not None:
                await backend.close()

    def _look_at_loop(self, now: float) -> None:
        stamped_at = self._stamped_at
        if self._blocked_since is None:
            if now - stamped_at >= BLOCKED_WARNING_S:
                self._blocked_since = stamped_at
                self._blocked_runs = self._held
                logger.warning(
                    "event loop of worker %s blocked for %.1fs, running %s: a workflow or async step runs code "
                    "that does not await (CPU work, time.sleep, blocking I/O); %s",
                    self.worker_id,
                    now - stamped_at,
                    _runs(self._blocked_runs),
                    f"the heartbeat thread keeps its leases for up to {self._blocked_limit_s:.0f}s "
                    "(blocked_loop_limit_ms)"
                    if self.keeps_leases
                    else "no heartbeat is sent meanwhile, so other workers may take its runs over",
                )
            return
        if stamped_at != self._blocked_since:
            # The stamp that ended the episode tells how long it lasted (to within one stamp interval).
            logger.warning(
                "event loop of worker %s is running again after being blocked for %.1fs, running %s",
                self.worker_id,
                stamped_at - self._blocked_since,
                _runs(self._blocked_runs),
            )
            if self._gave_up:
                logger.warning(
                    "worker %s extends its leases again; the runs other workers took over meanwhile are dropped "
                    "at their next write",
                    self.worker_id,
                )
            self._blocked_since = None
            self._gave_up = False
            return
        if not self._gave_up and self.keeps_leases and now - stamped_at >= self._blocked_limit_s:
            self._gave_up = True
            logger.error(
                "event loop of worker %s blocked for %.1fs, past blocked_loop_limit_ms (%.1fs): no longer "
                "extending the leases of %s, so that other workers take them over when the leases expire (%.1fs); "
                "restart this worker if its loop does not come back",
                self.worker_id,
                now - stamped_at,
                self._blocked_limit_s,
                _runs(self._held),
                self._lease.total_seconds(),
            )

    async def _beat_forever(self, backend: Backend) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if not self._gave_up:
                await self._beat(backend)

    async def _beat(self, backend: Backend) -> None:
        held = self._held
        sent = time.monotonic()
        try:
            # A heartbeat answered after the lease is over keeps nothing: do not wait longer for it.
            async with asyncio.timeout(self._lease.total_seconds()):
                still_held = await backend.heartbeat(self.worker_id, held, self._lease)
        except BackendUnavailable as error:
            self._failures.failed(str(error))
            return
        except TimeoutError:
            self._failures.failed(f"no answer within the lease, {self._lease.total_seconds():.1f}s")
            return
        except Exception:
            logger.exception("heartbeat failed unexpectedly")
            return
        self._failures.succeeded()
        self._leases.kept(still_held, sent)  # now, from this thread: the loop may be blocked
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: the worker is gone, nobody to tell
            self._loop.call_soon_threadsafe(self._on_answer, held, still_held)


def _runs(held: Held) -> str:
    if not held:
        return "no run"
    ids = [run_id for run_id, _ in held]
    return ("run " if len(ids) == 1 else "runs ") + ", ".join(ids)
