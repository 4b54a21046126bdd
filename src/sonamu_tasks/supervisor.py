"""The supervisor behind `sonamu-tasks worker --processes N`: N worker processes, restarted when they crash,
stopped together.

Each worker is `python -m sonamu_tasks [--config ...] worker --processes 1 ...`, run by this interpreter (never
looked up on PATH) in a process group of its own, so that a Ctrl-C in the terminal reaches the supervisor only
and every worker gets exactly one SIGTERM. Its output is copied to the supervisor's stderr, each line prefixed
with the worker's index (`[worker 2] ...`). The supervisor holds no database connection: the workers migrate,
register, claim and heartbeat by themselves.

- A worker that exits with a non-zero code or by a signal is started again after a delay that starts at 0.5 s
  and doubles up to 30 s; one that ran for a minute before it failed starts again after 0.5 s. A worker that
  exits 0 was stopped on purpose (someone sent it SIGTERM) and stays stopped.
- On SIGTERM or SIGINT the supervisor sends SIGTERM to every worker (each stops claiming, lets its steps finish
  within `shutdown_grace_ms` and hands its runs back), waits for them and exits 0. A second signal, or workers
  still running after `stop_timeout_s`, get SIGKILL, and the supervisor then exits 1.
- A worker whose supervisor is gone (killed by SIGKILL, say) notices within a second and stops gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

logger = logging.getLogger("sonamu_tasks.supervisor")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Backoff:
    """How long to wait before starting a failed worker again."""

    initial_s: float = 0.5
    maximum_s: float = 30.0
    reset_after_s: float = 60.0
    """A worker that stayed up this long before failing starts again after `initial_s`."""

    def next_delay(self, previous_s: float | None, uptime_s: float) -> float:
        """The wait after a failure `uptime_s` seconds after the worker's start; `previous_s` is the wait before
        that start (None: the worker had not failed before)."""
        if previous_s is None or uptime_s >= self.reset_after_s:
            return self.initial_s
        return min(previous_s * 2, self.maximum_s)


class Supervisor:
    """Keep `processes` copies of `command` running until SIGTERM or SIGINT; see the module docstring."""

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        stop_timeout_s: float,
        backoff: Backoff = Backoff(),
        output: BinaryIO | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.command = list(command)
        self.processes = processes
        self.stop_timeout_s = stop_timeout_s
        self.backoff = backoff
        self._output = output if output is not None else sys.stderr.buffer
        self._running: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._killed = False
        self._deadline: asyncio.TimerHandle | None = None
        self._stop: asyncio.Event | None = None

    def run(self) -> int:
        """Supervise until stopped. The exit code: 0 when every worker stopped by itself, 1 when one was killed."""
        return asyncio.run(self._supervise())

    async def _supervise(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        logger.info("supervisor (pid %d): starting %d worker processes", os.getpid(), self.processes)
        try:
            await asyncio.gather(*(self._keep(index) for index in range(1, self.processes + 1)))
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
            if self._deadline is not None:
                self._deadline.cancel()
        logger.info("all workers stopped" + (" (some were killed)" if self._killed else ""))
        return 1 if self._killed else 0

    async def _keep(self, index: int) -> None:
        """Run worker `index` again and again until the supervisor stops or the worker exits 0."""
        assert self._stop is not None
        delay: float | None = None
        while not self._stopping:
            started = time.monotonic()
            code = await self._run_once(index)
            if self._stopping:
                return
            if code == 0:
                logger.warning("worker %d exited 0 (it was stopped by a signal sent to it): not restarted", index)
                return
            delay = self.backoff.next_delay(delay, time.monotonic() - started)
            logger.warning("worker %d %s; restarting it in %.1f s", index, _exit_text(code), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _run_once(self, index: int) -> int | None:
        """Start worker `index`, copy its output, and return its exit code (None: it could not start)."""
        # PYTHONUNBUFFERED: its lines reach the supervisor as they are written. The index tells a worker which of
        # the N it is (its metrics port is --metrics-port + index).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", WORKER_INDEX_ENV: str(index)}
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
            )
        except OSError as error:
            logger.error("worker %d could not start: %s", index, error)
            return None
        self._running[index] = process
        logger.info("worker %d started (pid %d)", index, process.pid)
        if self._stopping:  # the stop came while it was being started
            _send(process, signal.SIGTERM)
        assert process.stdout is not None
        copying = asyncio.create_task(self._copy_output(index, process.stdout))
        try:
            code = await process.wait()
        finally:
            del self._running[index]
        # Its output ends when it exits, unless a process it started still holds the pipe.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(copying, 2)
        if self._stopping:
            logger.info("worker %d %s", index, "stopped" if code == 0 else _exit_text(code))
        return code

    async def _copy_output(self, index: int, stream: asyncio.StreamReader) -> None:
        prefix = f"[worker {index}] ".encode()
        pending = b""
        while chunk := await stream.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if lines:
                self._write(b"".join(prefix + line + b"\n" for line in lines))
        if pending:
            self._write(prefix + pending + b"\n")

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):  # our own stderr closed: the workers keep running
            self._output.write(data)
            self._output.flush()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            logger.warning("%s again: killing the workers", name)
            self._kill_all()
            return
        self._stopping = True
        assert self._stop is not None
        self._stop.set()
        logger.info(
            "%s: stopping %d worker(s) gracefully (SIGTERM; SIGKILL after %.0f s or at a second signal)",
            name,
            len(self._running),
            self.stop_timeout_s,
        )
        for process in self._running.values():
            _send(process, signal.SIGTERM)
        self._deadline = asyncio.get_running_loop().call_later(self.stop_timeout_s, self._on_timeout)

    def _on_timeout(self) -> None:
        if self._running:
            logger.warning("workers still running %.0f s after SIGTERM: killing them", self.stop_timeout_s)
            self._kill_all()

    def _kill_all(self) -> None:
        for process in self._running.values():
            if process.returncode is None:
                _send(process, signal.SIGKILL)
                self._killed = True


WORKER_INDEX_ENV = "SONAMU_TASKS_WORKER_INDEX"


def worker_command(
    *,
    config_spec: str | None,
    verbose: bool,
    concurrency: int | None,
    metrics_port: int | None = None,
    queues: Sequence[str] = (),
) -> list[str]:
    """The command line of a worker this process supervises: the same config and options (the queues it serves
    too), one process."""
    command = [sys.executable, "-m", "sonamu_tasks"]
    if config_spec is not None:
        command += ["--config", config_spec]
    if verbose:
        command.append("-v")
    command += ["worker", "--processes", "1"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    command += [f"--queue={queue}" for queue in queues]  # one word each: a name starting with "-" stays a name
    return [*command, "--supervisor-pid", str(os.getpid())]


def stop_when_orphaned(supervisor_pid: int, *, interval_s: float = 0.5) -> None:
    """In a supervised worker: send this process SIGTERM (a graceful stop) once its supervisor is gone, so a
    supervisor killed by SIGKILL leaves no worker behind. Workers run in process groups of their own, so
    nothing else would stop them."""

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(interval_s)
        logger.warning("the supervisor (pid %d) is gone: stopping", supervisor_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sonamu-tasks-supervisor-watch", daemon=True).start()


def _send(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "could not start"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
