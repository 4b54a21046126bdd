"""A throwaway PgBouncer in front of a PostgreSQL server, on loopback and a free port.

Used by the test suite and the chaos runner to run the engine through a pooler as teams do. PgBouncer
(Debian's `pgbouncer` package) refuses to run as root, so as root it runs as the `postgres` OS user.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .postgres_cluster import free_port

PGBOUNCER_HINT = (
    "PgBouncer was not found on PATH or in /usr/sbin. Install it, e.g. `apt-get install pgbouncer` (Debian/Ubuntu)."
)


class PgBouncerNotInstalled(RuntimeError):
    pass


def find_pgbouncer() -> Path:
    found = shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(path)), None
    )
    if found is None:
        raise PgBouncerNotInstalled(PGBOUNCER_HINT)
    return Path(found)


class PgBouncer:
    """`with PgBouncer(server_url, pool_mode="transaction") as bouncer: bouncer.url` pools every database of
    the server named by `server_url` (trust authentication, as the test clusters); stopped afterwards."""

    def __init__(self, server_url: str, *, pool_mode: str = "session", pool_size: int = 100) -> None:
        self.binary = find_pgbouncer()
        self.pool_mode = pool_mode
        self.port = free_port()
        server = conninfo_to_dict(server_url)
        self.user = str(server.get("user") or "postgres")
        self.dbname = str(server.get("dbname") or "postgres")
        self.directory = Path(tempfile.mkdtemp(prefix="sonamu-pgbouncer-"))
        self.log = self.directory / "pgbouncer.log"
        (self.directory / "userlist.txt").write_text(f'"{self.user}" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={server.get('host') or '127.0.0.1'} port={server.get('port') or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.directory / 'userlist.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "max_client_conn = 2000\n"
            f"default_pool_size = {pool_size}\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.directory / 'pgbouncer.pid'}\n"
        )
        self._as_postgres = os.geteuid() == 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.destroy()

    def start(self, timeout: float = 30) -> None:
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
            for path in self.directory.iterdir():
                shutil.chown(path, "postgres", "postgres")
        self.process = subprocess.Popen(
            [str(self.binary), str(self.directory / "pgbouncer.ini")],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user="postgres" if self._as_postgres else None,
            group="postgres" if self._as_postgres else None,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited ({self.process.returncode}): {self._log_tail()}")
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    tail = self._log_tail()
                    raise TimeoutError(f"pgbouncer on port {self.port} not ready after {timeout}s: {tail}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # immediate shutdown: clients are disconnected
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
