"""A throwaway PostgreSQL cluster from the binaries on this machine, on loopback and a free port.

Used by the test suite, the benchmarks and the quick start. `initdb` refuses to run as root, so as root
the data directory is owned by the `postgres` OS user and the binaries run through `runuser`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or under /usr/lib/postgresql/*/bin. "
    "Install them, e.g. `apt-get install postgresql` (Debian/Ubuntu) or `brew install postgresql` (macOS), "
    "or point the tests at a server with SONAMU_TASKS_TEST_DATABASE_URL=postgresql://..."
)


class PostgresNotInstalled(RuntimeError):
    pass


def find_postgres_bin() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name.split(".")[0]),
        reverse=True,
    )
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise PostgresNotInstalled(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """`with PostgresCluster() as cluster: cluster.url` gives a running server; it is removed afterwards."""

    def __init__(self, *, fsync: bool = True, settings: dict[str, str] | None = None) -> None:
        self.bin = find_postgres_bin()
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="sonamu-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "max_connections": "500",
            "fsync": "on" if fsync else "off",
            "synchronous_commit": "on" if fsync else "off",
            "full_page_writes": "on" if fsync else "off",
            **(settings or {}),
        }
        self._as_postgres = os.geteuid() == 0
        self._initialized = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.destroy()

    def start(self) -> None:
        if not self._initialized:
            self._init()
        options = " ".join(f"-c {key}={value}" for key, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (clients disconnected cleanly) or `immediate` (like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        result = self._run("pg_ctl", "-D", str(self.data), "status", check=False)
        return result.returncode == 0

    def kill_postmaster(self, timeout: float = 30, *, with_children: bool = False) -> float:
        """`kill -9` of the postmaster (its backends notice and exit soon after; meanwhile a WAL sender may still
        send what was written). `with_children`: every server process at once, as when the machine dies.
        Returns the wall-clock time of the kill, once the server is gone."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        children = _children(pid) if with_children else []
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"postmaster {pid} still running {timeout}s after kill -9")
            time.sleep(0.02)
        return killed_at  # the wall-clock time of the kill

    def destroy(self) -> None:
        if self.data.exists() and self.is_running():
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self._initialized = True

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / program), *args]
        if self._as_postgres:
            command = [_runuser(), "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.directory)
        if check and result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr or result.stdout}\n{log}")
        return result

    def wait_until_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"PostgreSQL on port {self.port} not ready after {timeout}s")


class StandbyCluster(PostgresCluster):
    """A streaming standby of `primary`, made with `pg_basebackup -R` (so `primary_conninfo` names the primary)
    on a port of its own. `synchronous=True` makes the primary wait for it at every commit
    (`synchronous_standby_names`, with `synchronous_commit` on) once it streams."""

    def __init__(
        self,
        primary: PostgresCluster,
        *,
        name: str = "standby1",
        synchronous: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        fsync = primary.settings.get("fsync") == "on"
        super().__init__(fsync=fsync, settings={"cluster_name": name, "hot_standby": "on", **(settings or {})})
        self.primary = primary
        self.name = name
        self.synchronous = synchronous

    def start(self) -> None:
        first = not self._initialized
        super().start()
        if first:
            self.wait_until_streaming()

    def _init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
            "-D", str(self.data), "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        self._initialized = True

    def wait_until_streaming(self, timeout: float = 60) -> None:
        """Until the primary streams to this standby (synchronously when asked: then every commit waits for it)."""
        import psycopg

        with psycopg.connect(self.primary.url, autocommit=True) as conn:
            if self.synchronous:
                conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{self.name}'")
                conn.execute("SELECT pg_reload_conf()")
            wanted = "sync" if self.synchronous else "async"
            deadline = time.monotonic() + timeout
            while True:
                row = conn.execute(
                    "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s", [self.name]
                ).fetchone()
                if row is not None and row[0] == "streaming" and row[1] == wanted:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby {self.name} not streaming ({wanted}) after {timeout}s: {row}")
                time.sleep(0.05)

    def promote(self) -> None:
        """`pg_ctl promote`: the standby leaves recovery and accepts writes (returns once it does)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")


def failover_url(*clusters: PostgresCluster, **parameters: str) -> str:
    """A multi-host URL naming every cluster, connecting to whichever accepts writes (libpq's
    `target_session_attrs=read-write`), as an application follows a failover."""
    hosts = ",".join(f"127.0.0.1:{cluster.port}" for cluster in clusters)
    query = "&".join(f"{key}={value}" for key, value in {"target_session_attrs": "read-write", **parameters}.items())
    return f"postgresql://postgres@{hosts}/postgres?{query}"


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if fields.get("PPid", "").strip() == str(pid):
                found.append(int(status.parent.name))
    return found


def _runuser() -> str:
    # runuser lives in /usr/sbin, which a minimal PATH (a CI job's, say) may leave out.
    return shutil.which("runuser") or next(
        (path for path in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(path)), "runuser"
    )
