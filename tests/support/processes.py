"""Start and watch real worker processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    def __init__(self, url: str, schema: str, log_dir: Path, name: str, **settings: float | str) -> None:
        self.log_path = log_dir / f"{name}.log"
        # This tree's src first: otherwise the installed package (another checkout's, in a git worktree) runs.
        path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
        env = {**os.environ, "SONAMU_TEST_URL": url, "SONAMU_TEST_SCHEMA": schema, "PYTHONPATH": path}
        for key, value in settings.items():
            env[f"SONAMU_TEST_{key.upper()}"] = str(value)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.worker_process"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid
        self.url = url

    def freeze(self) -> None:
        """SIGSTOP: a long GC pause, a partition; it keeps believing it owns its runs. On SQLite, frozen at a
        moment it holds no write lock: a process stopped inside a write transaction (a heartbeat, say) blocks
        every other writer until it resumes, which SQLite cannot help, and the test would wait for a take-over
        that cannot happen."""
        os.kill(self.pid, signal.SIGSTOP)
        if not self.url.startswith("sqlite:"):
            return
        path = self.url.removeprefix("sqlite:///")
        for _ in range(50):
            connection = sqlite3.connect(path, timeout=0.2)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
                return
            except sqlite3.OperationalError:  # locked by the frozen worker: let it finish, and freeze it again
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(0.05)
                os.kill(self.pid, signal.SIGSTOP)
            finally:
                connection.close()
        raise AssertionError(f"worker {self.pid} held SQLite's write lock at every one of 50 freezes")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """kill -9: a crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM, as a deploy stops a worker: it finishes what it is writing, and exits. Its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code


def audit_lines(directory: Path) -> list[tuple[str, int]]:
    path = directory / "audit.log"
    if not path.exists():
        return []
    return [(line.split()[0], int(line.split()[1])) for line in path.read_text().splitlines() if line.strip()]
